"""Attention kernels per platform and the dtype choice (jax_inversion.core.platform, models.layers).

The TPU Pallas flash-attention kernel runs here in Pallas' interpreter (``force_tpu_interpret_mode``)
and is compared with an explicit einsum-softmax reference and with XLA's attention, forward and
gradient. cuDNN cannot run on a CPU; its selection rules are tested as pure functions.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jax_inversion.core.errors import UserError
from jax_inversion.models import cpu_attention, layers
from jax_inversion.models import unet as unet_lib
from jax_inversion.core.platform import (
    PlatformError,
    attention_kernel_fits,
    resolve_dtype,
    select_attention_backend,
)
from jax_inversion.models.tiny import TINY_UNET

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def reference_attention(q, k, v, causal=False):
    """Softmax(q k^T / sqrt(d)) v over ``[B, T, heads, dim]``, in float64 numpy."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def qkv(batch, q_len, kv_len, heads, dim, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (batch, q_len, heads, dim)),
            jax.random.normal(keys[1], (batch, kv_len, heads, dim)),
            jax.random.normal(keys[2], (batch, kv_len, heads, dim)))


# ----------------------------------------------------------------------------- choice rules


@pytest.mark.parametrize("platform,dtype,expected", [
    ("cpu", F32, "chunked"), ("cpu", BF16, "chunked"), ("cpu", F16, "chunked"),
    ("gpu", F32, "xla"), ("gpu", BF16, "cudnn"), ("gpu", F16, "cudnn"),
    ("tpu", F32, "pallas"), ("tpu", BF16, "pallas"),
])
def test_auto_picks_the_fused_kernel_the_platform_and_dtype_allow(platform, dtype, expected):
    assert select_attention_backend("auto", platform, dtype) == expected


@pytest.mark.parametrize("platform,dtype,requested", [
    ("cpu", F32, "xla"), ("gpu", F32, "xla"), ("tpu", BF16, "xla"), ("gpu", BF16, "chunked"), ("cpu", F32, "chunked"),
    ("gpu", BF16, "cudnn"), ("gpu", F16, "cudnn"), ("tpu", F32, "pallas"), ("tpu", BF16, "pallas"),
])
def test_an_explicit_backend_that_can_run_is_kept(platform, dtype, requested):
    assert select_attention_backend(requested, platform, dtype) == requested


@pytest.mark.parametrize("platform,dtype,requested,names", [
    ("cpu", BF16, "cudnn", ("'cudnn'", "GPU", "cpu", "attention_backend=auto")),
    ("tpu", BF16, "cudnn", ("'cudnn'", "GPU", "tpu")),
    ("gpu", F32, "cudnn", ("'cudnn'", "bfloat16 or float16", "float32", "dtype=bfloat16")),
    ("cpu", F32, "pallas", ("'pallas'", "TPU", "cpu", "attention_backend=auto")),
    ("gpu", BF16, "pallas", ("'pallas'", "TPU", "gpu")),
    ("gpu", BF16, "flash", ("unknown attention backend 'flash'", "auto, xla, chunked, cudnn, pallas")),
])
def test_a_backend_that_cannot_run_is_one_line_naming_the_fix(platform, dtype, requested, names):
    with pytest.raises(PlatformError) as error:
        select_attention_backend(requested, platform, dtype)
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("backend,q_len,kv_len,head_dim,max_cudnn,fits", [
    ("xla", 77, 77, 7, 256, True),
    ("chunked", 4096, 77, 7, 256, True),
    ("cudnn", 4096, 77, 40, 256, True),  # SD1.5 64x64 cross-attention
    ("cudnn", 64, 64, 160, 256, True),  # SD1.5 8x8 layers on Hopper
    ("cudnn", 64, 64, 160, 128, False),  # ... before Hopper
    ("cudnn", 64, 64, 4, 256, False),  # head dim not a multiple of 8
    ("pallas", 4096, 4096, 40, 256, True),
    ("pallas", 1024, 1024, 80, 256, True),  # SD1.5's 32x32 self-attention
    ("pallas", 4096, 77, 40, 256, False),  # cross-attention: keys not a multiple of the 128 tile
    ("pallas", 64, 64, 40, 256, False),  # 8x8 latents: queries shorter than the tile
    ("pallas", 256, 256, 160, 256, False),  # 16x16: short layers run XLA's attention
    ("pallas", 1152, 1152, 160, 256, True),  # any head dim (padded below 64)
    ("pallas", 1000, 1000, 64, 256, False),  # long but not tiled by 128
])
def test_kernel_shape_limits(backend, q_len, kv_len, head_dim, max_cudnn, fits):
    assert attention_kernel_fits(backend, q_len, kv_len, head_dim, max_cudnn) is fits


def test_each_call_falls_back_to_xla_outside_the_kernel_shapes(monkeypatch):
    monkeypatch.setattr(layers, "current_platform", lambda: "tpu")
    assert layers.attention_backend_for("auto", F32, 4096, 4096, 40) == "pallas"
    assert layers.attention_backend_for("auto", F32, 4096, 77, 40) == "xla"
    assert layers.attention_backend_for("xla", F32, 4096, 4096, 40) == "xla"
    monkeypatch.setattr(layers, "current_platform", lambda: "gpu")
    monkeypatch.setattr(layers, "max_cudnn_head_dim", lambda: 128)
    assert layers.attention_backend_for("auto", BF16, 4096, 77, 40) == "cudnn"
    assert layers.attention_backend_for("auto", BF16, 64, 64, 160) == "xla"
    assert layers.attention_backend_for("auto", F32, 4096, 77, 40) == "xla"  # upcast layers: XLA
    with pytest.raises(PlatformError, match="float32"):
        layers.attention_backend_for("cudnn", F32, 4096, 77, 40)


# ----------------------------------------------------------------------------- dtype auto


@pytest.mark.parametrize("name,platform,expected", [
    ("auto", "cpu", F32), ("auto", "gpu", BF16), ("auto", "tpu", BF16),
    ("float32", "gpu", F32), ("bfloat16", "cpu", BF16), ("float16", "gpu", F16),
])
def test_resolve_dtype(name, platform, expected):
    assert resolve_dtype(name, platform) == expected


def test_resolve_dtype_defaults_to_this_platform():
    assert resolve_dtype("auto") == (F32 if jax.default_backend() == "cpu" else BF16)


@pytest.mark.parametrize("name", ["fp32", "float64", "int8", ""])
def test_an_unknown_dtype_is_one_line(name):
    with pytest.raises(PlatformError, match=r"unknown dtype .*: use one of auto, float32, bfloat16, float16$"):
        resolve_dtype(name, "gpu")


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("q_len,kv_len,dim,causal", [(256, 256, 40, False), (128, 384, 64, False), (256, 256, 32, True)])
def test_pallas_splash_attention_in_interpret_mode_equals_xla(q_len, kv_len, dim, causal):
    q, k, v = qkv(2, q_len, kv_len, 2, dim)
    with pltpu.force_tpu_interpret_mode():
        pallas = jax.jit(lambda q, k, v: layers.fused_attention(q, k, v, "pallas", causal))(q, k, v)
    xla = layers.fused_attention(q, k, v, "xla", causal)
    expected = reference_attention(q, k, v, causal)
    np.testing.assert_allclose(np.asarray(xla), expected, atol=2e-5)
    np.testing.assert_allclose(np.asarray(pallas), expected, atol=2e-5)


def test_pallas_splash_attention_gradient_in_interpret_mode_equals_xla():
    q, k, v = qkv(1, 256, 128, 2, 40, seed=1)
    weights = jax.random.normal(jax.random.PRNGKey(2), q.shape)  # a loss that weighs every output
    grad = lambda backend: jax.jit(jax.grad(lambda q, k, v: (layers.fused_attention(q, k, v, backend) * weights).sum(),
                                            argnums=(0, 1, 2)))(q, k, v)
    with pltpu.force_tpu_interpret_mode():
        pallas = grad("pallas")
    xla = grad("xla")
    for p, x in zip(pallas, xla):
        assert float(jnp.abs(x).max()) > 1e-2  # a gradient that is not trivially zero
        np.testing.assert_allclose(np.asarray(p), np.asarray(x), atol=5e-5)


def assert_chunked_equals_the_reference(qkv_arrays, causal, weight_seed):
    """The ``chunked`` backend's output against float64 numpy, and its gradients (of a loss weighing every
    output) against autodiff of XLA's attention."""
    q, k, v = qkv_arrays
    np.testing.assert_allclose(np.asarray(layers.chunked_attention(q, k, v, causal)), reference_attention(q, k, v, causal),
                               atol=2e-5)
    weights = jax.random.normal(jax.random.PRNGKey(weight_seed), q.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * weights).sum(), argnums=(0, 1, 2)))(q, k, v)
    chunked = grad(lambda q, k, v: layers.chunked_attention(q, k, v, causal))
    xla = grad(lambda q, k, v: layers.fused_attention(q, k, v, "xla", causal))
    for c, x in zip(chunked, xla):
        np.testing.assert_allclose(np.asarray(c), np.asarray(x), atol=5e-5)


SMALL_LOGITS_BUDGET = 2**14  # 16 KiB: these test layers run blocked, as 1,024-token layers do at the real 16 MiB


@pytest.mark.parametrize("q_len,kv_len,causal,budget", [
    (1024, 77, False, SMALL_LOGITS_BUDGET),  # 64 query blocks, one key block (16 does not divide 77)
    (512, 512, True, SMALL_LOGITS_BUDGET),   # causal across blocks of queries and of keys
    (300, 40, False, SMALL_LOGITS_BUDGET),   # no block divides 300: one block, the hand-written backward still
    (77, 384, False, SMALL_LOGITS_BUDGET),   # one query block against several key blocks
    (77, 77, True, None),                    # whole logits within the real budget: unblocked, jax.grad
])
def test_chunked_attention_equals_the_reference_forward_and_gradient(q_len, kv_len, causal, budget, monkeypatch):
    """Forward against float64 numpy; the gradient (the hand-written backward pass where blocked)
    against autodiff of XLA's attention."""
    if budget:
        monkeypatch.setattr(cpu_attention, "LOGITS_BLOCK_BYTES", budget)
    assert_chunked_equals_the_reference(qkv(2, q_len, kv_len, 2, 8, seed=3), causal, weight_seed=4)


@pytest.mark.parametrize("batch,heads,groups", [(4, 8, 2), (5, 8, 2), (3, 16, 3), (1, 8, 1), (64, 8, 4)])
def test_chunked_attention_row_groups(batch, heads, groups):
    """At least 16 (batch row, head) pairs per group, at most 4 groups, a divisor of the batch or the heads."""
    assert cpu_attention.row_groups(batch, heads) == groups


@pytest.mark.parametrize("batch,heads", [(4, 8), (5, 8)])
def test_chunked_attention_in_row_groups_equals_the_reference(batch, heads, monkeypatch):
    """Rows split into independent groups along the batch (4 x 8) or, where the batch does not divide,
    along the heads (5 x 8): same forward and gradient."""
    monkeypatch.setattr(cpu_attention, "LOGITS_BLOCK_BYTES", 2**20)  # blocked, 4 blocks of 64 per group
    assert_chunked_equals_the_reference(qkv(batch, 256, 256, heads, 4, seed=6), False, weight_seed=7)


@pytest.mark.parametrize("batch,heads,other,cap,expected", [(8, 8, 1024, 128, 64), (1, 8, 4096, 128, 128),
                                                            (1, 8, 1024, 64, 64), (64, 16, 4096, 128, 16)])
def test_chunked_attention_block_keeps_one_block_of_logits_within_its_budget(batch, heads, other, cap, expected):
    """The largest power of two up to the cap whose float32 logits fit 16 MiB (64 x 64 x 1024 x 4 B is
    exactly 16 MiB), never under 16 rows."""
    assert cpu_attention.block_length(batch, heads, other, cap) == expected


def test_chunked_attention_runs_blocked_only_where_the_whole_logits_outgrow_the_budget():
    """In the traced program: a loop (``scan``) over blocks for the small config's 1,024-token layer
    (64 x 1024 x 1024 float32 logits, 256 MiB), none for SD1.5's 16x16 layer at 256 px (2 MiB)."""
    loops = lambda *shape: str(jax.make_jaxpr(layers.chunked_attention)(*qkv(*shape))).count("scan[")
    assert loops(8, 1024, 1024, 8, 4) > 0
    assert loops(1, 256, 256, 8, 80) == 0


def test_chunked_attention_in_bfloat16_keeps_float32_logits():
    q, k, v = qkv(1, 512, 77, 2, 16, seed=5)
    out = layers.chunked_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference_attention(q, k, v), atol=3e-2)


def test_multi_head_attention_auto_on_cpu_equals_the_explicit_softmax():
    q, k, v = (t.reshape(t.shape[0], t.shape[1], -1) for t in qkv(2, 512, 77, 4, 8))
    out = layers.multi_head_attention(q, k, v, 4, backend="auto")
    explicit, probs = layers.multi_head_attention(q, k, v, 4, return_probs=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(explicit), atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)


def tiny_unet_inputs():
    config = unet_lib.UNet2DConditionConfig.from_dict({**TINY_UNET, "attention_head_dim": 2})  # 2 heads: a quick interpreter
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((1, 32, 32, 4)), jnp.float32)  # 1,024 tokens: the TPU kernel's shortest layer
    states = jnp.asarray(rng.standard_normal((1, 77, 32)), jnp.float32)
    return config, sample, jnp.array([10]), states


def test_unet_with_pallas_attention_in_interpret_mode_equals_xla(monkeypatch):
    """The backend reaches every attention layer: the tiny UNet's 32x32 self-attention runs the
    Pallas kernel (its 77-key cross-attention and 16x16 layers fall back to XLA) and agrees with XLA;
    record_attention_kernels names each layer's kernel."""
    config, sample, t, states = tiny_unet_inputs()
    xla_unet = unet_lib.UNet2DConditionModel(config, attention_backend="xla")
    shapes = jax.eval_shape(xla_unet.init, jax.random.PRNGKey(0), sample, t, states)  # compiling init is slow
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    expected = jax.jit(xla_unet.apply)(params, sample, t, states)
    calls = []
    fused = layers.fused_attention
    monkeypatch.setattr(layers, "fused_attention", lambda *a, **kw: calls.append(a[3]) or fused(*a, **kw))
    monkeypatch.setattr(layers, "current_platform", lambda: "tpu")
    pallas_unet = unet_lib.UNet2DConditionModel(config, attention_backend="auto")
    with pltpu.force_tpu_interpret_mode(), layers.record_attention_kernels() as kernels:
        out = jax.jit(pallas_unet.apply)(params, sample, t, states)
    # 32x32: down_blocks.0 (one transformer) and up_blocks.1 (two) run attn1 on Pallas, attn2 (77 keys)
    # on XLA; the 16x16 mid block runs both on XLA.
    assert calls.count("pallas") == 3 and calls.count("xla") == 5
    assert kernels == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1": "splash",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1": "splash",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1": "splash",
        **{name: "xla" for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
                                    "mid_block.attentions.0.transformer_blocks.0.attn1",
                                    "mid_block.attentions.0.transformer_blocks.0.attn2")},
    }
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4)


def test_unet_with_a_backend_this_platform_cannot_run_fails_in_one_line():
    config, sample, t, states = tiny_unet_inputs()
    unet = unet_lib.UNet2DConditionModel(config, attention_backend="cudnn")
    with pytest.raises(PlatformError, match=r"^attention backend 'cudnn' needs a GPU, this is cpu"):
        jax.eval_shape(unet.init, jax.random.PRNGKey(0), sample, t, states)


@pytest.mark.heavy(17)
def test_loading_with_a_backend_this_platform_cannot_run_fails_before_reading_weights(tmp_path):
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.models.tiny import make_tiny_model

    model_dir = make_tiny_model(str(tmp_path / "tiny"))
    for name in ("diffusion_pytorch_model.safetensors",):  # no UNet weights: only the config can be read
        (tmp_path / "tiny" / "unet" / name).unlink()
    with pytest.raises(PlatformError, match=r"^attention backend 'pallas' \(TPU splash attention\) needs a TPU, this is cpu"):
        load_pretrained(model_dir, attention_backend="pallas")
    assert load_pretrained(model_dir, components=("text_encoder",), attention_backend="pallas").unet is None


def test_splash_runs_per_device_under_shard_map_over_the_data_axis():
    """On a mesh (8 CPU devices here, as a slice's chips) the Mosaic kernel, which XLA cannot partition, is
    wrapped in shard_map over ``data`` (each device attends over its own examples); with a batch the axis does
    not divide, or no mesh, it is called as is. Lowered only: the interpreter under shard_map is the
    TPU compile test's business (tests/test_tpu_compile.py compiles it for v5e:2x4)."""
    from jax_inversion.core.sharding import make_mesh

    mesh = make_mesh()
    lower = lambda batch: jax.jit(lambda q, k, v: layers.fused_attention(q, k, v, "pallas")).lower(
        *qkv(batch, 256, 256, 2, 40)).as_text()
    with pltpu.force_tpu_interpret_mode():
        with jax.set_mesh(mesh):
            sharded, odd = lower(len(mesh.devices)), lower(len(mesh.devices) + 1)
        alone = lower(len(mesh.devices))
    assert "manual_computation" in sharded and '"data"' in sharded
    assert "manual_computation" not in odd and "manual_computation" not in alone

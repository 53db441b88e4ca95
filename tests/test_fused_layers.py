"""Fused q/k/v projections equal the separate ``nn.Dense`` formula on the same params, with the same
param tree; norms take the one-pass variance only in bf16/fp16, where it is within bf16 rounding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.models.clip import CLIPAttention, CLIPTextConfig
from jax_inversion.models.layers import group_norm, layer_norm, multi_head_attention, one_pass_variance
from jax_inversion.models.unet import Attention, Conditioning
from jax_inversion.models.vae import VAEAttention

HEADS, HEAD_DIM, TEXT_DIM = 2, 8, 24


class SeparateProjections(nn.Module):
    """The unfused formula: one ``nn.Dense`` per projection, named as diffusers/transformers name them."""

    names: tuple  # (q, k, v, out)
    features: int
    use_bias: bool
    heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x, key_states=None, value_states=None):
        dense = lambda name, features=self.features: nn.Dense(features, use_bias=self.use_bias, name=name)
        key_states = x if key_states is None else key_states
        value_states = key_states if value_states is None else value_states
        q_name, k_name, v_name, out_name = self.names
        q, k, v = dense(q_name)(x), dense(k_name)(key_states), dense(v_name)(value_states)
        out = multi_head_attention(q, k, v, self.heads, causal=self.causal, backend="xla")
        return nn.Dense(x.shape[-1], name=out_name)(out)


UNET_NAMES = ("to_q", "to_k", "to_v", "to_out_0")


def _dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def _check(fused, separate, fused_args, separate_args, saved_dots):
    """Same param tree (names, shapes, init values), same output within fp32 rounding, fewer matmuls."""
    params = fused.init(jax.random.PRNGKey(0), *fused_args)
    reference = separate.init(jax.random.PRNGKey(0), *separate_args)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)
    out = fused.apply(params, *fused_args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(separate.apply(params, *separate_args)), atol=1e-5, rtol=1e-5)
    assert _dots(lambda *a: fused.apply(params, *a), *fused_args) == _dots(lambda *a: separate.apply(params, *a), *separate_args) - saved_dots


def _arrays(*shapes):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes]


def test_unet_self_attention_is_one_qkv_matmul():
    (x,) = _arrays((2, 16, HEADS * HEAD_DIM))
    fused = Attention(HEADS, HEAD_DIM, cross=False, attention_backend="xla")
    _check(fused, SeparateProjections(UNET_NAMES, HEADS * HEAD_DIM, False, HEADS), (x,), (x,), saved_dots=2)


def test_unet_cross_attention_is_one_kv_matmul_for_one_state():
    x, states = _arrays((2, 16, HEADS * HEAD_DIM), (2, 7, TEXT_DIM))
    fused = Attention(HEADS, HEAD_DIM, cross=True, attention_backend="xla")
    separate = SeparateProjections(UNET_NAMES, HEADS * HEAD_DIM, False, HEADS)
    _check(fused, separate, (x, Conditioning(states)), (x, states), saved_dots=1)


def test_unet_cross_attention_with_separate_value_states_keeps_two_matmuls():
    x, states, values = _arrays((2, 16, HEADS * HEAD_DIM), (2, 7, TEXT_DIM), (2, 7, TEXT_DIM))
    fused = Attention(HEADS, HEAD_DIM, cross=True, attention_backend="xla")
    separate = SeparateProjections(UNET_NAMES, HEADS * HEAD_DIM, False, HEADS)
    _check(fused, separate, (x, Conditioning(states, value_states=values)), (x, states, values), saved_dots=0)


def test_clip_attention_is_one_qkv_matmul():
    config = CLIPTextConfig(hidden_size=32, num_attention_heads=4)
    (x,) = _arrays((2, 9, 32))
    separate = SeparateProjections(("q_proj", "k_proj", "v_proj", "out_proj"), 32, True, 4, causal=True)
    _check(CLIPAttention(config), separate, (x,), (x,), saved_dots=2)


class SeparateVAEAttention(nn.Module):
    """:class:`VAEAttention` before fusion (setup-named ``to_q``/``to_k``/``to_v``/``to_out_0``)."""

    channels: int
    groups: int

    def setup(self):
        self.group_norm = group_norm(self.groups, 1e-6, jnp.float32)
        self.to_q, self.to_k, self.to_v = (nn.Dense(self.channels) for _ in range(3))
        self.to_out = [nn.Dense(self.channels)]

    def __call__(self, x):
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        out = multi_head_attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1, upcast=True)
        return self.to_out[0](out).reshape(batch, height, width, channels) + x


def test_vae_attention_is_one_qkv_matmul():
    (x,) = _arrays((2, 4, 4, 16))
    _check(VAEAttention(16, 4), SeparateVAEAttention(16, 4), (x,), (x,), saved_dots=2)


@pytest.mark.parametrize("dtype,one_pass", [(jnp.float32, False), (jnp.bfloat16, True), (jnp.float16, True)])
def test_one_pass_variance_only_below_float32(dtype, one_pass):
    assert one_pass_variance(dtype) is one_pass
    assert group_norm(4, 1e-5, dtype).use_fast_variance is one_pass
    assert layer_norm(1e-5, dtype).use_fast_variance is one_pass


@pytest.mark.parametrize("make,shape", [(lambda dtype: group_norm(4, 1e-5, dtype), (2, 8, 8, 32)),
                                        (lambda dtype: layer_norm(1e-5, dtype), (2, 16, 32))])
def test_bfloat16_one_pass_norm_is_within_bfloat16_rounding_of_float32_two_pass(make, shape):
    """Inputs with a mean 4x their spread (where one pass loses most); the bf16 one-pass output is as
    close to the fp32 two-pass reference as bf16's own two-pass output is."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(4.0 + rng.standard_normal(shape), jnp.bfloat16)
    module = make(jnp.bfloat16)
    params = module.init(jax.random.PRNGKey(0), x)
    reference = np.asarray(make(jnp.float32).apply(params, x.astype(jnp.float32)))
    one_pass = np.asarray(module.apply(params, x), np.float32)
    two_pass = np.asarray(module.clone(use_fast_variance=False).apply(params, x), np.float32)
    np.testing.assert_allclose(one_pass, reference, atol=2e-2, rtol=1e-2)
    assert np.abs(one_pass - reference).max() <= 1.1 * np.abs(two_pass - reference).max()

"""UNet behaviour beyond parity: attention maps, fused vs explicit attention, conditioning routes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.models.loading import load_pretrained
from jax_inversion.models.unet import (
    Conditioning,
    UNet2DConditionConfig,
    collect_attention_maps,
    cross_attention_layers,
)


@pytest.fixture(scope="module")
def sd2(tiny_sd2):
    return load_pretrained(tiny_sd2, components=("unet",))


def _inputs(cfg, seed=0, batch=2, size=16, length=7):
    rng = np.random.default_rng(seed)
    sample = jnp.asarray(rng.standard_normal((batch, size, size, cfg.in_channels)), jnp.float32)
    states = jnp.asarray(rng.standard_normal((batch, length, cfg.cross_attention_dim[0])), jnp.float32)
    return sample, jnp.asarray([3, 700]), states


def test_layer_names_match_diffusers(tiny_sd2, sd2):
    from diffusers import UNet2DConditionModel

    torch_unet = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet")
    torch_names = {name for name, _ in torch_unet.named_modules() if name.endswith("attn2")}
    ours = cross_attention_layers(sd2.unet.config, 16)
    assert set(ours) == torch_names
    assert ours["mid_block.attentions.0.transformer_blocks.0.attn2"] == 4
    assert ours["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 16


def test_attention_maps_sum_to_one_and_fused_path_matches(sd2):
    sample, t, states = _inputs(sd2.unet.config)
    layers = cross_attention_layers(sd2.unet.config, 16)
    apply = jax.jit(sd2.unet.apply, static_argnames=("mutable",))
    fused = apply({"params": sd2.unet_params}, sample, t, states)
    explicit, collections = apply(
        {"params": sd2.unet_params}, sample, t, Conditioning(states, capture_maps=tuple(layers)), mutable=("attention_maps",)
    )
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(fused), atol=1e-5, rtol=0)
    maps = collect_attention_maps(collections["attention_maps"])
    assert set(maps) == set(layers)
    for name, probs in maps.items():
        side = layers[name]
        heads = probs.shape[1]
        assert probs.shape == (2, heads, side * side, states.shape[1])
        np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)
        assert float(probs.min()) >= 0.0


def test_no_maps_collected_by_default(sd2):
    sample, t, states = _inputs(sd2.unet.config)
    apply = jax.jit(sd2.unet.apply, static_argnames=("mutable",))  # one compile, not one per op
    _, collections = apply({"params": sd2.unet_params}, sample, t, states, mutable=("attention_maps",))
    assert not collections.get("attention_maps")


@pytest.mark.heavy(24)
def test_separate_key_value_states_and_per_layer_override(sd2):
    sample, t, states = _inputs(sd2.unet.config)
    other = states[:, ::-1] * 0.5
    params = {"params": sd2.unet_params}
    apply = jax.jit(sd2.unet.apply)
    base = apply(params, sample, t, states)
    np.testing.assert_array_equal(np.asarray(apply(params, sample, t, Conditioning(states, value_states=states))), np.asarray(base))
    values_only = apply(params, sample, t, Conditioning(states, value_states=other))
    keys_only = apply(params, sample, t, Conditioning(other, value_states=states))
    both = apply(params, sample, t, other)
    for out in (values_only, keys_only):
        assert float(jnp.abs(out - base).max()) > 1e-3 and float(jnp.abs(out - both).max()) > 1e-3
    # Overriding every layer with (other, other) equals passing other everywhere.
    everywhere = {name: (other, other) for name in cross_attention_layers(sd2.unet.config, 16)}
    np.testing.assert_allclose(np.asarray(apply(params, sample, t, Conditioning(states, layer_states=everywhere))), np.asarray(both), atol=1e-6)
    # Overriding one layer changes the output, but less than overriding all of them.
    one = {"mid_block.attentions.0.transformer_blocks.0.attn2": (other, other)}
    single = apply(params, sample, t, Conditioning(states, layer_states=one))
    change = lambda out: float(jnp.abs(out - base).mean())
    assert 0 < change(single) < change(both), (change(single), change(both))


def test_value_states_match_torch_attention(tiny_sd2, sd2):
    """Keys from one encoder state and values from another, checked against diffusers' Attention."""
    import torch
    from diffusers import UNet2DConditionModel

    torch_unet = UNet2DConditionModel.from_pretrained(tiny_sd2, subfolder="unet").eval()
    sample, t, states = _inputs(sd2.unet.config, seed=1)
    values = states * -0.7 + 0.1
    value_tensor = torch.from_numpy(np.asarray(values))

    class KeyValueProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            q = attn.to_q(hidden_states)
            k = attn.to_k(encoder_hidden_states)
            v = attn.to_v(value_tensor)
            b = q.shape[0]
            split = lambda x: x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            out = out.transpose(1, 2).reshape(b, -1, q.shape[-1])
            return attn.to_out[0](out)

    from diffusers.models.attention_processor import AttnProcessor2_0

    torch_unet.set_attn_processor(
        {name: KeyValueProcessor() if ".attn2." in name else AttnProcessor2_0() for name in torch_unet.attn_processors}
    )
    with torch.no_grad():
        ref = torch_unet(
            torch.from_numpy(np.asarray(sample).transpose(0, 3, 1, 2)),
            torch.from_numpy(np.asarray(t)),
            torch.from_numpy(np.asarray(states)),
        ).sample.numpy()
    ours = jax.jit(sd2.unet.apply)({"params": sd2.unet_params}, sample, t, Conditioning(states, value_states=values))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)


def test_unsupported_config_is_a_clear_error():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionConfig.from_dict({"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionConfig.from_dict({"down_block_types": ["SimpleCrossAttnDownBlock2D"]})

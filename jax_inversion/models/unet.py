"""Flax UNet2DConditionModel for the Stable Diffusion family (SD 1.x, 2.x; SDXL add-embeds).

Module names mirror diffusers' so checkpoints convert by name (see ``convert.py``).
Layout is NHWC. Cross-attention takes a :class:`Conditioning`, which lets callers give
keys and values separate encoder states, override them per layer, and ask for the
attention probability maps of chosen layers (returned via the ``attention_maps``
collection; off by default). Layers not asked for maps run the kernel of the module's
``attention_backend`` (``auto``: cuDNN flash attention on GPU in bf16/fp16, Pallas flash attention
on TPU, query-chunked XLA attention on CPU, XLA's attention otherwise; see :mod:`jax_inversion.core.platform`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_inversion.models.convert import module_path_to_torch_name
from jax_inversion.models.layers import (
    DenseParams,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    fused_dense,
    group_norm,
    layer_norm,
    multi_head_attention,
)

Dtype = Any

_SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_SUPPORTED_MID = ("UNetMidBlock2DCrossAttn",)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """The fields of diffusers' ``unet/config.json`` that define SD 1.x/2.x/XL UNets."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple = (768,) * 4
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    num_attention_heads: tuple = (8, 8, 8, 8)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    prediction_type: str = "epsilon"  # filled from the scheduler config by the loader

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNet2DConditionConfig":
        """Reads a diffusers config dict; unsupported features are a clear error."""
        n = len(d.get("down_block_types", cls.down_block_types))
        unsupported = {
            "act_fn": ("silu", None),
            "class_embed_type": (None,),
            "encoder_hid_dim_type": (None,),
            "time_embedding_type": ("positional", None),
            "resnet_time_scale_shift": ("default", None),
            "dual_cross_attention": (False, None),
            "attention_type": ("default", None),
            "timestep_post_act": (None,),
            "time_cond_proj_dim": (None,),
            "addition_embed_type": (None, "text_time"),
            "only_cross_attention": (False, None),
        }
        for key, allowed in unsupported.items():
            if d.get(key) not in allowed:
                raise ValueError(f"unet config {key}={d.get(key)!r} is not supported (supported: {allowed})")
        for name in d.get("down_block_types", ()):
            if name not in _SUPPORTED_DOWN:
                raise ValueError(f"unet down block {name!r} is not supported (supported: {_SUPPORTED_DOWN})")
        for name in d.get("up_block_types", ()):
            if name not in _SUPPORTED_UP:
                raise ValueError(f"unet up block {name!r} is not supported (supported: {_SUPPORTED_UP})")
        if d.get("mid_block_type", cls.mid_block_type) not in _SUPPORTED_MID:
            raise ValueError(f"unet mid block {d.get('mid_block_type')!r} is not supported")
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' naming quirk
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
        kwargs.update(
            down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            block_out_channels=tuple(d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=_per_block(d.get("layers_per_block", 2), n),
            cross_attention_dim=_per_block(d.get("cross_attention_dim", 1280), n),
            transformer_layers_per_block=_per_block(d.get("transformer_layers_per_block", 1), n),
            num_attention_heads=_per_block(heads, n),
        )
        if any(isinstance(t, (list, tuple)) for t in kwargs["transformer_layers_per_block"]):
            raise ValueError("unet config transformer_layers_per_block as nested lists is not supported")
        return cls(**kwargs)


@flax.struct.dataclass
class Conditioning:
    """Encoder states for every cross-attention layer.

    ``states`` feed keys and values; ``value_states`` (same shape) replaces them for values
    only. ``layer_states`` maps a layer name (diffusers-style, e.g.
    ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``) to its own
    ``(key_states, value_states)``. ``capture_maps`` names the layers whose probability
    maps ``[B, heads, H*W, L]`` are sown into the ``attention_maps`` collection.
    """

    states: jax.Array
    value_states: Optional[jax.Array] = None
    layer_states: Optional[dict] = None
    capture_maps: tuple = flax.struct.field(pytree_node=False, default=())

    def for_layer(self, name: str):
        if self.layer_states is not None and name in self.layer_states:
            return self.layer_states[name]
        return self.states, self.states if self.value_states is None else self.value_states


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding, identical to diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class Attention(nn.Module):
    """diffusers ``Attention`` (no q/k/v bias); cross-attention when ``cross`` is set.

    The projections share matmuls: self-attention computes q, k and v as one matmul against
    ``[W_q | W_k | W_v]``, cross-attention k and v as one against ``[W_k | W_v]`` when keys and
    values come from the same states (two matmuls when ``value_states`` differ). The params are
    diffusers' separate ``to_q``/``to_k``/``to_v`` kernels, unchanged (see ``fused_dense``).
    """

    heads: int
    head_dim: int
    cross: bool
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"  # see jax_inversion.core.platform

    @nn.compact
    def __call__(self, x: jax.Array, conditioning: Optional[Conditioning] = None) -> jax.Array:
        inner = self.heads * self.head_dim
        to_q, to_k, to_v = (DenseParams(inner, use_bias=False, name=name) for name in ("to_q", "to_k", "to_v"))
        project = lambda states, *layers: fused_dense(states, layers, self.dtype)
        if self.cross:
            name = module_path_to_torch_name(self.scope.path)
            key_states, value_states = conditioning.for_layer(name)
            capture = name in conditioning.capture_maps
            (q,) = project(x, to_q)
            if key_states is value_states:
                k, v = project(key_states, to_k, to_v)
            else:
                (k,), (v,) = project(key_states, to_k), project(value_states, to_v)
        else:
            capture = False
            q, k, v = project(x, to_q, to_k, to_v)
        if capture:
            out, probs = multi_head_attention(q, k, v, self.heads, return_probs=True, upcast=self.upcast)
            self.sow("attention_maps", "probs", probs)
        else:
            layer = module_path_to_torch_name(self.scope.path)  # named in record_attention_kernels()
            out = multi_head_attention(q, k, v, self.heads, upcast=self.upcast, backend=self.attention_backend, layer=layer)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLUProj(nn.Module):
    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.inner * 2, dtype=self.dtype, name="proj")(x)


class FeedForward(nn.Module):
    """``ff.net.0.proj`` (GEGLU, 4x) then ``ff.net.2``."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        hidden, gate = jnp.split(GEGLUProj(dim * 4, dtype=self.dtype, name="net_0")(x), 2, axis=-1)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(hidden * nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nn.Module):
    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"

    @nn.compact
    def __call__(self, x, conditioning: Conditioning):
        norm = lambda name: layer_norm(1e-5, self.dtype, name)
        attn = lambda name, cross: Attention(self.heads, self.head_dim, cross, self.upcast, self.dtype, self.attention_backend, name=name)
        x = x + attn("attn1", False)(norm("norm1")(x))
        x = x + attn("attn2", True)(norm("norm2")(x), conditioning)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


# The blocks ``remat_blocks`` checkpoints one by one (same params and names: ``nn.remat`` only changes the backward pass).
RematBasicTransformerBlock = nn.remat(BasicTransformerBlock)
RematResnetBlock2D = nn.remat(ResnetBlock2D)


class Transformer2DModel(nn.Module):
    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat_blocks: bool = False  # recompute each transformer block in the backward pass (see UNet2DConditionModel)

    @nn.compact
    def __call__(self, x, conditioning: Conditioning):
        batch, height, width, channels = x.shape
        head_dim = channels // self.heads
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = conv(channels, 1, self.dtype, "proj_in")(h).reshape(batch, height * width, channels)
        block_class = RematBasicTransformerBlock if self.remat_blocks else BasicTransformerBlock
        for i in range(self.num_layers):
            block = block_class(
                self.heads, head_dim, self.upcast, self.dtype, self.attention_backend, name=f"transformer_blocks_{i}"
            )
            h = block(h, conditioning)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = conv(channels, 1, self.dtype, "proj_out")(h.reshape(batch, height, width, channels))
        return h + x


def _transformer(cfg: UNet2DConditionConfig, heads: int, layers: int, name: str, dtype, backend: str,
                 remat_blocks: bool = False) -> Transformer2DModel:
    return Transformer2DModel(
        heads, layers, cfg.norm_num_groups, cfg.use_linear_projection, cfg.upcast_attention, dtype, backend, remat_blocks,
        name=name,
    )


def _resnet(cfg: UNet2DConditionConfig, out: int, name: str, dtype, scale: float = 1.0, remat_blocks: bool = False):
    block_class = RematResnetBlock2D if remat_blocks else ResnetBlock2D
    return block_class(out, cfg.norm_num_groups, cfg.norm_eps, scale, dtype, name=name)


class DownBlock(nn.Module):
    config: UNet2DConditionConfig
    index: int
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat_blocks: bool = False

    @nn.compact
    def __call__(self, x, temb, conditioning):
        cfg, i = self.config, self.index
        out = cfg.block_out_channels[i]
        has_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(cfg.layers_per_block[i]):
            x = _resnet(cfg, out, f"resnets_{j}", self.dtype, remat_blocks=self.remat_blocks)(x, temb)
            if has_attention:
                layers = cfg.transformer_layers_per_block[i]
                x = _transformer(cfg, cfg.num_attention_heads[i], layers, f"attentions_{j}", self.dtype, self.attention_backend,
                                 self.remat_blocks)(
                    x, conditioning
                )
            skips.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(out, cfg.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat_blocks: bool = False

    @nn.compact
    def __call__(self, x, temb, conditioning):
        cfg = self.config
        out = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        x = _resnet(cfg, out, "resnets_0", self.dtype, scale, self.remat_blocks)(x, temb)
        layers = cfg.transformer_layers_per_block[-1]
        transformer = _transformer(cfg, cfg.num_attention_heads[-1], layers, "attentions_0", self.dtype, self.attention_backend,
                                   self.remat_blocks)
        x = transformer(x, conditioning)
        return _resnet(cfg, out, "resnets_1", self.dtype, scale, self.remat_blocks)(x, temb)


class UpBlock(nn.Module):
    config: UNet2DConditionConfig
    index: int
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"
    remat_blocks: bool = False

    @nn.compact
    def __call__(self, x, skips, temb, conditioning):
        cfg, i = self.config, self.index
        rev = lambda values: tuple(reversed(values))
        out = rev(cfg.block_out_channels)[i]
        has_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        skips = list(skips)
        for j in range(rev(cfg.layers_per_block)[i] + 1):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _resnet(cfg, out, f"resnets_{j}", self.dtype, remat_blocks=self.remat_blocks)(x, temb)
            if has_attention:
                heads = rev(cfg.num_attention_heads)[i]
                layers = rev(cfg.transformer_layers_per_block)[i]
                x = _transformer(cfg, heads, layers, f"attentions_{j}", self.dtype, self.attention_backend, self.remat_blocks)(
                    x, conditioning)
        if i < len(cfg.block_out_channels) - 1:
            x = Upsample2D(out, self.dtype, name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    """Predicts noise (or v) for NHWC latents ``[B, h, w, C]`` at ``timesteps`` ``[B]``.

    ``conditioning`` is a :class:`Conditioning` or a plain ``[B, L, D]`` array of encoder
    states. ``added_cond`` carries SDXL's ``text_embeds`` and ``time_ids``.
    """

    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    attention_backend: str = "auto"  # auto, xla, chunked, cudnn or pallas: see jax_inversion.core.platform
    # Recompute each ResNet and transformer block in the backward pass, keeping only the blocks' inputs
    # (``train.remat=blocks``): the peak holds one block's activations, not the whole UNet's.
    remat_blocks: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        conditioning: Union[Conditioning, jax.Array],
        added_cond: Optional[Mapping[str, jax.Array]] = None,
    ) -> jax.Array:
        cfg = self.config
        if not isinstance(conditioning, Conditioning):
            conditioning = Conditioning(conditioning)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        t = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.block_out_channels[0] * 4, self.dtype, name="time_embedding")(t.astype(self.dtype))
        if cfg.addition_embed_type == "text_time":
            if added_cond is None:
                raise ValueError("this UNet (SDXL) needs added_cond={'text_embeds', 'time_ids'}")
            time_ids = added_cond["time_ids"]
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
            ).reshape(time_ids.shape[0], -1)
            add = jnp.concatenate([added_cond["text_embeds"], time_embeds], axis=-1).astype(self.dtype)
            temb = temb + TimestepEmbedding(temb.shape[-1], self.dtype, name="add_embedding")(add)

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, self.dtype, "conv_in")(x)
        skips = [x]
        for i in range(len(cfg.down_block_types)):
            x, block_skips = DownBlock(cfg, i, self.dtype, self.attention_backend, self.remat_blocks, name=f"down_blocks_{i}")(x, temb, conditioning)
            skips += block_skips
        x = MidBlock(cfg, self.dtype, self.attention_backend, self.remat_blocks, name="mid_block")(x, temb, conditioning)
        for i in range(len(cfg.up_block_types)):
            n = tuple(reversed(cfg.layers_per_block))[i] + 1
            x = UpBlock(cfg, i, self.dtype, self.attention_backend, self.remat_blocks, name=f"up_blocks_{i}")(x, skips[-n:], temb, conditioning)
            skips = skips[:-n]
        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, cfg.conv_out_kernel, self.dtype, "conv_out")(x)


def cross_attention_layers(config: UNet2DConditionConfig, latent_size: int) -> dict[str, int]:
    """Every cross-attention layer's name -> the side of its (square) feature map."""
    layers: dict[str, int] = {}
    n_blocks = len(config.block_out_channels)
    size = latent_size
    for i, kind in enumerate(config.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            for j in range(config.layers_per_block[i]):
                for k in range(config.transformer_layers_per_block[i]):
                    layers[f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"] = size
        if i < n_blocks - 1:
            size = (size + 1) // 2
    for k in range(config.transformer_layers_per_block[-1]):
        layers[f"mid_block.attentions.0.transformer_blocks.{k}.attn2"] = size
    rev = lambda values: tuple(reversed(values))
    for i, kind in enumerate(config.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            for j in range(rev(config.layers_per_block)[i] + 1):
                for k in range(rev(config.transformer_layers_per_block)[i]):
                    layers[f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"] = size
        if i < n_blocks - 1:
            size *= 2
    return layers


def collect_attention_maps(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The ``attention_maps`` collection -> ``{layer name: probs [B, heads, HW, L]}``."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(collection))
    return {module_path_to_torch_name(path[:-1]): value[0] for path, value in flat.items()}


def init_abstract_params(module: UNet2DConditionModel, latent_size: int = 8, text_len: int = 77):
    """Shapes of the ``params`` tree (no compute), for checkpoint conversion."""
    cfg = module.config
    sample = jnp.zeros((1, latent_size, latent_size, cfg.in_channels))
    states = jnp.zeros((1, text_len, cfg.cross_attention_dim[0]))
    added = None
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, text_dim)), "time_ids": jnp.zeros((1, 6))}
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), sample, jnp.zeros((1,)), states, added))
    return shapes["params"]

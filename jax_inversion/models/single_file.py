"""Single-file Stable Diffusion checkpoints (A1111, kohya, Civitai): the original LDM / SGM key layout.

One ``.safetensors`` (or ``.ckpt``) holds every component under its original prefix:

- UNet ``model.diffusion_model.*``, VAE ``first_stage_model.*`` (all three families);
- SD 1.x: text encoder ``cond_stage_model.transformer.*`` (transformers' CLIP layout);
- SD 2.x: ``cond_stage_model.model.*`` (OpenCLIP: fused q/k/v ``in_proj``, ``resblocks``);
- SDXL: ``conditioner.embedders.0.transformer.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
  (OpenCLIP bigG, with its ``text_projection``).

:func:`read_single_file` infers the family and the architecture from the tensors' names and shapes
(block widths from shapes, layers per block and transformer depths by counting, context width, linear
vs 1x1-conv projections), optionally from an original LDM config yaml (see :func:`find_original_config`),
and maps the keys to the diffusers layout that ``loading.load_pretrained`` converts like a diffusers
directory. The key map is diffusers' published one (``diffusers/loaders/single_file_utils.py``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), reimplemented here in numpy; weights are read lazily, one
component at a time, and only the header with ``shapes_only``.

What the keys cannot say, and the rules used (the yaml, where present, wins):

- attention heads: SD 1.x 8 per block (v1-inference.yaml ``num_heads: 8``); SD 2.x and SDXL 64 channels per
  head (``num_head_channels: 64``); text encoders 64 channels per head (CLIP-L 12, OpenCLIP-H 16, bigG 20);
- prediction type: the yaml's ``parameterization: "v"`` (SGM: a ``VScaling`` denoiser) is v-prediction, a
  yaml without it epsilon; without a yaml SD 2.x is v-prediction unless the ``.ckpt`` says
  ``global_step`` 875000 (SD 2.0-base), diffusers' heuristic; SD 1.x and SDXL epsilon, except a file with
  a ``v_pred`` key (ComfyUI's marker for v-prediction SDXL finetunes);
- noise schedule: scaled_linear betas 0.00085..0.012 over 1000 steps (the yaml's ``linear_start``,
  ``linear_end``, ``timesteps`` where given);
- VAE scaling factor: the yaml's ``scale_factor``, else 0.18215 (SD 1/2) or 0.13025 (SDXL);
- default image side: SD 1.x 512, SD 2.x 768 for v-prediction else 512, SDXL 1024;
- SD 2.x: attention upcast to float32 (diffusers' SD 2.1 config) and its text encoder's 24th layer dropped
  (SD 2 conditions on the penultimate layer; diffusers' ``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``);
- norm groups 32 everywhere (LDM hardcodes them).

An original yaml may carry one extra top-level section, ``diffusers:``, ignored by LDM: fields of the
inferred diffusers configs to override per component (``unet``, ``vae``, ``text_encoder``,
``text_encoder_2``, ``scheduler``), for models unlike the released ones in what neither keys nor the LDM
yaml record (norm groups, text-encoder heads), e.g. tiny test models.

A single file holds no tokenizer; :func:`resolve_tokenizers` says where it comes from.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Mapping, Optional

import numpy as np

from jax_inversion.core.errors import ModelLoadError

SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# component -> (key prefix, layout) per family
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
    },
}
IMAGE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
SCALING_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
SD2_BASE_GLOBAL_STEP = 875000  # SD 2.0-base (512 px, epsilon): diffusers' one exception to v-prediction for SD 2
# Local Hugging Face cache entries tried for a missing tokenizer, in order: (repo, subfolder).
HUB_TOKENIZERS = {
    "sd1": {"tokenizer": (("openai/clip-vit-large-patch14", ""),
                          ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                          ("runwayml/stable-diffusion-v1-5", "tokenizer"))},
    "sd2": {"tokenizer": (("stabilityai/stable-diffusion-2-1", "tokenizer"),
                          ("stabilityai/stable-diffusion-2", "tokenizer"),
                          ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ""))},
    "sdxl": {"tokenizer": (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                           ("openai/clip-vit-large-patch14", "")),
             "tokenizer_2": (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                             ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""))},
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.json")


def is_single_file(path: str) -> bool:
    """A path naming a single-file checkpoint (by its suffix; ``.pt`` files are embeddings, not models)."""
    return isinstance(path, str) and path.lower().endswith(SUFFIXES) and not os.path.isdir(path)


# --------------------------------------------------------------------------------------------
# Reading tensors: names and shapes first, values one component at a time.
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _Tensors:
    """A checkpoint's tensors: ``shapes`` (name -> shape) at once, ``get`` (float32 for floats) on demand."""

    shapes: dict[str, tuple[int, ...]]
    global_step: Optional[int] = None

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError


class _SafetensorsFile(_Tensors):
    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if not 2 <= length <= 100_000_000:
                    raise ValueError(f"header length {length}")
                header = json.loads(f.read(length))
            self._file = safe_open(path, framework="numpy")  # validates the whole header against the file
        except Exception as e:
            raise ModelLoadError(
                f"cannot read {path} as safetensors ({type(e).__name__}: {str(e)[:120]}): the file is corrupt, "
                "truncated or not a safetensors file; download it again"
            ) from None
        self._data_start = 8 + length
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.shapes = {k: tuple(v["shape"]) for k, v in self._entries.items()}

    def get(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        if entry["dtype"] == "BF16":  # numpy has no bfloat16: widen the raw bits to float32
            start, end = entry["data_offsets"]
            raw = np.fromfile(self.path, dtype="<u2", count=(end - start) // 2, offset=self._data_start + start)
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{self.path}: tensor {key} has dtype {entry['dtype']}, which cannot be read; "
                                 "save the checkpoint in float16, bfloat16 or float32")
        value = self._file.get_tensor(key)
        return value.astype(np.float32) if value.dtype.kind == "f" and value.dtype != np.float32 else value


class _TorchFile(_Tensors):
    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise ModelLoadError(
                f"{path} is a PyTorch .ckpt and torch is not installed: convert it to safetensors, or `pip install torch`"
            ) from None
        try:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
        except Exception as e:
            raise ModelLoadError(
                f"cannot read {path} safely ({type(e).__name__}: it holds pickled objects other than tensors, or is "
                "not a PyTorch checkpoint): convert it to safetensors with a tool you trust, or download the "
                ".safetensors release"
            ) from None
        if not isinstance(loaded, Mapping):
            raise ModelLoadError(f"{path} holds a {type(loaded).__name__}, not a state dict: it is not an SD checkpoint")
        try:  # Lightning's step counter: diffusers' hint for SD 2.0-base (see SD2_BASE_GLOBAL_STEP)
            self.global_step = int(loaded["global_step"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            self.global_step = None
        while isinstance(loaded.get("state_dict"), Mapping):  # Lightning checkpoints nest the weights (sometimes twice)
            loaded = loaded["state_dict"]
        self._tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def get(self, key: str) -> np.ndarray:
        value = self._tensors[key]
        return value.float().numpy() if value.is_floating_point() else value.numpy()


def open_tensors(path: str) -> _Tensors:
    if not os.path.exists(path):
        raise ModelLoadError(f"model file {path} does not exist: give a .safetensors/.ckpt checkpoint or a diffusers directory")
    if path.lower().endswith(".ckpt"):
        return _TorchFile(path)
    return _SafetensorsFile(path)


# --------------------------------------------------------------------------------------------
# Key maps: diffusers key -> (file key, op); op None, "squeeze" (1x1 conv -> linear), "T", or (row0, row1).
# --------------------------------------------------------------------------------------------

_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
}
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))


def _rename(rest: str, table) -> Optional[str]:
    for old, new in table:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def _unet_key(key: str, layers: int) -> Optional[str]:
    """One LDM UNet key (prefix stripped) -> its diffusers name; None for a key no SD UNet has."""
    fixed = _rename(key, _UNET_FIXED.items())
    if fixed is not None:
        return fixed
    parts = key.split(".", 3)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    if parts[0] == "middle_block":
        j, rest = int(parts[1]), ".".join(parts[2:])
        if j in (0, 2):
            resnet = _rename(rest, _UNET_RESNET)
            return resnet and f"mid_block.resnets.{j // 2}.{resnet}"
        return f"mid_block.attentions.0.{rest}" if j == 1 else None
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    i, j, rest = int(parts[1]), int(parts[2]), parts[3]
    if parts[0] == "input_blocks" and i >= 1:
        level, index = divmod(i - 1, layers + 1)
        if index == layers:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if j == 0 and rest.startswith("op.") else None
        if j == 0:
            resnet = _rename(rest, _UNET_RESNET)
            return resnet and f"down_blocks.{level}.resnets.{index}.{resnet}"
        return f"down_blocks.{level}.attentions.{index}.{rest}" if j == 1 else None
    if parts[0] == "output_blocks":
        level, index = divmod(i, layers + 1)
        if j == 0:
            resnet = _rename(rest, _UNET_RESNET)
            return resnet and f"up_blocks.{level}.resnets.{index}.{resnet}"
        if j in (1, 2) and rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        return f"up_blocks.{level}.attentions.{index}.{rest}" if j == 1 else None
    return None


_VAE_FIXED = (("encoder.norm_out", "encoder.conv_norm_out"), ("decoder.norm_out", "decoder.conv_norm_out"),
              ("encoder.conv_in", "encoder.conv_in"), ("encoder.conv_out", "encoder.conv_out"),
              ("decoder.conv_in", "decoder.conv_in"), ("decoder.conv_out", "decoder.conv_out"),
              ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"))
_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))


def _vae_key(key: str, levels: int) -> tuple[Optional[str], Any]:
    fixed = _rename(key, _VAE_FIXED)
    if fixed is not None:
        return fixed, None
    parts = key.split(".")
    if len(parts) < 4 or parts[0] not in ("encoder", "decoder"):
        return None, None
    side = parts[0]
    if parts[1] == "mid":
        rest = ".".join(parts[3:])
        if parts[2] in ("block_1", "block_2"):
            return f"{side}.mid_block.resnets.{int(parts[2][-1]) - 1}.{rest}", None
        if parts[2] == "attn_1":
            renamed = _rename(rest, _VAE_ATTENTION)
            return (renamed and f"{side}.mid_block.attentions.0.{renamed}"), "squeeze"
        return None, None
    if parts[1] in ("down", "up") and parts[2].isdigit() and len(parts) >= 5:
        i = int(parts[2])
        blocks = "down_blocks" if parts[1] == "down" else "up_blocks"
        level = i if parts[1] == "down" else levels - 1 - i
        if parts[3] == "block" and parts[4].isdigit():
            rest = ".".join(parts[5:]).replace("nin_shortcut", "conv_shortcut")
            return f"{side}.{blocks}.{level}.resnets.{parts[4]}.{rest}", None
        if parts[3] in ("downsample", "upsample"):
            sampler = "downsamplers" if parts[3] == "downsample" else "upsamplers"
            return f"{side}.{blocks}.{level}.{sampler}.0.{'.'.join(parts[4:])}", None
    return None, None


_OPEN_CLIP_FIXED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))
_OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")


def _open_clip_map(keys, prefix: str, width: int, projection: bool, skip_layer: Optional[int]) -> tuple[dict, list]:
    mapping, unknown = {}, []
    for key in keys:
        rest = key[len(prefix):]
        if rest in _OPEN_CLIP_FIXED:
            mapping[_OPEN_CLIP_FIXED[rest]] = (key, None)
        elif rest == "text_projection":
            if projection:  # [width, projection_dim] applied as x @ P: a linear layer's weight is P.T
                mapping["text_projection.weight"] = (key, "T")
        elif rest in _OPEN_CLIP_IGNORED:
            continue
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest)):
            layer, sub = int(m.group(1)), m.group(2)
            if layer == skip_layer:
                continue
            base = f"text_model.encoder.layers.{layer}."
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                leaf = "weight" if sub.endswith("weight") else "bias"
                for n, name in enumerate("qkv"):
                    mapping[f"{base}self_attn.{name}_proj.{leaf}"] = (key, (n * width, (n + 1) * width))
            elif (renamed := _rename(sub, _OPEN_CLIP_LAYER)) is not None:
                mapping[base + renamed] = (key, None)
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return mapping, unknown


def _clip_map(keys, prefix: str) -> tuple[dict, list]:
    mapping = {}
    for key in keys:
        rest = key[len(prefix):]
        if rest.endswith("position_ids"):
            continue
        mapping[rest if rest.startswith("text_model.") else "text_model." + rest] = (key, None)
    return mapping, []


def _apply(value: np.ndarray, op) -> np.ndarray:
    if op is None:
        return value
    if op == "squeeze":
        return value.reshape(value.shape[:2]) if value.ndim > 2 else value
    if op == "T":
        return np.ascontiguousarray(value.T)
    return value[op[0]:op[1]]


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

def _indices(shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def detect_kind(shapes: Mapping[str, tuple], path: str) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from which text encoder prefixes the file has; one-line errors otherwise."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET_PREFIX):
        sample = ", ".join(sorted(keys)[:3])
        hint = ""
        if any(k.startswith(("down_blocks.", "text_model.", "encoder.down")) for k in keys):
            hint = " (this looks like one diffusers component's weights: pass the whole diffusers model directory)"
        elif any(k in keys for k in ("emb_params", "clip_l", "clip_g", "string_to_param")):
            hint = " (this is a textual-inversion embedding: pass it to --embedding / config.init_from)"
        elif any("lora" in k for k in keys):
            hint = " (this is a LoRA, not a full model)"
        raise ModelLoadError(
            f"{path} is not an SD1/SD2/SDXL checkpoint: no {UNET_PREFIX}* keys (first keys: {sample or 'none'}){hint}"
        )
    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ModelLoadError(f"{path} is an SDXL refiner (one OpenCLIP text encoder): only SDXL base models are supported")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ModelLoadError(
        f"{path} is not an SD1/SD2/SDXL checkpoint: it has a UNet but no text encoder (cond_stage_model.* or "
        "conditioner.embedders.*): use the full checkpoint, or the diffusers-format model it was made from"
    )


def _unet_config(s: Mapping[str, tuple], kind: str, path: str) -> tuple[dict, int]:
    """The diffusers UNet config the shapes imply (heads by the family's rule) and layers per block."""
    inputs = _indices(s, r"input_blocks\.(\d+)\.")
    ops = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in s]
    layers = ops[0] - 1 if ops else len(inputs) - 1
    levels = len(ops) + 1
    if layers < 1 or inputs != list(range(levels * (layers + 1))) or "input_blocks.0.0.weight" not in s:
        raise ModelLoadError(f"{path}: the UNet's input_blocks do not follow the SD layout (blocks {inputs[:12]}...): "
                             "not an SD1/SD2/SDXL UNet")
    channels, attention, depth = [], [], []
    cross, linear = None, False
    for level in range(levels):
        first = 1 + level * (layers + 1)
        conv = s.get(f"input_blocks.{first}.0.out_layers.3.weight")
        if conv is None:
            raise ModelLoadError(f"{path}: input_blocks.{first} is not a resnet: not an SD1/SD2/SDXL UNet")
        channels.append(int(conv[0]))
        blocks = _indices(s, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        attention.append(bool(blocks))
        depth.append(len(blocks))
        if blocks:
            cross = cross or int(s[f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"][1])
            linear = len(s[f"input_blocks.{first}.1.proj_in.weight"]) == 2
    mid = _indices(s, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if not mid:
        raise ModelLoadError(f"{path}: the UNet has no middle-block attention: not an SD1/SD2/SDXL UNet")
    if attention[-1] and len(mid) != depth[-1]:
        raise ModelLoadError(f"{path}: the middle block has {len(mid)} transformer layers but the last level {depth[-1]}: "
                             "not supported")
    depth = [d or len(mid) for d in depth]  # a level without attention: unused; the mid block reads the last entry
    cross = cross or int(s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1])
    if "label_emb.weight" in s or ("label_emb.0.0.weight" in s and kind != "sdxl"):
        raise ModelLoadError(f"{path}: the UNet has class embeddings (an upscaler or unCLIP model): not supported")
    heads = [8] * levels if kind == "sd1" else [max(1, c // 64) for c in channels]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,  # set by the caller from the image side and the VAE factor
        "in_channels": int(s["input_blocks.0.0.weight"][1]),
        "out_channels": int(s["out.2.weight"][0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": cross,
        "attention_head_dim": heads,  # diffusers' name for the number of heads
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
        "upcast_attention": kind == "sd2",
        "norm_num_groups": 32,
    }
    if "label_emb.0.0.weight" in s:
        config.update(addition_embed_type="text_time",
                      projection_class_embeddings_input_dim=int(s["label_emb.0.0.weight"][1]))
    return config, layers


def _heads_unknown(config: dict, kind: str) -> list[int]:
    """Channel widths whose head count the 64-channels-per-head rule cannot give."""
    if kind == "sd1":
        return []
    return [c for c, t in zip(config["block_out_channels"], config["down_block_types"]) if t.startswith("CrossAttn") and c % 64]


def _vae_config(s: Mapping[str, tuple], path: str) -> dict:
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    if not levels or "encoder.conv_in.weight" not in s or "decoder.conv_in.weight" not in s:
        raise ModelLoadError(f"{path}: the VAE ({VAE_PREFIX}*) is missing or incomplete: use a checkpoint with its VAE baked in")
    channels = [int(s[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in levels]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(s["encoder.conv_in.weight"][1]),
        "out_channels": int(s["decoder.conv_out.weight"][0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": int(s["decoder.conv_in.weight"][1]),
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def _text_config(s: Mapping[str, tuple], layout: str, projection: bool, skip_layer: Optional[int], path: str,
                 component: str) -> dict:
    if layout == "clip":
        s = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in s.items()}
        embed, positions = "text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"
        layers = _indices(s, r"text_model\.encoder\.layers\.(\d+)\.")
        fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
        act = "quick_gelu"  # OpenAI CLIP-L
    else:
        embed, positions, fc1 = "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"
        layers = [i for i in _indices(s, r"transformer\.resblocks\.(\d+)\.") if i != skip_layer]
        act = "gelu"  # OpenCLIP
    if embed not in s or positions not in s or fc1 not in s:
        raise ModelLoadError(f"{path}: the {component} keys are incomplete ({embed} or {fc1} missing): the file is damaged")
    vocab, width = (int(n) for n in s[embed])
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": int(s[fc1][0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": int(s[positions][0]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(s["text_projection"][1]) if projection else width,
    }
    return config


# --------------------------------------------------------------------------------------------
# The original LDM yaml
# --------------------------------------------------------------------------------------------

def find_original_config(path: str, explicit: Optional[str] = None) -> Optional[str]:
    """``explicit`` if given (it must exist), else ``model.yaml`` beside ``model.safetensors`` (A1111's rule)."""
    if explicit:
        if not os.path.isfile(explicit):
            raise ModelLoadError(f"original config {explicit} does not exist: give the LDM yaml of {path}")
        return explicit
    stem = os.path.splitext(path)[0]
    for suffix in (".yaml", ".yml"):
        if os.path.isfile(stem + suffix):
            return stem + suffix
    return None


@dataclasses.dataclass
class _Original:
    """What is read from an original config yaml."""

    path: str
    unet: dict  # model.params.unet_config.params (SGM: network_config)
    params: dict  # model.params
    overrides: dict  # the top-level ``diffusers:`` section


def read_original_config(path: str) -> _Original:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelLoadError(f"cannot read the original config {path} ({type(e).__name__}): fix or remove the yaml") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not an LDM config (a mapping with model.params): fix or remove the yaml")
    mapping = lambda value: value if isinstance(value, dict) else {}  # noqa: E731
    params = mapping(mapping(data.get("model")).get("params"))
    unet = mapping(mapping(params.get("unet_config") or params.get("network_config")).get("params"))
    overrides = data.get("diffusers") or {}
    allowed = {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler"}
    if not isinstance(overrides, dict) or set(overrides) - allowed or not all(isinstance(v, dict) for v in overrides.values()):
        raise ModelLoadError(f"{path}: the diffusers: section must map components ({', '.join(sorted(allowed))}) to fields")
    return _Original(path, dict(unet), dict(params), {k: dict(v) for k, v in overrides.items()})


def _yaml_prediction_type(original: _Original) -> Optional[str]:
    if not original.params:
        return None
    if original.params.get("parameterization") == "v":
        return "v_prediction"
    scaling = (((original.params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {})
    if "VScaling" in str(scaling.get("target", "")):
        return "v_prediction"
    return "epsilon"


def _apply_yaml_unet(config: dict, unet: dict, original: _Original, path: str) -> None:
    """Heads from the yaml (LDM's rule: num_head_channels if set, else num_heads), after checking it fits."""
    if not unet:
        return
    channels = config["block_out_channels"]
    expected = {
        "model_channels x channel_mult": ([unet["model_channels"] * m for m in unet["channel_mult"]]
                                          if "model_channels" in unet and "channel_mult" in unet else None, channels),
        "num_res_blocks": (unet.get("num_res_blocks"), config["layers_per_block"]),
        "context_dim": (unet.get("context_dim"), config["cross_attention_dim"]),
    }
    for name, (said, found) in expected.items():
        if isinstance(said, (list, tuple)) and not isinstance(found, list):
            said = said[0] if len(set(said)) == 1 else said
        if said is not None and list(np.atleast_1d(said)) != list(np.atleast_1d(found)):
            raise ModelLoadError(f"{original.path} says {name} {said} but {path} has {found}: the yaml belongs to "
                                 "another model; remove it or pass the right one")
    head_channels = unet.get("num_head_channels", -1)
    heads = unet.get("num_heads", -1)
    if head_channels not in (-1, None):
        config["attention_head_dim"] = [max(1, c // head_channels) for c in channels]
    elif heads not in (-1, None):
        config["attention_head_dim"] = [heads] * len(channels)
    if unet.get("disable_self_attentions"):
        raise ModelLoadError(f"{original.path}: disable_self_attentions is not supported")


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def _tokenizer_dirs_in(directory: str, names: tuple[str, ...], what: str) -> dict[str, str]:
    """``{tokenizer: dir, ...}`` of a diffusers model folder (``tokenizer/``...) or a bare tokenizer folder."""
    if all(os.path.isfile(os.path.join(directory, n, "vocab.json")) for n in names):
        return {n: os.path.join(directory, n) for n in names}
    if os.path.isfile(os.path.join(directory, "vocab.json")):
        if len(names) > 1:
            raise ModelLoadError(
                f"{what} {directory} is one tokenizer folder but an SDXL checkpoint needs two: give a diffusers SDXL "
                "model folder (with tokenizer/ and tokenizer_2/)"
            )
        return {names[0]: directory}
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n, "vocab.json"))]
    raise ModelLoadError(f"{what} {directory} has no {'/ '.join(missing)}/vocab.json and no vocab.json: give a "
                         "diffusers model folder or a CLIP tokenizer folder")


def _hub_snapshot(repo: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, allow_patterns=[f"{d}{f}" for d in ("", "tokenizer/", "tokenizer_2/") for f in TOKENIZER_FILES])
    except Exception as e:
        raise ModelLoadError(f"tokenizer {repo!r} is not a local folder and could not be fetched from the hub "
                             f"({type(e).__name__}): download it and pass the folder") from None


def _cached_tokenizer(repo: str, subfolder: str) -> Optional[str]:
    """The folder of a tokenizer in the local Hugging Face cache, or None (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    prefix = f"{subfolder}/" if subfolder else ""
    vocab = try_to_load_from_cache(repo, prefix + "vocab.json")
    merges = try_to_load_from_cache(repo, prefix + "merges.txt")
    if isinstance(vocab, str) and isinstance(merges, str) and os.path.dirname(vocab) == os.path.dirname(merges):
        return os.path.dirname(vocab)
    return None


def tokenizer_folders(source: str, names: tuple[str, ...] = ("tokenizer",)) -> dict[str, str]:
    """``{name: folder}`` for config ``model_tokenizer``: a diffusers model folder (its ``tokenizer/``,
    ``tokenizer_2/``), a CLIP tokenizer folder (one tokenizer only), or a hub id (its tokenizer files fetched)."""
    if not os.path.isdir(source):
        looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise ModelLoadError(f"model_tokenizer {source} does not exist: give a diffusers model folder or a tokenizer folder")
        source = _hub_snapshot(source)
    return _tokenizer_dirs_in(source, names, "model_tokenizer")


def resolve_tokenizers(path: str, kind: str, tokenizer: str = "") -> dict[str, str]:
    """Tokenizer folders for a single file, first found wins:

    1. ``tokenizer`` (config ``model_tokenizer``): a diffusers model folder (its ``tokenizer/``,
       ``tokenizer_2/``), a CLIP tokenizer folder, or a hub id (its tokenizer files downloaded);
    2. ``tokenizer/`` (and ``tokenizer_2/``) beside the file;
    3. the local Hugging Face cache (:data:`HUB_TOKENIZERS`; nothing is downloaded).
    """
    names = ("tokenizer", "tokenizer_2") if kind == "sdxl" else ("tokenizer",)
    if tokenizer:
        return tokenizer_folders(tokenizer, names)
    beside = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(os.path.join(beside, "tokenizer")):
        return _tokenizer_dirs_in(beside, names, "the folder beside the checkpoint,")
    found = {}
    for name in names:
        for repo, subfolder in HUB_TOKENIZERS[kind][name]:
            directory = _cached_tokenizer(repo, subfolder)
            if directory:
                found[name] = directory
                break
    if len(found) == len(names):
        return found
    repos = " and ".join(HUB_TOKENIZERS[kind][n][0][0] for n in names)
    folders = "tokenizer/ and tokenizer_2/ folders" if len(names) > 1 else "a tokenizer/ folder"
    raise ModelLoadError(
        f"{path} holds no tokenizer and none was found: give one as model_tokenizer (train: "
        f"--config.model_tokenizer=DIR, sample: --model-tokenizer=DIR; a diffusers {kind.upper()} model or tokenizer "
        f"folder), put {folders} beside the file, or download {repos} into the Hugging Face cache"
    )


def _special_ids(directory: str) -> dict[str, int]:
    """BOS/EOS/PAD token ids of a CLIP tokenizer folder, read from its files (no transformers needed)."""
    try:
        with open(os.path.join(directory, "vocab.json")) as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the tokenizer in {directory} ({type(e).__name__}): download it again") from None
    pad = "<|endoftext|>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(directory, name)) as f:
                value = json.load(f).get("pad_token")
        except (OSError, ValueError):
            continue
        if value:
            pad = value["content"] if isinstance(value, dict) else value
            break
    ids = {"bos_token_id": vocab.get("<|startoftext|>"), "eos_token_id": vocab.get("<|endoftext|>"),
           "pad_token_id": vocab.get(pad, vocab.get("<|endoftext|>"))}
    return {k: int(v) for k, v in ids.items() if v is not None}


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SingleFile:
    """A single-file checkpoint read as diffusers-format components (configs now, weights on demand)."""

    path: str  # absolute
    kind: str  # sd1 | sd2 | sdxl
    configs: dict  # unet, vae, text_encoder[, text_encoder_2]: the contents of diffusers' config.json
    scheduler_config: dict
    tokenizers: dict  # tokenizer[, tokenizer_2] -> folder
    original_config: Optional[str]  # the yaml that was read, if any
    tensors: _Tensors = dataclasses.field(repr=False)
    maps: dict = dataclasses.field(repr=False)  # component -> {diffusers key: (file key, op)}

    @property
    def model_index(self) -> dict:
        pipeline = "StableDiffusionXLPipeline" if self.kind == "sdxl" else "StableDiffusionPipeline"
        return {"_class_name": pipeline, "_single_file": self.path}

    def state_dict(self, component: str) -> dict[str, np.ndarray]:
        """One component's weights under diffusers names (float32 for floating types)."""
        out, cache = {}, {}
        for name, (key, op) in self.maps[component].items():
            if key not in cache:
                cache = {key: self.tensors.get(key)}  # fused q/k/v rows are consecutive entries
            out[name] = _apply(cache[key], op)
        return out

    def write_diffusers_configs(self, directory: str) -> str:
        """A diffusers model folder with every config and tokenizer but no weights: the ``config=`` that
        diffusers' ``from_single_file`` needs to load this file offline (``check-parity``)."""
        def dump(relative: str, value: dict) -> None:
            os.makedirs(os.path.dirname(os.path.join(directory, relative)), exist_ok=True)
            with open(os.path.join(directory, relative), "w") as f:
                json.dump(value, f, indent=2)

        for name, config in self.configs.items():
            dump(f"{name}/config.json", config)
        dump("scheduler/scheduler_config.json", self.scheduler_config)
        index = {"_class_name": self.model_index["_class_name"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
        for name, config in self.configs.items():
            if name.startswith("text_encoder"):
                index[name] = ["transformers", config["architectures"][0]]
                index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        if self.kind == "sdxl":
            index["force_zeros_for_empty_prompt"] = True
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        dump("model_index.json", index)
        for name, source in self.tokenizers.items():
            target = os.path.join(directory, name)
            os.makedirs(target, exist_ok=True)
            for file in TOKENIZER_FILES:
                if os.path.exists(os.path.join(source, file)):
                    shutil.copyfile(os.path.join(source, file), os.path.join(target, file))
        return directory


def _strip(shapes: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _check_unknown(unknown: list, component: str, path: str) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        raise ModelLoadError(f"{path}: {component} keys no SD1/SD2/SDXL model has ({shown}): not a supported checkpoint")


def read_single_file(path: str, *, tokenizer: str = "", original_config: Optional[str] = None) -> SingleFile:
    """Reads a single-file checkpoint's names and shapes (no weights yet) into diffusers-format configs.

    ``tokenizer``: see :func:`resolve_tokenizers`. ``original_config``: the LDM yaml; default ``<file>.yaml``
    beside the file, if there is one. Every problem is a one-line :class:`ModelLoadError`.
    """
    path = os.path.abspath(path)
    tensors = open_tensors(path)
    shapes = tensors.shapes
    kind = detect_kind(shapes, path)
    yaml_path = find_original_config(path, original_config)
    original = read_original_config(yaml_path) if yaml_path else _Original("", {}, {}, {})
    unet, unet_map, (scale, steps, betas) = _unet_part(shapes, kind, path, original)
    vae, vae_map = _vae_part(shapes, path)
    configs, maps = {"unet": unet, "vae": vae}, {"unet": unet_map, "vae": vae_map}
    _text_parts(shapes, kind, path, configs, maps)
    if kind == "sdxl":  # SDXL's added embedding: pooled text_encoder_2 output + 6 Fourier-embedded size/crop numbers
        pooled = configs["text_encoder_2"]["projection_dim"]
        unet["addition_time_embed_dim"] = (unet["projection_class_embeddings_input_dim"] - pooled) // 6
    prediction = _prediction_type(original, shapes, kind, tensors)
    image_size = 512 if kind == "sd2" and prediction == "epsilon" else IMAGE_SIZE[kind]
    unet["sample_size"] = image_size // 2 ** (len(vae["block_out_channels"]) - 1)
    vae["sample_size"] = image_size
    vae["scaling_factor"] = scale
    scheduler = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": steps,
        "beta_start": betas[0],
        "beta_end": betas[1],
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    _apply_overrides(original, configs, scheduler, kind, path)
    tokenizers = resolve_tokenizers(path, kind, tokenizer)
    for component in configs:
        if component.startswith("text_encoder"):
            ids = _special_ids(tokenizers[component.replace("text_encoder", "tokenizer")])
            configs[component].update({k: v for k, v in ids.items() if k not in original.overrides.get(component, {})})
    return SingleFile(path, kind, configs, scheduler, tokenizers, yaml_path, tensors, maps)


def _unet_part(shapes: dict, kind: str, path: str, original: "_Original"):
    """``(unet config, {diffusers name: (key, op)}, (latent scale, train timesteps, (beta start, beta end)))``."""
    unet_shapes = _strip(shapes, UNET_PREFIX)
    unet, layers = _unet_config(unet_shapes, kind, path)
    try:
        _apply_yaml_unet(unet, original.unet, original, path)
        scale = float(original.params.get("scale_factor", SCALING_FACTOR[kind]))
        steps = int(original.params.get("timesteps", 1000))
        betas = float(original.params.get("linear_start", 0.00085)), float(original.params.get("linear_end", 0.012))
    except ModelLoadError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{original.path}: a value of the wrong type ({type(e).__name__}: {e}): fix or remove the yaml") from None
    unet_map, unknown = {}, []
    for key in unet_shapes:
        name = _unet_key(key, layers)
        if name:
            unet_map[name] = (UNET_PREFIX + key, None)
        else:
            unknown.append(UNET_PREFIX + key)
    _check_unknown(unknown, "UNet", path)
    return unet, unet_map, (scale, steps, betas)


def _vae_part(shapes: dict, path: str):
    """``(vae config, {diffusers name: (key, op)})``."""
    vae_shapes = _strip(shapes, VAE_PREFIX)
    vae = _vae_config(vae_shapes, path)
    vae_map, unknown = {}, []
    for key in vae_shapes:
        name, op = _vae_key(key, len(vae["block_out_channels"]))
        if name:
            vae_map[name] = (VAE_PREFIX + key, op)
        else:
            unknown.append(VAE_PREFIX + key)
    _check_unknown(unknown, "VAE", path)
    return vae, vae_map


def _text_parts(shapes: dict, kind: str, path: str, configs: dict, maps: dict) -> None:
    """Adds each text encoder's config and key map to ``configs`` and ``maps``."""
    for component, (prefix, layout) in TEXT_ENCODERS[kind].items():
        projection = component == "text_encoder_2"
        skip_layer = 23 if kind == "sd2" else None
        configs[component] = _text_config(_strip(shapes, prefix), layout, projection, skip_layer, path, component)
        keys = [k for k in shapes if k.startswith(prefix)]
        if layout == "clip":
            maps[component], unknown = _clip_map(keys, prefix)
        else:
            width = configs[component]["hidden_size"]
            maps[component], unknown = _open_clip_map(keys, prefix, width, projection, skip_layer)
        _check_unknown(unknown, component, path)


def _prediction_type(original: "_Original", shapes: dict, kind: str, tensors) -> str:
    """The yaml's, else a ``v_pred`` key's, else SD2's rule (its base checkpoint's global step: epsilon), else epsilon."""
    prediction = _yaml_prediction_type(original)
    if prediction is not None:
        return prediction
    if "v_pred" in shapes:
        return "v_prediction"
    if kind == "sd2":
        return "epsilon" if tensors.global_step == SD2_BASE_GLOBAL_STEP else "v_prediction"
    return "epsilon"


def _apply_overrides(original: "_Original", configs: dict, scheduler: dict, kind: str, path: str) -> None:
    """The yaml's ``diffusers:`` section over the inferred configs; one line when attention heads stay unknown."""
    unet = configs["unet"]
    for component, fields in original.overrides.items():
        target = scheduler if component == "scheduler" else configs.get(component)
        if target is None:
            raise ModelLoadError(f"{original.path}: the diffusers: section names {component}, which a {kind.upper()} "
                                 "checkpoint does not have")
        target.update(fields)
    if "num_attention_heads" in original.overrides.get("unet", {}):
        unet["attention_head_dim"] = unet.pop("num_attention_heads")
    heads_given = "attention_head_dim" in original.overrides.get("unet", {}) or bool(original.unet)
    unknown_heads = [] if heads_given else _heads_unknown(unet, kind)
    for component in configs:
        given = "num_attention_heads" in original.overrides.get(component, {})
        if component.startswith("text_encoder") and not given and configs[component]["hidden_size"] % 64:
            unknown_heads.append(configs[component]["hidden_size"])
    if unknown_heads:
        raise ModelLoadError(
            f"{path}: cannot infer the attention heads of {sorted(set(unknown_heads))}-channel layers (the rule is 64 "
            f"channels per head): write the model's LDM yaml beside it as {os.path.splitext(path)[0]}.yaml "
            "(num_heads/num_head_channels; text encoders in its diffusers: section)"
        )

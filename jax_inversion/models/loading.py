"""Loads diffusers-format Stable Diffusion checkpoints into our Flax modules.

A model is a directory with ``model_index.json`` and ``unet/``, ``text_encoder/``,
``vae/``, ``tokenizer/``, ``scheduler/`` (SDXL adds ``text_encoder_2/``, ``tokenizer_2/``),
or a hub id resolved through ``huggingface_hub`` where a hub is reachable, or a single-file checkpoint
(``.safetensors``/``.ckpt`` in the original LDM/SGM layout, A1111 style: :mod:`jax_inversion.models.single_file`).
Weights are read from ``.safetensors`` without torch; ``.bin`` and ``.ckpt`` only through
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_inversion.core.errors import ModelLoadError  # re-exported: loading.ModelLoadError, as before
from jax_inversion.core.platform import current_platform, select_attention_backend
from jax_inversion.models import clip, unet as unet_lib, vae as vae_lib
from jax_inversion.models import single_file
from jax_inversion.models.convert import convert_state_dict

COMPONENTS = ("unet", "text_encoder", "vae")


@dataclasses.dataclass
class Pretrained:
    """Modules (pure Flax, ``init``/``apply``), their params, tokenizer and scheduler config."""

    path: str
    unet: Optional[unet_lib.UNet2DConditionModel] = None
    unet_params: Any = None
    text_encoder: Optional[clip.CLIPTextTransformer] = None
    text_encoder_params: Any = None
    vae: Optional[vae_lib.AutoencoderKL] = None
    vae_params: Any = None
    text_encoder_2: Optional[clip.CLIPTextTransformer] = None
    text_encoder_2_params: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    scheduler_config: dict = dataclasses.field(default_factory=dict)
    model_index: dict = dataclasses.field(default_factory=dict)
    clip_skip: int = 1  # text-encoder layer that conditions the UNet, counted from the last (A1111/kohya); see conditioning.with_clip_skip

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: point --model at a diffusers-format model directory") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}): re-export or re-download the model") from None


def resolve_model_path(path_or_id: str, revision: Optional[str] = None) -> str:
    """A local directory as is; otherwise a hub id downloaded (config, tokenizer, safetensors)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    looks_like_hub_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model path {path_or_id!r} does not exist: give a diffusers-format directory or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path_or_id,
            revision=revision,
            allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"],
        )
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise ModelLoadError(
            f"model {path_or_id!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}): download it with `huggingface-cli download` and pass the directory"
        ) from None


def _weight_files(directory: str) -> tuple[list[str], str]:
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        indexes = [p for p in glob.glob(os.path.join(directory, pattern)) if ".fp16." not in p]
        if indexes:
            shards = sorted(set(read_json(indexes[0])["weight_map"].values()))
            kind = "safetensors" if pattern.startswith("*.safetensors") else "bin"
            return [os.path.join(directory, s) for s in shards], kind
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(directory, name)):
            return [os.path.join(directory, name)], "safetensors"
    candidates = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if candidates:
        return candidates[:1], "safetensors"
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, name)):
            return [os.path.join(directory, name)], "bin"
    raise ModelLoadError(f"no .safetensors or .bin weights in {directory}")


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a component folder as numpy (float32 for half types)."""
    files, kind = _weight_files(directory)
    state: dict[str, np.ndarray] = {}
    for file in files:
        if kind == "safetensors":
            from safetensors.numpy import load_file

            try:
                tensors = load_file(file)
            except Exception as e:
                raise ModelLoadError(f"cannot read {file} ({e}): the file is corrupt or not safetensors") from None
        else:
            try:
                import torch
            except ImportError:
                raise ModelLoadError(
                    f"{file} is a PyTorch .bin file and torch is not installed: convert it to safetensors "
                    "or `pip install torch`"
                ) from None
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelLoadError(f"cannot read {file} safely ({type(e).__name__}): convert it to safetensors") from None
            tensors = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in loaded.items()}
        for key, value in tensors.items():
            if value.dtype.kind == "f" and value.dtype != np.float32:
                value = value.astype(np.float32)
            state[key] = value
    return state


_ABSTRACT_PARAMS = {
    unet_lib.UNet2DConditionModel: unet_lib.init_abstract_params,
    vae_lib.AutoencoderKL: vae_lib.init_abstract_params,
    clip.CLIPTextTransformer: clip.init_abstract_params,
}


@functools.lru_cache(maxsize=16)
def abstract_params(module_class, config) -> dict:
    """The float32 ``params`` tree's shapes of ``module_class(config)`` (``jax.eval_shape`` of its init).

    Kept per (class, frozen config): tracing a UNet's init takes about a second on a CPU, and a process
    that loads the same model again (``sample`` after ``train``, an evaluation's runs) need not repeat
    it. The params' shapes and dtypes do not depend on the module's compute dtype or attention backend.
    Callers read the tree, never change it.
    """
    return _ABSTRACT_PARAMS[module_class](module_class(config))


def release_freed_memory() -> None:
    """Hands memory that is free but still held by the C allocator back to the OS (glibc only).

    Loading makes float32 numpy copies of every weight on the way to device arrays; once they are
    freed glibc keeps most of them mapped (measured for SD1.5: 0.8 GiB of 5.0 GiB resident after
    ``load_pretrained``, returned by this call). Elsewhere it does nothing.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cast(params, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), params)


def _shapes(abstract, dtype):
    """The param tree's shapes in ``dtype``, no values: a shapes-only model (see :func:`load_pretrained`)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract)


def _load_component(directory: str, module, abstract, *, prefix: str = "", ignore=(), dtype=jnp.float32, shapes_only=False,
                    read: Optional[Callable[[], dict]] = None):
    """``read``: the component's diffusers-layout state dict (default: the weights in ``directory``, which
    otherwise only names the component in errors)."""
    if shapes_only:
        return _shapes(abstract, dtype)
    try:
        params = convert_state_dict((read or (lambda: read_state_dict(directory)))(), abstract, prefix=prefix, ignore=ignore)
    except ValueError as e:
        raise ModelLoadError(f"{directory}: {e}") from None
    return _cast(params, dtype)


def load_text_encoder(directory: str, dtype=jnp.float32, shapes_only: bool = False, config: Optional[dict] = None,
                      read: Optional[Callable[[], dict]] = None):
    """``config``/``read``: the ``config.json`` dict and state-dict reader of a component not in a folder
    (a single file's); ``directory`` then only names it in errors."""
    try:
        config = clip.CLIPTextConfig.from_dict(config or read_json(os.path.join(directory, "config.json")))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{directory}: text encoder config: {e}") from None
    module = clip.CLIPTextTransformer(config, dtype=dtype)
    abstract = abstract_params(clip.CLIPTextTransformer, config)
    if shapes_only:
        return module, _shapes(abstract, dtype)
    try:
        state = clip.add_text_model_prefix((read or (lambda: read_state_dict(directory)))())
        params = convert_state_dict(state, abstract, ignore=(r"position_ids$",))
    except ValueError as e:
        raise ModelLoadError(f"{directory}: {e}") from None
    return module, _cast(params, dtype)


def load_tokenizer(directory: str):
    from transformers import CLIPTokenizer

    if not os.path.isdir(directory):
        raise ModelLoadError(f"tokenizer folder {directory} is missing")
    try:
        return CLIPTokenizer.from_pretrained(directory)
    except Exception as e:
        raise ModelLoadError(f"cannot load the CLIP tokenizer in {directory} ({type(e).__name__}: {e})") from None


def load_pretrained(
    path_or_id: str,
    dtype: Any = jnp.float32,
    components: Sequence[str] = COMPONENTS,
    revision: Optional[str] = None,
    attention_backend: str = "auto",
    shapes_only: bool = False,
    tokenizer: str = "",
    original_config: Optional[str] = None,
) -> Pretrained:
    """Loads the requested components of a diffusers-format model or a single-file checkpoint into Flax.

    ``dtype`` is both the compute dtype of the modules and the storage dtype of these
    (frozen) params. ``attention_backend`` is the UNet's attention kernel (see
    :mod:`jax_inversion.core.platform`); one this platform cannot run is an error here, before any
    weights are read. The tokenizer and scheduler config are always loaded.

    ``shapes_only``: the params are ``jax.ShapeDtypeStruct`` leaves read from the components' configs
    alone (no weight file is opened, none need exist): enough to compile a step ahead of time and
    plan its memory (``jax-inversion compile``); a single file's header alone is read.

    A path ending ``.safetensors`` or ``.ckpt`` is a single-file checkpoint (:mod:`jax_inversion.models.single_file`;
    ``Pretrained.path`` is then its absolute path): ``original_config`` is its LDM yaml (default
    ``<file>.yaml`` beside it, if any). ``tokenizer`` (config ``model_tokenizer``): a diffusers model folder,
    tokenizer folder or hub id whose tokenizer(s) replace the model's own; a single file needs one unless a
    ``tokenizer/`` folder lies beside it or the Hugging Face cache has its family's (see
    ``single_file.resolve_tokenizers``).
    """
    source = (_single_file_source(path_or_id, tokenizer, original_config) if single_file.is_single_file(path_or_id)
              else _folder_source(path_or_id, revision, tokenizer))
    out = Pretrained(
        path=source.path,
        model_index=source.model_index,
        scheduler_config=source.scheduler_config,
        tokenizer=load_tokenizer(source.tokenizer_dirs["tokenizer"]),
    )
    if "tokenizer_2" in source.tokenizer_dirs:
        out.tokenizer_2 = load_tokenizer(source.tokenizer_dirs["tokenizer_2"])
    if "unet" in components:
        config = dataclasses.replace(source.component_config("unet", unet_lib.UNet2DConditionConfig), prediction_type=out.prediction_type)
        attention_dtype = jnp.float32 if config.upcast_attention else dtype
        select_attention_backend(attention_backend, current_platform(), attention_dtype)  # fails early, one line
        out.unet = unet_lib.UNet2DConditionModel(config, dtype=dtype, attention_backend=attention_backend)
        out.unet_params = _load_component(source.where("unet"), out.unet, abstract_params(unet_lib.UNet2DConditionModel, config), dtype=dtype,
                                          shapes_only=shapes_only, read=source.reader("unet"))
    if "vae" in components:
        out.vae = vae_lib.AutoencoderKL(source.component_config("vae", vae_lib.AutoencoderKLConfig), dtype=dtype)
        out.vae_params = _load_component(source.where("vae"), out.vae, abstract_params(vae_lib.AutoencoderKL, out.vae.config),
                                         dtype=dtype, shapes_only=shapes_only, read=source.reader("vae"))
    if "text_encoder" in components:
        for name in ("text_encoder", "text_encoder_2") if source.has("text_encoder_2") else ("text_encoder",):
            module, params = load_text_encoder(source.where(name), dtype, shapes_only, config=source.config_of(name),
                                               read=source.reader(name))
            setattr(out, name, module)
            setattr(out, f"{name}_params", params)
        _check_tokenizers(out, source)
    if not shapes_only and _weight_bytes(out) > RELEASE_ABOVE_BYTES:
        release_freed_memory()
    return out


RELEASE_ABOVE_BYTES = 256 * 2**20  # below this the float32 copies left behind are small, and gc.collect is not free


def _weight_bytes(model: Pretrained) -> int:
    trees = [getattr(model, f"{name}_params", None) for name in ("unet", "vae", "text_encoder", "text_encoder_2")]
    return sum(leaf.nbytes for tree in trees if tree is not None for leaf in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass
class _Source:
    """Where a model's parts come from: a diffusers folder or a single file, seen alike by :func:`load_pretrained`."""

    path: str
    model_index: dict
    scheduler_config: dict
    tokenizer_dirs: dict  # {"tokenizer": dir, ["tokenizer_2": dir]}
    has: Callable[[str], bool]  # whether the model has this component
    config_of: Callable[[str], dict]  # a component's config
    reader: Callable[[str], Optional[Callable]]  # a component's state-dict reader, None: its folder's weight files
    where: Callable[[str], str]  # a component's place, for messages and folder reads
    config_where: Callable[[str], str]  # where its config came from, for messages

    def component_config(self, name: str, config_class):
        """``config_class.from_dict`` of the component's config; one line naming the file when it does not fit."""
        try:
            return config_class.from_dict(self.config_of(name))
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{self.config_where(name)}: {e}") from None


def _single_file_source(path: str, tokenizer: str, original_config: Optional[str]) -> _Source:
    checkpoint = single_file.read_single_file(path, tokenizer=tokenizer, original_config=original_config)
    return _Source(
        checkpoint.path, checkpoint.model_index, checkpoint.scheduler_config, checkpoint.tokenizers,
        has=lambda name: name in checkpoint.configs,
        config_of=lambda name: checkpoint.configs[name],
        reader=lambda name: (lambda: checkpoint.state_dict(name)),
        where=lambda name: f"{checkpoint.path} ({name})",
        config_where=lambda name: f"{checkpoint.path} ({name} config as inferred)",
    )


def _folder_source(path_or_id: str, revision: Optional[str], tokenizer: str) -> _Source:
    path = resolve_model_path(path_or_id, revision)
    index_path = os.path.join(path, "model_index.json")
    model_index = read_json(index_path) if os.path.exists(index_path) else {}
    if not model_index and not os.path.isdir(os.path.join(path, "unet")):
        raise ModelLoadError(f"{path} has no model_index.json and no unet/: it is not a diffusers-format model")
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler_config = read_json(scheduler_path) if os.path.exists(scheduler_path) else {}
    has = lambda name: os.path.isdir(os.path.join(path, name))  # noqa: E731
    names = ("tokenizer", "tokenizer_2") if has("tokenizer_2") else ("tokenizer",)
    tokenizer_dirs = single_file.tokenizer_folders(tokenizer, names) if tokenizer else {name: os.path.join(path, name) for name in names}
    return _Source(
        path, model_index, scheduler_config, tokenizer_dirs, has,
        config_of=lambda name: read_json(os.path.join(path, name, "config.json")),
        reader=lambda name: None,
        where=lambda name: os.path.join(path, name),
        config_where=lambda name: os.path.join(path, name, "config.json"),
    )


def _check_tokenizers(out: Pretrained, source: _Source) -> None:
    """One line when a tokenizer has more tokens than its text encoder has rows: another model's tokenizer."""
    for name, tok, module in (("tokenizer", out.tokenizer, out.text_encoder), ("tokenizer_2", out.tokenizer_2, out.text_encoder_2)):
        if tok is not None and module is not None and len(tok) > module.config.vocab_size:
            raise ModelLoadError(
                f"the {name} in {source.tokenizer_dirs[name]} has {len(tok)} tokens but the text encoder of {source.path} has "
                f"{module.config.vocab_size} embedding rows: it is another model's tokenizer; pass this model's "
                "(--config.model_tokenizer)"
            )

"""Flags shared by ``sample`` and ``attention``: where the tokens come from and what to draw."""
from __future__ import annotations

from absl import flags

from jax_inversion.diffusion.samplers import SAMPLERS

WORKDIR = flags.DEFINE_string("workdir", None, "a training run: its model and learned tokens (latest checkpoint or --step)")
STEP = flags.DEFINE_integer("step", None, "checkpoint step of --workdir (default: the latest)")
MODEL = flags.DEFINE_string("model", None, "diffusers-format model directory, hub id or single-file .safetensors/.ckpt "
                            "(with --embedding; overrides the run's model)")
MODEL_TOKENIZER = flags.DEFINE_string("model-tokenizer", None, "tokenizer(s) for the model: a diffusers model or tokenizer "
                                      "folder (default: the run's config.model_tokenizer, else the model's own)")
EMBEDDING = flags.DEFINE_string("embedding", None, "an exported embedding file (diffusers, A1111, SDXL or extended) instead of --workdir")
TOKEN = flags.DEFINE_string("token", None, "the token of an --embedding file that does not name it, e.g. '<cat>'")
PROMPT = flags.DEFINE_string("prompt", None, "the prompt, using the learned tokens, e.g. 'a photo of <cat> on the beach'")
NEGATIVE = flags.DEFINE_string("negative-prompt", "", "negative prompt (the unconditional branch of guidance)")
NUM_IMAGES = flags.DEFINE_integer("num-images", 4, "images to draw (sharded over devices when divisible)")
STEPS = flags.DEFINE_integer("steps", 50, "denoising steps")
GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
SCHEDULER = flags.DEFINE_enum(
    "scheduler", "ddim", list(SAMPLERS), "sampler; A1111's DDIM, DPM++ 2M, Euler, Euler a, DPM++ 2M Karras, Euler Karras "
    "are ddim, dpm++2m, euler, euler_a, dpm++2m_karras, euler_karras")
SEED = flags.DEFINE_integer("seed", 0, "seed of the initial noise")
CLIP_SKIP = flags.DEFINE_integer(
    "clip-skip", None, "SD 1/2: condition on the text encoder's N-th layer from the end (A1111's Clip skip; 2 for anime "
    "models); default: what the tokens were trained with (the run's config, or the file's jax_inversion.clip_skip), else 1")
OUT = flags.DEFINE_string("out", None, "output PNG (a folder: the file is named after the prompt and seed)")
LAYOUT_GUIDANCE = flags.DEFINE_bool("layout-guidance", False, "Compositional Inversion's spatial inversion while sampling")
LAYOUT_WORDS = flags.DEFINE_list(
    "layout-words", [], "prompt words/tokens to place, e.g. '<cat>,dog' (default: as the released code, the learned token "
    "left and the prompt's other object right, '<cat>' and 'dog' for 'a <cat> and a dog'; else the learned tokens)")
BOXES = flags.DEFINE_string("boxes", "", "one box per layout word: 'x0,y0,x1,y1;x0,y0,x1,y1' (fractions)")
LAYOUT_MODEL = flags.DEFINE_string("layout-model", "", "a train-layout file predicting the two words' boxes")


def parse_boxes(text: str) -> tuple:
    from jax_inversion.sampling.generate import SamplingError

    if not text:
        return ()
    try:
        boxes = tuple(tuple(float(v) for v in part.split(",")) for part in text.split(";") if part.strip())
    except ValueError:
        raise SamplingError(f"--boxes {text!r} is not 'x0,y0,x1,y1;...' numbers") from None
    if any(len(b) != 4 for b in boxes):
        raise SamplingError(f"--boxes {text!r}: each box is 4 numbers x0,y0,x1,y1 separated by ';'")
    return boxes


def load_source(command: str):
    """``(model, learned tokens)`` from --workdir or --model + --embedding, the model read at --clip-skip."""
    from jax_inversion.text.conditioning import with_clip_skip
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.sampling.generate import SamplingError, run_source, tokens_from_file

    if bool(WORKDIR.value) == bool(EMBEDDING.value):
        raise SamplingError("pass either --workdir DIR (a training run) or --model DIR --embedding FILE")
    if WORKDIR.value:
        model_path, tokenizer, learned = run_source(WORKDIR.value, STEP.value)
        model_path = MODEL.value or model_path
        tokenizer = "" if MODEL.value else tokenizer  # another model: its own tokenizer unless --model-tokenizer
    else:
        if not MODEL.value:
            raise SamplingError("--embedding needs --model: the diffusers-format model the embedding was trained for")
        model_path, tokenizer, learned = MODEL.value, "", tokens_from_file(EMBEDDING.value, TOKEN.value)
    tokenizer = tokenizer if MODEL_TOKENIZER.value is None else MODEL_TOKENIZER.value
    clip_skip = learned.clip_skip if CLIP_SKIP.value is None else CLIP_SKIP.value
    return with_clip_skip(load_pretrained(model_path, tokenizer=tokenizer), clip_skip), learned


def request(attention_resolution: int = 0):
    from jax_inversion.sampling.generate import SampleRequest

    return SampleRequest(
        prompt=PROMPT.value, negative_prompt=NEGATIVE.value, num_images=NUM_IMAGES.value, steps=STEPS.value,
        guidance=GUIDANCE.value, scheduler=SCHEDULER.value, seed=SEED.value, layout_guidance=LAYOUT_GUIDANCE.value,
        layout_words=tuple(LAYOUT_WORDS.value), boxes=parse_boxes(BOXES.value), layout_model=LAYOUT_MODEL.value,
        attention_resolution=attention_resolution,
    )


def out_path(default_name: str) -> str:
    import os

    path = OUT.value
    if path.endswith(os.sep) or os.path.isdir(path):
        return os.path.join(path, default_name)
    return path

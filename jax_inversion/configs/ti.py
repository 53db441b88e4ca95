"""Textual Inversion (Gal et al. 2022): learn the placeholder's embedding(s) by denoising.

The recipe is the original one: base learning rate 5e-3 scaled by the global batch
(``train.scale_lr``: 0.04 at batch 8, as the LDM code's ``scale_lr`` and diffusers'
``--scale_lr``), 5,000 steps, AdamW, no gradient clipping.

    jax-inversion train --config configs/ti.py --workdir DIR \
        --config.model=PATH --config.data.concept_dir=DIR \
        --config.data.placeholder_token='<cat>' --config.data.initializer_token=cat

``train.num_steps``, ``data.num_vectors`` and ``train.min_timestep`` are None ("unset") here:
:func:`resolve_unset` gives them :data:`UNSET_DEFAULTS` (5,000, 1, 0) before anything reads them,
or the embedded default job's values (2,000, 8, 200: ``default_job.py``) when training on it. A value
given (``--config.train.num_steps=5000``, a method config's own) is always kept.
"""
import copy

import ml_collections

# The documented defaults of the fields left None by get_config (see the module docstring).
UNSET_DEFAULTS = {"train.num_steps": 5000, "data.num_vectors": 1, "train.min_timestep": 0}


def resolve_unset(config: ml_collections.ConfigDict, defaults: dict = None) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose unset (None) fields of :data:`UNSET_DEFAULTS` hold ``defaults``'
    value for them, else :data:`UNSET_DEFAULTS`'; fields holding a value keep it. Idempotent."""
    values = {**UNSET_DEFAULTS, **(defaults or {})}
    resolved = copy.deepcopy(config)
    for path, value in values.items():
        group, key = path.split(".")
        if group in resolved and key in resolved[group] and resolved[group][key] is None:
            resolved[group][key] = value
    return resolved


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # diffusers-format directory, hub id, or single-file .safetensors/.ckpt (A1111 layout); "" = the shipped toy-world model
    config.model_tokenizer = ""  # tokenizer(s) to use instead of the model's: a diffusers model or tokenizer folder (a single file has none; README)
    config.clip_skip = 1  # SD 1/2: condition on the text encoder's N-th layer from the end (A1111's "Clip skip"; 2 for anime models)
    config.seed = 0
    config.dtype = "auto"  # frozen models' dtype: auto = bfloat16 on GPU/TPU, float32 on CPU; or float32, bfloat16, float16
    config.attention_backend = "auto"  # auto, xla, chunked, cudnn or pallas (jax_inversion/core/platform.py)
    config.concepts = ""  # batch inversion: concepts.yaml or a folder of concept folders ("" = one concept)
    config.init_from = ""  # an exported embedding file (diffusers / A1111 / extended) to start from
    config.data = data_config()
    config.train = train_config()
    config.loss, config.loss_options = loss_config()
    # How the method samples its concept where a run's own recipe is used (toyworld eval, benchmarks/quality.py).
    config.sampling = ml_collections.ConfigDict()
    config.sampling.layout_guidance = False  # Compositional Inversion's spatial inversion on two-object prompts (configs/compositional.py)
    return config


def data_config() -> ml_collections.ConfigDict:
    """``config.data``: the concept's images, its token and prompts, and the phases' extra tokens."""
    data = ml_collections.ConfigDict()
    data.concept_dir = ""  # "" with model "" = the toy world's unnamed star
    data.placeholder_token = "<concept>"
    data.initializer_token = ""  # a word or phrase spread over the vectors in order (see tokens.initializer_groups); "" = random init
    data.num_vectors = ml_collections.config_dict.placeholder(int)  # vectors of the placeholder; unset: 1 (8 on the embedded default)
    data.learnable_property = "object"  # "object" | "style"
    data.templates = ml_collections.config_dict.placeholder(tuple)  # custom templates with one "{}"
    data.caption_extension = ""  # e.g. ".txt": a caption file beside an image (holding "{}" or the placeholder) is its prompt; images without one use the templates
    data.resolution = 0  # 0 = the model's native resolution
    data.center_crop = True
    data.random_crops_per_image = 4  # cached crops per image when center_crop is False
    data.flip_probability = 0.5
    data.mask_dir = ""  # concept masks named like the images (white = concept), for masked/location losses
    data.box = ml_collections.config_dict.placeholder(tuple)  # [x0, y0, x1, y1] mask for every image when no mask_dir
    data.class_word = ""  # the concept's class word for reference prompts; "" = initializer_token
    data.append_class_word = False  # prompts say "<concept> <class word>" (Compositional Inversion's "S* cat")
    # Subject separation (Lego): a subject token learned first on subject-only images, then frozen.
    data.subject_token = ""  # "" = no subject phase
    data.subject_dir = ""
    data.subject_mask_dir = ""
    data.subject_initializer_token = ""
    data.subject_num_vectors = 1
    data.concept_before_subject = True  # phase 2 prompts "<cpt> <subj>" (an adjective/state first); False: "<subj> <cpt>"
    # Per-timestep-stage tokens (SeFi-IDE): rows per stage of num_train_timesteps / num_stages.
    data.num_stages = 1
    data.separate_kv = False  # separate rows feeding cross-attention keys and values
    return data


def train_config() -> ml_collections.ConfigDict:
    """``config.train``: steps, optimizer, timesteps, memory, and the loop's side tasks."""
    train = ml_collections.ConfigDict()
    train.num_steps = ml_collections.config_dict.placeholder(int)  # steps of the concept phase; unset: 5000 (2000 on the embedded default)
    train.subject_steps = 0  # steps of the subject phase before it (with data.subject_token)
    train.batch_size = 8  # global batch, split over all devices
    train.learning_rate = 5e-3  # base rate: times the global batch with scale_lr (0.04 at batch 8)
    train.scale_lr = True  # multiply the learning rate by the global batch size
    train.lr_schedule = "constant"  # "constant" | "cosine" | "linear" | "cosine_restarts" | A1111 piecewise "5e-3:200, 1e-3:1000" (rates as written)
    train.lr_cycles = 1  # cosine_restarts: cosine cycles after warmup, each restarting at the full rate
    train.warmup_steps = 0
    train.adam_b1 = 0.9
    train.adam_b2 = 0.999
    train.adam_eps = 1e-8
    train.weight_decay = 1e-2  # applies to the learned rows only; frozen rows never move
    train.max_grad_norm = 0.0  # 0 = no clipping (the original recipes clip nothing)
    train.min_snr_gamma = 0.0  # 0 = off; 5.0 is the usual Min-SNR value
    train.min_timestep = ml_collections.config_dict.placeholder(int)  # timesteps drawn uniformly from [min_timestep, max_timestep) (kohya's --min_timestep); unset: 0 (200 on the embedded default)
    train.max_timestep = 0  # 0 = the scheduler's num_train_timesteps (1000 for SD)
    train.noise_offset = 0.0  # diffusers' --noise_offset: noise += offset * N(0, 1) per example and channel (0 = off)
    train.gradient_accumulation = 1  # k: each step's batch_size examples run as k sequential micro-batches (same step, less memory)
    train.remat = "none"  # "none" | "dots" | "full" | "blocks" (one block at a time): recompute UNet activations to fit bigger batches
    train.profile_steps = ml_collections.config_dict.placeholder(tuple)  # (first, stop): jax.profiler trace of those steps in WORKDIR/profile
    train.compilation_cache = True  # XLA's persistent compilation cache in WORKDIR/xla_cache
    train.log_every = 10
    train.checkpoint_every = 500
    train.export_every = 0  # also write WORKDIR/embeddings/<token>_step_NNNNNN.safetensors every N steps (0 = off); never deleted
    train.keep_checkpoints = 3
    train.validation_every = 0  # steps between validation grids (0 = off)
    train.validation_prompts = ml_collections.config_dict.placeholder(tuple)  # e.g. ("a photo of <concept>",)
    train.validation_images = 2  # per prompt
    train.validation_steps = 25
    train.validation_scheduler = "ddim"  # any sampler of `sample --scheduler`: ddim, dpm++2m, euler, euler_a, dpm++2m_karras, euler_karras
    train.validation_negative_prompt = ""  # the unconditional branch of the grids' guidance, as `sample --negative-prompt`
    train.validation_at_start = False  # also draw the grid before the first step (step_000000.png: the initial rows)
    train.wandb = False  # also log metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    train.wandb_project = "jax-inversion"
    return train


def loss_config() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """``(config.loss, config.loss_options)``: each term's weight, and the options of the terms that have some."""
    # The objective: a weighted sum of pure loss terms (see jax_inversion/objectives/terms.py).
    # Weights of 0 are off; any mix works (e.g. TI + anchor + location).
    loss = ml_collections.ConfigDict()
    loss.diffusion = 1.0  # denoising MSE
    loss.masked_diffusion = 0.0  # denoising MSE inside the concept mask only (Break-A-Scene)
    loss.context = 0.0  # Lego's InfoNCE to positive words vs antonyms
    loss.anchor = 0.0  # Compositional Inversion: sparse non-negative code over anchor words
    loss.anchor_prompt = 0.0  # Compositional Inversion's released code: prompt embeds vs anchor-word prompt
    loss.location = 0.0  # Compositional Inversion: attention mass of the token inside its mask
    loss.attention = 0.0  # SeFi-IDE: attention maps match the class-word prompt's

    options = ml_collections.ConfigDict()
    options.context = ml_collections.ConfigDict()
    options.context.positives = ml_collections.config_dict.placeholder(tuple)  # one word list per concept vector (or one shared)
    options.context.negatives = ml_collections.config_dict.placeholder(tuple)  # antonyms, same shape
    options.context.temperature = 0.07
    options.context.init_from_positives = False  # Lego: start each concept vector at the mean of its positive words (overrides data.initializer_token for those rows)
    options.anchor = ml_collections.ConfigDict()
    options.anchor.words = ml_collections.config_dict.placeholder(tuple)  # None = the 80 COCO classes
    options.anchor.max_atoms = 5  # active anchors in the sparse code
    options.anchor_prompt = ml_collections.ConfigDict()
    options.anchor_prompt.word = ""  # "" = data.initializer_token
    options.location = ml_collections.ConfigDict()
    options.location.resolution = 16  # maps of the cross-attention layers at this side
    options.location.include_mid = True
    options.attention = ml_collections.ConfigDict()
    options.attention.resolution = 16
    options.attention.include_mid = False
    options.attention.reduction = "sum"  # per example: "sum" over pixels and prompt tokens; "mean" averages them
    return loss, options

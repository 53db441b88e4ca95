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

    config.data = ml_collections.ConfigDict()
    config.data.concept_dir = ""  # "" with model "" = the toy world's unnamed star
    config.data.placeholder_token = "<concept>"
    config.data.initializer_token = ""  # a word or phrase spread over the vectors in order (see tokens.initializer_groups); "" = random init
    config.data.num_vectors = ml_collections.config_dict.placeholder(int)  # vectors of the placeholder; unset: 1 (8 on the embedded default)
    config.data.learnable_property = "object"  # "object" | "style"
    config.data.templates = ml_collections.config_dict.placeholder(tuple)  # custom templates with one "{}"
    config.data.caption_extension = ""  # e.g. ".txt": a caption file beside an image (holding "{}" or the placeholder) is its prompt; images without one use the templates
    config.data.resolution = 0  # 0 = the model's native resolution
    config.data.center_crop = True
    config.data.random_crops_per_image = 4  # cached crops per image when center_crop is False
    config.data.flip_probability = 0.5
    config.data.mask_dir = ""  # concept masks named like the images (white = concept), for masked/location losses
    config.data.box = ml_collections.config_dict.placeholder(tuple)  # [x0, y0, x1, y1] mask for every image when no mask_dir
    config.data.class_word = ""  # the concept's class word for reference prompts; "" = initializer_token
    config.data.append_class_word = False  # prompts say "<concept> <class word>" (Compositional Inversion's "S* cat")
    # Subject separation (Lego): a subject token learned first on subject-only images, then frozen.
    config.data.subject_token = ""  # "" = no subject phase
    config.data.subject_dir = ""
    config.data.subject_mask_dir = ""
    config.data.subject_initializer_token = ""
    config.data.subject_num_vectors = 1
    config.data.concept_before_subject = True  # phase 2 prompts "<cpt> <subj>" (an adjective/state first); False: "<subj> <cpt>"
    # Per-timestep-stage tokens (SeFi-IDE): rows per stage of num_train_timesteps / num_stages.
    config.data.num_stages = 1
    config.data.separate_kv = False  # separate rows feeding cross-attention keys and values

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = ml_collections.config_dict.placeholder(int)  # steps of the concept phase; unset: 5000 (2000 on the embedded default)
    config.train.subject_steps = 0  # steps of the subject phase before it (with data.subject_token)
    config.train.batch_size = 8  # global batch, split over all devices
    config.train.learning_rate = 5e-3  # base rate: times the global batch with scale_lr (0.04 at batch 8)
    config.train.scale_lr = True  # multiply the learning rate by the global batch size
    config.train.lr_schedule = "constant"  # "constant" | "cosine" | "linear" | "cosine_restarts" | A1111 piecewise "5e-3:200, 1e-3:1000" (rates as written)
    config.train.lr_cycles = 1  # cosine_restarts: cosine cycles after warmup, each restarting at the full rate
    config.train.warmup_steps = 0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.weight_decay = 1e-2  # applies to the learned rows only; frozen rows never move
    config.train.max_grad_norm = 0.0  # 0 = no clipping (the original recipes clip nothing)
    config.train.min_snr_gamma = 0.0  # 0 = off; 5.0 is the usual Min-SNR value
    config.train.min_timestep = ml_collections.config_dict.placeholder(int)  # timesteps drawn uniformly from [min_timestep, max_timestep) (kohya's --min_timestep); unset: 0 (200 on the embedded default)
    config.train.max_timestep = 0  # 0 = the scheduler's num_train_timesteps (1000 for SD)
    config.train.noise_offset = 0.0  # diffusers' --noise_offset: noise += offset * N(0, 1) per example and channel (0 = off)
    config.train.gradient_accumulation = 1  # k: each step's batch_size examples run as k sequential micro-batches (same step, less memory)
    config.train.remat = "none"  # "none" | "dots" | "full": recompute UNet activations to fit bigger batches
    config.train.profile_steps = ml_collections.config_dict.placeholder(tuple)  # (first, stop): jax.profiler trace of those steps in WORKDIR/profile
    config.train.compilation_cache = True  # XLA's persistent compilation cache in WORKDIR/xla_cache
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.train.export_every = 0  # also write WORKDIR/embeddings/<token>_step_NNNNNN.safetensors every N steps (0 = off); never deleted
    config.train.keep_checkpoints = 3
    config.train.validation_every = 0  # steps between validation grids (0 = off)
    config.train.validation_prompts = ml_collections.config_dict.placeholder(tuple)  # e.g. ("a photo of <concept>",)
    config.train.validation_images = 2  # per prompt
    config.train.validation_steps = 25
    config.train.validation_scheduler = "ddim"  # any sampler of `sample --scheduler`: ddim, dpm++2m, euler, euler_a, dpm++2m_karras, euler_karras
    config.train.validation_negative_prompt = ""  # the unconditional branch of the grids' guidance, as `sample --negative-prompt`
    config.train.validation_at_start = False  # also draw the grid before the first step (step_000000.png: the initial rows)
    config.train.wandb = False  # also log metrics to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    config.train.wandb_project = "jax-inversion"

    # The objective: a weighted sum of pure loss terms (see jax_inversion/objectives/terms.py).
    # Weights of 0 are off; any mix works (e.g. TI + anchor + location).
    config.loss = ml_collections.ConfigDict()
    config.loss.diffusion = 1.0  # denoising MSE
    config.loss.masked_diffusion = 0.0  # denoising MSE inside the concept mask only (Break-A-Scene)
    config.loss.context = 0.0  # Lego's InfoNCE to positive words vs antonyms
    config.loss.anchor = 0.0  # Compositional Inversion: sparse non-negative code over anchor words
    config.loss.anchor_prompt = 0.0  # Compositional Inversion's released code: prompt embeds vs anchor-word prompt
    config.loss.location = 0.0  # Compositional Inversion: attention mass of the token inside its mask
    config.loss.attention = 0.0  # SeFi-IDE: attention maps match the class-word prompt's

    config.loss_options = ml_collections.ConfigDict()
    config.loss_options.context = ml_collections.ConfigDict()
    config.loss_options.context.positives = ml_collections.config_dict.placeholder(tuple)  # one word list per concept vector (or one shared)
    config.loss_options.context.negatives = ml_collections.config_dict.placeholder(tuple)  # antonyms, same shape
    config.loss_options.context.temperature = 0.07
    config.loss_options.context.init_from_positives = False  # Lego: start each concept vector at the mean of its positive words (overrides data.initializer_token for those rows)
    config.loss_options.anchor = ml_collections.ConfigDict()
    config.loss_options.anchor.words = ml_collections.config_dict.placeholder(tuple)  # None = the 80 COCO classes
    config.loss_options.anchor.max_atoms = 5  # active anchors in the sparse code
    config.loss_options.anchor_prompt = ml_collections.ConfigDict()
    config.loss_options.anchor_prompt.word = ""  # "" = data.initializer_token
    config.loss_options.location = ml_collections.ConfigDict()
    config.loss_options.location.resolution = 16  # maps of the cross-attention layers at this side
    config.loss_options.location.include_mid = True
    config.loss_options.attention = ml_collections.ConfigDict()
    config.loss_options.attention.resolution = 16
    config.loss_options.attention.include_mid = False
    config.loss_options.attention.reduction = "sum"  # per example: "sum" over pixels and prompt tokens; "mean" averages them
    return config

"""Textual Inversion (Gal et al. 2022): learn the placeholder's embedding(s) by denoising.

    jax-inversion train --config configs/ti.py --workdir DIR \
        --config.model=PATH --config.data.concept_dir=DIR \
        --config.data.placeholder_token='<cat>' --config.data.initializer_token=cat
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # diffusers-format directory or hub id; "" = the shipped toy-world model
    config.seed = 0
    config.dtype = "float32"  # compute dtype of the frozen models ("bfloat16" on accelerators)
    config.concepts = ""  # batch inversion: concepts.yaml or a folder of concept folders ("" = one concept)
    config.init_from = ""  # an exported embedding file (diffusers / A1111 / extended) to start from

    config.data = ml_collections.ConfigDict()
    config.data.concept_dir = ""  # "" with model "" = the toy world's held-out star
    config.data.placeholder_token = "<concept>"
    config.data.initializer_token = ""  # one-token word; "" = random init
    config.data.num_vectors = 1
    config.data.learnable_property = "object"  # "object" | "style"
    config.data.templates = ml_collections.config_dict.placeholder(tuple)  # custom templates with one "{}"
    config.data.resolution = 0  # 0 = the model's native resolution
    config.data.center_crop = True
    config.data.random_crops_per_image = 4  # cached crops per image when center_crop is False
    config.data.flip_probability = 0.5
    config.data.mask_dir = ""  # concept masks named like the images (white = concept), for masked/location losses
    config.data.box = ml_collections.config_dict.placeholder(tuple)  # [x0, y0, x1, y1] mask for every image when no mask_dir
    config.data.class_word = ""  # the concept's class word for reference prompts; "" = initializer_token
    # Subject separation (Lego): a subject token learned first on subject-only images, then frozen.
    config.data.subject_token = ""  # "" = no subject phase
    config.data.subject_dir = ""
    config.data.subject_mask_dir = ""
    config.data.subject_initializer_token = ""
    config.data.subject_num_vectors = 1
    # Per-timestep-stage tokens (SeFi-IDE): rows per stage of num_train_timesteps / num_stages.
    config.data.num_stages = 1
    config.data.separate_kv = False  # separate rows feeding cross-attention keys and values

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 3000  # steps of the concept phase
    config.train.subject_steps = 0  # steps of the subject phase before it (with data.subject_token)
    config.train.batch_size = 8  # global batch, split over all devices
    config.train.learning_rate = 5e-3
    config.train.scale_lr = False  # multiply the learning rate by the global batch size
    config.train.lr_schedule = "constant"  # "constant" | "cosine"
    config.train.warmup_steps = 0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.weight_decay = 1e-2  # applies to the learned rows only; frozen rows never move
    config.train.max_grad_norm = 1.0  # 0 = no clipping
    config.train.min_snr_gamma = 0.0  # 0 = off; 5.0 is the usual Min-SNR value
    config.train.remat = "none"  # "none" | "dots" | "full": recompute UNet activations to fit bigger batches
    config.train.compilation_cache = True  # XLA's persistent compilation cache in WORKDIR/xla_cache
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.validation_every = 0  # steps between validation grids (0 = off)
    config.train.validation_prompts = ml_collections.config_dict.placeholder(tuple)  # e.g. ("a photo of <concept>",)
    config.train.validation_images = 2  # per prompt
    config.train.validation_steps = 25
    config.train.validation_scheduler = "ddim"

    # The objective: a weighted sum of pure loss terms (see jax_inversion/objectives.py).
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
    return config

"""Textual Inversion (Gal et al. 2022): learn the placeholder's embedding(s) by denoising.

    jax-inversion train --config configs/ti.py --workdir DIR \
        --config.model=PATH --config.data.concept_dir=DIR \
        --config.data.placeholder_token='<cat>' --config.data.initializer_token=cat
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ""  # diffusers-format directory or hub id; "" = the embedded tiny default
    config.seed = 0
    config.dtype = "float32"  # compute dtype of the frozen models ("bfloat16" on accelerators)
    config.init_from = ""  # an exported embedding file (diffusers / A1111 / extended) to start from

    config.data = ml_collections.ConfigDict()
    config.data.concept_dir = ""  # "" with model "" = the embedded default images
    config.data.placeholder_token = "<concept>"
    config.data.initializer_token = ""  # one-token word; "" = random init
    config.data.num_vectors = 1
    config.data.learnable_property = "object"  # "object" | "style"
    config.data.templates = ml_collections.config_dict.placeholder(list)  # custom templates with one "{}"
    config.data.resolution = 0  # 0 = the model's native resolution
    config.data.center_crop = True
    config.data.random_crops_per_image = 4  # cached crops per image when center_crop is False
    config.data.flip_probability = 0.5

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 3000
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
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3

    # The objective: a weighted sum of pure loss terms (see jax_inversion/objectives.py).
    config.loss = ml_collections.ConfigDict()
    config.loss.diffusion = 1.0
    return config

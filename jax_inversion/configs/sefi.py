"""SeFi-IDE (arXiv 2402.00631): per-stage key/value tokens and the subject-wise attention loss.

The timestep range is split into ``data.num_stages`` = 5 equal stages; each has its own key
and value embedding of the subject (``data.separate_kv``): every cross-attention layer takes
keys from the K prompt's states and values from the V prompt's, at the example's stage. The
attention loss (weight 0.003) matches the cross-attention maps of every prompt token at the
16x16 layers to those of the same prompt with the class word in the subject's place.

    jax-inversion train --config configs/sefi.py --workdir DIR --config.model=PATH \
        --config.data.concept_dir=DIR --config.data.initializer_token=person --config.data.class_word=person
Export with ``--format extended`` (per-stage K/V rows); :mod:`jax_inversion.artifacts.torch` loads it into diffusers.
"""
import ml_collections

from jax_inversion.configs import ti


def get_config() -> ml_collections.ConfigDict:
    config = ti.get_config()
    config.data.num_stages = 5
    config.data.separate_kv = True
    config.loss.attention = 0.003
    config.loss_options.attention.resolution = 16
    config.loss_options.attention.include_mid = False
    return config

"""Compositional Inversion (Zhang et al., AAAI 2024): semantic inversion at training, spatial inversion at sampling.

Training (semantic inversion): the objective is ``(1 - lambda) * L_rec + lambda * L_anc`` (lambda = ``anchor_lambda``, 0.95,
the released code's 0.05 / 0.95). The recipe is the released code's: prompts "S* <class>"
(``data.append_class_word``, the class word ``data.class_word`` or the initializer), base lr
0.005 scaled by the batch (0.04 at batch 8), 5,000 steps, no gradient clipping. Both anchor
losses are normalised per prompt input element (77 x d), so lambda means the same in both.
Variants, chosen after a colon (comma separated):

- ``paper`` (default): L_anc is the paper's semantic inversion: a non-negative sparse code
  (at most ``loss_options.anchor.max_atoms`` = 5 anchors of ``loss_options.anchor.words``,
  default the 80 COCO classes) weights the squared distances to the anchors.
- ``code``: the released code's L_anc: the prompt's input embeddings vs the same prompt with
  the anchor word (``loss_options.anchor_prompt.word``, default the initializer) in place.
- ``location``: ours, not the paper's (a Break-A-Scene-like extension): adds a training-time
  attention-location loss (weight ``location_weight``): the token's cross-attention mass at the
  16x16 layers and the mid block should lie inside the concept mask (``data.mask_dir`` or
  ``data.box``).

Sampling (spatial inversion, ``sampling.layout_guidance``, on by default here): in a two-object
prompt ("S* <class> and a dog") the token and the other object's words are guided into the
released code's left and right boxes during the first 10 steps, stopping for good once the
guidance loss falls below 0.2 (``layout_control.py``); ``toyworld eval`` and
``benchmarks/quality.py`` sample a run so, ``sample --layout-guidance`` on request.

    jax-inversion train --config configs/compositional.py:paper,location --workdir DIR \
        --config.model=PATH --config.data.concept_dir=DIR --config.data.mask_dir=MASKS \
        --config.data.initializer_token=cat
"""
import ml_collections

from jax_inversion.configs import ti

VARIANTS = ("paper", "code", "location")


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    chosen = [v for v in (variant or "paper").split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown compositional variant(s) {unknown}: use {', '.join(VARIANTS)} after the colon")
    anchor = "anchor_prompt" if "code" in chosen else "anchor"
    config = ti.get_config()
    config.anchor_lambda = 0.95
    config.location_weight = 0.1 if "location" in chosen else 0.0
    lam = config.get_ref("anchor_lambda")
    config.loss.diffusion = 1.0 - lam
    config.loss[anchor] = lam
    config.loss.location = config.get_ref("location_weight")
    config.loss_options.anchor.max_atoms = 5
    config.data.append_class_word = True  # "S* cat"
    config.train.learning_rate = 5e-3
    config.train.scale_lr = True
    config.train.num_steps = 5000
    config.train.max_grad_norm = 0.0
    config.sampling.layout_guidance = True  # spatial inversion: the paper's second half, at sampling time
    return config

"""Lego (arXiv 2311.13833): subject separation, multi-embedding concepts, context loss.

Phase 1 learns ``<subj>`` on subject-only images; phase 2 learns ``<cpt>`` on the concept
images with prompts "a photo of <cpt> <subj>", ``<subj>`` frozen: the paper's concepts are
adjectives and states ("frozen", "melted"), which English puts before the noun
(``data.concept_before_subject=False`` gives "<subj> <cpt>"). The context loss (InfoNCE)
pulls each concept vector toward its positive words and away from their antonyms. The
optimisation follows Textual Inversion's recipe (lr 5e-3 x batch, no clipping).

    jax-inversion train --config configs/lego.py --workdir DIR --config.model=PATH \
        --config.data.subject_dir=SUBJECT_IMAGES --config.data.concept_dir=CONCEPT_IMAGES \
        --config.data.subject_initializer_token=dog \
        --config.loss_options.context.positives='[["frozen", "ice"]]' \
        --config.loss_options.context.negatives='[["melted", "warm"]]'
"""
import ml_collections

from jax_inversion.configs import ti


def get_config() -> ml_collections.ConfigDict:
    config = ti.get_config()
    config.data.subject_token = "<subj>"
    config.data.placeholder_token = "<cpt>"
    config.data.initializer_token = ""  # a concept word if there is one
    config.data.num_vectors = 1  # "multi-embedding concepts": raise for richer concepts
    config.data.concept_before_subject = True  # "<cpt> <subj>": "a photo of frozen dog"
    config.train.subject_steps = 1000
    config.train.num_steps = 1000
    config.loss.context = 0.01  # ReVersion's released default for its contrastive steering loss; Lego's own value is not known here
    config.loss_options.context.temperature = 0.07  # ReVersion's, likewise
    return config

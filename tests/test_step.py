"""The train step's less travelled settings, one real step each, against hand-computed references: Min-SNR
weights, bfloat16 frozen models (rows and optimizer state stay float32), ``data.box`` masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.commands.default_job import write_concept_images
from jax_inversion.data.dataset import build_dataset, global_batch
from jax_inversion.data.images import BatchSampler
from jax_inversion.training.step import StepConfig, make_forward
from jax_inversion.training.train import setup_run
from tests.helpers import make_config


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    return write_concept_images(str(tmp_path_factory.mktemp("concept")), count=2)


def _one_step(config, workdir, batch=None, with_outputs=True):
    """``(dataset, batch, new state, metrics, forward outputs)`` of one real train step (1 device, key 3) from step 0;
    the outputs are the forward the step ran, recomputed on the same batch and key (None without ``with_outputs``)."""
    run = setup_run(config, jax.devices()[:1])
    phase = run.plan.phases[-1]
    dataset = build_dataset(config, run.model, phase, str(workdir), run.with_masks)
    if batch is None:
        sampler = BatchSampler(dataset.num_images, dataset.num_prompts, config.train.batch_size, 0, config.data.flip_probability)
        batch = global_batch(dataset, sampler, 0, run.mesh, run.with_masks)
    step = run.make_step(phase, dataset.resolution)
    rng = jax.random.PRNGKey(3)
    start = jax.tree_util.tree_map(np.asarray, run.state)
    state, metrics = step(jax.tree_util.tree_map(jnp.array, run.state), batch, rng)
    if not with_outputs:
        return dataset, batch, start, state, metrics, None
    forward = make_forward(run.model, run.schedule, run.placeholder_ids, run.objective,
                           StepConfig(resolution=dataset.resolution, min_snr_gamma=config.train.min_snr_gamma,
                                      trainable=phase.trainable, timestep_range=run.timesteps))
    outputs = jax.jit(lambda rows: forward(rows, step.frozen, batch, jax.random.fold_in(rng, 0)))(start.embeddings)
    return dataset, batch, start, state, metrics, jax.tree_util.tree_map(np.asarray, outputs)


def _snr(timesteps):
    """SD's scaled-linear schedule (the tiny models' scheduler config) by hand: abar / (1 - abar)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)[timesteps]
    return abar / (1.0 - abar)


@pytest.mark.heavy(44)
def test_min_snr_weights_inside_a_step_and_bfloat16_keeps_rows_float32(one_level_sd1, concept_dir, tmp_path):
    """train.min_snr_gamma weighs each example's MSE by min(snr, gamma) / snr (epsilon prediction) in the step's loss.
    dtype=bfloat16 computes the frozen models in bf16; the rows and AdamW's moments stay float32 and the loss stays
    within 2 % of the float32 step's on the same batch and key."""
    config = make_config(one_level_sd1, concept_dir)
    config.train.min_snr_gamma = 1.0
    _, batch, start, state, metrics, outputs = _one_step(config, tmp_path)
    mse = ((outputs["prediction"] - outputs["target"]) ** 2).reshape(len(outputs["timesteps"]), -1).mean(axis=1)
    snr = _snr(outputs["timesteps"])
    weights = np.minimum(snr, 1.0) / snr
    assert weights.min() < 0.99 and weights.max() == 1.0  # both sides of gamma are in the batch
    np.testing.assert_allclose(float(metrics["loss"]), float(np.mean(weights * mse)), rtol=1e-5)

    config.dtype = "bfloat16"
    _, _, _, bf16_state, bf16_metrics, _ = _one_step(config, tmp_path, batch, with_outputs=False)
    floats = [x for x in jax.tree_util.tree_leaves(bf16_state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert bf16_state.embeddings["text_encoder"].dtype == jnp.float32 and floats and all(x.dtype == jnp.float32 for x in floats)
    assert not np.array_equal(np.asarray(bf16_state.embeddings["text_encoder"]), start.embeddings["text_encoder"])
    assert abs(float(bf16_metrics["loss"]) - float(metrics["loss"])) < 0.02 * float(metrics["loss"])


def test_box_masks_reach_the_masked_loss(one_level_sd1, concept_dir, tmp_path):
    """data.box with no mask folder: every image's mask is the box at latent resolution (left half here), and the
    step's masked diffusion loss is the MSE over that half, by hand."""
    config = make_config(one_level_sd1, concept_dir)
    config.loss.diffusion, config.loss.masked_diffusion = 0.0, 1.0
    config.data.box = (0.0, 0.0, 0.5, 1.0)  # x0, y0, x1, y1: the left half
    config.data.flip_probability = 0.0  # (a flipped image's box is flipped too: the right half)
    dataset, _, _, _, metrics, outputs = _one_step(config, tmp_path)
    side = outputs["prediction"].shape[1]
    left = np.zeros((side, side), np.float32)
    left[:, : side // 2] = 1.0
    assert dataset.masks.shape[1:] == (side, side) and all(np.array_equal(m, left) for m in dataset.masks)
    error = ((outputs["prediction"] - outputs["target"]) ** 2).mean(axis=-1)  # [B, h, w]
    np.testing.assert_allclose(float(metrics["loss"]), float(error[:, :, : side // 2].mean()), rtol=1e-5)

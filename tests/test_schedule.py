"""The JAX noise schedule agrees with diffusers' DDPMScheduler and is jit-safe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from jax_inversion.diffusion.schedule import (
    NoiseSchedule,
    add_noise,
    min_snr_weights,
    sample_timesteps,
    snr,
    training_target,
    velocity,
)

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

CONFIGS = {
    "default": {},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": SD15,
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
    "linear_odd_T": {"beta_schedule": "linear", "num_train_timesteps": 37},
    "scaled_linear_zero_snr": {**SD15, "rescale_betas_zero_snr": True},
    "cosine_zero_snr": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    "trained_betas": {"trained_betas": np.linspace(1e-4, 0.03, 50).tolist()},
}


def _torch_scheduler(config):
    return DDPMScheduler(**config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_alphas_cumprod_matches_diffusers(name):
    config = CONFIGS[name]
    ours = NoiseSchedule.from_config(config)
    ref = _torch_scheduler(config).alphas_cumprod.numpy()
    assert ours.alphas_cumprod.dtype == jnp.float32
    assert ours.num_train_timesteps == ref.shape[0]
    atol = 1e-6 if config.get("rescale_betas_zero_snr") else 1e-7
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref, rtol=0, atol=atol)


def test_zero_snr_terminal_is_zero():
    schedule = NoiseSchedule.from_config(CONFIGS["scaled_linear_zero_snr"])
    assert float(schedule.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(snr(schedule, jnp.array([999]))[0]) == pytest.approx(0.0, abs=1e-12)


def test_diffusers_config_keys_are_ignored_and_defaults_apply():
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, **SD15}
    schedule = NoiseSchedule.from_config(config)
    assert schedule.prediction_type == "epsilon"
    assert schedule.num_train_timesteps == 1000
    default = NoiseSchedule.from_config({})
    np.testing.assert_array_equal(
        np.asarray(default.alphas_cumprod), np.asarray(NoiseSchedule.from_config(CONFIGS["linear"]).alphas_cumprod)
    )


def _random_batch(seed, shape_nchw, num_timesteps):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape_nchw).astype(np.float32)
    noise = rng.standard_normal(shape_nchw).astype(np.float32)
    timesteps = rng.integers(0, num_timesteps, size=shape_nchw[0]).astype(np.int64)
    timesteps[0], timesteps[-1] = 0, num_timesteps - 1
    return x0, noise, timesteps


def _nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("name", ["scaled_linear", "squaredcos_cap_v2", "scaled_linear_zero_snr"])
def test_add_noise_and_velocity_match_diffusers(name):
    config = CONFIGS[name]
    ours = NoiseSchedule.from_config(config)
    ref = _torch_scheduler(config)
    x0, noise, t = _random_batch(0, (6, 4, 8, 5), ours.num_train_timesteps)
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)

    expected_noisy = ref.add_noise(tx0, tnoise, tt).numpy().transpose(0, 2, 3, 1)
    expected_v = ref.get_velocity(tx0, tnoise, tt).numpy().transpose(0, 2, 3, 1)
    jt = jnp.asarray(t, jnp.int32)
    np.testing.assert_allclose(np.asarray(add_noise(ours, _nhwc(x0), _nhwc(noise), jt)), expected_noisy, atol=1e-6)
    np.testing.assert_allclose(np.asarray(velocity(ours, _nhwc(x0), _nhwc(noise), jt)), expected_v, atol=1e-6)


def test_add_noise_keeps_dtype():
    schedule = NoiseSchedule.from_config(SD15)
    x0 = jnp.ones((2, 4, 4, 3), jnp.bfloat16)
    out = add_noise(schedule, x0, x0, jnp.array([1, 500]))
    assert out.dtype == jnp.bfloat16
    assert out.shape == x0.shape


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_prediction_type(prediction_type):
    schedule = NoiseSchedule.from_config({**SD15, "prediction_type": prediction_type})
    assert schedule.prediction_type == prediction_type
    x0, noise, t = _random_batch(1, (3, 4, 4, 2), 1000)
    x0, noise, jt = _nhwc(x0), _nhwc(noise), jnp.asarray(t, jnp.int32)
    expected = {"epsilon": noise, "v_prediction": velocity(schedule, x0, noise, jt), "sample": x0}[prediction_type]
    np.testing.assert_array_equal(np.asarray(training_target(schedule, x0, noise, jt)), np.asarray(expected))


def test_snr_definition():
    schedule = NoiseSchedule.from_config(SD15)
    acp = np.asarray(schedule.alphas_cumprod, np.float64)
    t = np.array([0, 10, 500, 999])
    np.testing.assert_allclose(np.asarray(snr(schedule, jnp.asarray(t))), acp[t] / (1 - acp[t]), rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_by_hand(prediction_type):
    schedule = NoiseSchedule.from_config({**SD15, "prediction_type": prediction_type})
    acp = np.asarray(schedule.alphas_cumprod, np.float64)
    gamma = 5.0
    t = np.array([50, 800])
    s = acp[t] / (1.0 - acp[t])
    assert s[0] > gamma > s[1]
    if prediction_type == "epsilon":
        expected = [gamma / s[0], 1.0]
    elif prediction_type == "v_prediction":
        expected = [gamma / (s[0] + 1.0), s[1] / (s[1] + 1.0)]
    else:
        expected = [gamma, s[1]]
    got = np.asarray(min_snr_weights(schedule, jnp.asarray(t), gamma))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("gamma", [None, 0, 0.0, -1.0])
def test_min_snr_weights_disabled(gamma):
    schedule = NoiseSchedule.from_config({**SD15, "prediction_type": "v_prediction"})
    got = min_snr_weights(schedule, jnp.array([0, 400, 999]), gamma)
    np.testing.assert_array_equal(np.asarray(got), np.ones(3, np.float32))


def test_min_snr_weights_finite_at_zero_terminal_snr():
    schedule = NoiseSchedule.from_config(CONFIGS["scaled_linear_zero_snr"])
    got = np.asarray(min_snr_weights(schedule, jnp.array([0, 999]), 5.0))
    assert np.all(np.isfinite(got))
    assert got[1] == 1.0


@pytest.mark.parametrize(
    "config, key",
    [
        ({"beta_schedule": "sigmoid_typo"}, "beta_schedule"),
        ({"prediction_type": "noise"}, "prediction_type"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_bad_config_raises_naming_key(config, key):
    with pytest.raises(ValueError) as info:
        NoiseSchedule.from_config(config)
    message = str(info.value)
    assert key in message
    assert "\n" not in message
    if key == "beta_schedule":
        assert all(v in message for v in ("linear", "scaled_linear", "squaredcos_cap_v2"))
    if key == "prediction_type":
        assert all(v in message for v in ("epsilon", "v_prediction", "sample"))


def test_sample_timesteps_range_and_shape():
    schedule = NoiseSchedule.from_config(SD15)
    t = sample_timesteps(jax.random.PRNGKey(0), 4096, schedule)
    assert t.shape == (4096,) and t.dtype == jnp.int32
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    assert int(t.max()) > 900 and int(t.min()) < 100
    t = sample_timesteps(jax.random.PRNGKey(1), 512, schedule, low=200, high=300)
    assert int(t.min()) >= 200 and int(t.max()) < 300
    with pytest.raises(ValueError):
        sample_timesteps(jax.random.PRNGKey(1), 4, schedule, low=10, high=2000)


def test_everything_under_jit():
    schedule = NoiseSchedule.from_config({**SD15, "prediction_type": "v_prediction"})
    x0, noise, _ = _random_batch(2, (4, 4, 6, 6), 1000)
    x0, noise = _nhwc(x0), _nhwc(noise)

    @jax.jit
    def step(schedule, rng, x0, noise):
        t = sample_timesteps(rng, x0.shape[0], schedule)
        noisy = add_noise(schedule, x0, noise, t)
        target = training_target(schedule, x0, noise, t)
        weights = min_snr_weights(schedule, t, 5.0)
        return t, noisy, target, weights, snr(schedule, t)

    rng = jax.random.PRNGKey(3)
    t, noisy, target, weights, ratio = step(schedule, rng, x0, noise)
    np.testing.assert_allclose(np.asarray(noisy), np.asarray(add_noise(schedule, x0, noise, t)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(target), np.asarray(velocity(schedule, x0, noise, t)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(min_snr_weights(schedule, t, 5.0)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ratio), np.asarray(snr(schedule, t)), rtol=1e-6)

    # Gradients of the noising and the v target by hand: noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,
    # v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, abar from SD's scaled-linear betas computed here in numpy.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)[np.asarray(t)].reshape(-1, 1, 1, 1)
    d_noisy = jax.grad(lambda a, b: add_noise(schedule, a, b, t).sum(), argnums=(0, 1))(x0, noise)
    d_target = jax.grad(lambda a, b: training_target(schedule, a, b, t).sum(), argnums=(0, 1))(x0, noise)
    for got, want in zip(d_noisy + d_target, (np.sqrt(abar), np.sqrt(1 - abar), -np.sqrt(1 - abar), np.sqrt(abar))):
        np.testing.assert_allclose(np.asarray(got), np.broadcast_to(want, x0.shape), rtol=1e-5)

    leaves, treedef = jax.tree_util.tree_flatten(schedule)
    assert len(leaves) == 1
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.prediction_type == "v_prediction" and rebuilt.num_train_timesteps == 1000

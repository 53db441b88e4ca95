"""Our JAX samplers reproduce diffusers' DDIM, DPM-Solver++(2M), Euler and Euler ancestral schedulers,
with and without Karras sigmas (PyTorch, fp32); the ancestral steps get the same noise as ours."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from jax_inversion.diffusion.samplers import SAMPLERS, make_sampler, sample_loop

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}

GRID = [
    (name, prediction, spacing, 10 if spacing == "leading" else 15, {})
    for name, prediction, spacing in itertools.product(SAMPLERS, ("epsilon", "v_prediction"), ("leading", "trailing"))
]
EXTRA = [
    ("euler", "epsilon", "linspace", 12, {}),
    ("euler", "sample", "leading", 10, {"final_sigmas_type": "sigma_min"}),
    ("dpm++2m", "v_prediction", "linspace", 20, {"final_sigmas_type": "sigma_min"}),
    ("dpm++2m", "epsilon", "leading", 16, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("dpm++2m", "sample", "trailing", 10, {"rescale_betas_zero_snr": True}),
    ("ddim", "sample", "linspace", 12, {"clip_sample": True, "clip_sample_range": 0.8, "set_alpha_to_one": True}),
    ("ddim", "v_prediction", "trailing", 10, {"rescale_betas_zero_snr": True, "steps_offset": 0}),
    ("euler_a", "epsilon", "linspace", 20, {}),
    ("euler_a", "v_prediction", "trailing", 10, {"rescale_betas_zero_snr": True}),
    ("euler_karras", "epsilon", "linspace", 20, {"final_sigmas_type": "sigma_min"}),
    ("euler_karras", "v_prediction", "linspace", 12, {"sigma_min": 0.1, "sigma_max": 10.0}),
    ("dpm++2m_karras", "epsilon", "linspace", 20, {}),
    ("dpm++2m_karras", "sample", "linspace", 25, {"final_sigmas_type": "sigma_min"}),
    ("dpm++2m_karras", "epsilon", "linspace", 12, {"beta_schedule": "squaredcos_cap_v2"}),
    ("dpm++2m_karras", "v_prediction", "trailing", 10, {"rescale_betas_zero_snr": True}),
]
KEY = jax.random.PRNGKey(42)  # the per-step noise of euler_a


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Tiny torch modules run fastest on one thread, and do not stall when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_scheduler(name, config):
    karras = name.endswith("_karras")
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name.startswith("euler"):
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, use_karras_sigmas=karras
    )


def feed_step_noise(monkeypatch, sampler, shape):
    """diffusers' ancestral step draws its noise with ``randn_tensor``: hand it ours (``KEY`` folded
    with each step index), NCHW, in step order. Returns a check that every step took one."""
    noises = iter([nchw(sampler.step_noise(KEY, i, shape)) for i in range(sampler.num_steps)] if sampler.stochastic else [])
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda shape, **kwargs: next(noises))
    return lambda: next(noises, None) is None


def torch_sample(scheduler, denoise, noise, steps):
    """The diffusers pipeline loop: scale the noise, then scale input, denoise and step per timestep."""
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):  # else repeated timesteps (Karras, cosine betas) throw its step index off
        scheduler.set_begin_index(0)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(denoise(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x.numpy()


def toy_torch(x, t):
    """A crude noise/velocity/data predictor that keeps the latents O(1) for every prediction type."""
    return torch.sqrt(t.float() / 1000) * x + 0.1 * torch.tanh(x)


def toy_jax(x, t, i):
    return jnp.sqrt(t.astype(jnp.float32) / 1000) * x + 0.1 * jnp.tanh(x)


def noise_nhwc(shape=(2, 8, 8, 4), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name,prediction,spacing,steps,extra", GRID + EXTRA)
def test_toy_denoiser_matches_diffusers(name, prediction, spacing, steps, extra, monkeypatch):
    config = {**SD_CONFIG, "prediction_type": prediction, "timestep_spacing": spacing, **extra}
    sampler = make_sampler(name, config, steps)
    assert sampler.name == name
    reference = torch_scheduler(name, config)
    noise = noise_nhwc()
    all_noise_used = feed_step_noise(monkeypatch, sampler, noise.shape)
    expected = torch_sample(reference, toy_torch, nchw(noise), steps)
    assert all_noise_used()

    if name == "euler_karras":  # fractional timesteps of the sigmas; torch's float32 pow(0.5) is off sqrt by an ulp here and there
        np.testing.assert_allclose(sampler.timesteps, reference.timesteps.numpy(), rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(sampler.timesteps, reference.timesteps.numpy())
    assert sampler.timesteps.shape == (steps,)
    assert sampler.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
    if name == "ddim":
        acp = reference.alphas_cumprod.numpy()[reference.timesteps.numpy()]
        np.testing.assert_allclose(sampler.sigmas[:-1], np.sqrt((1 - acp) / acp), rtol=1e-6)
    else:
        np.testing.assert_allclose(sampler.sigmas, reference.sigmas.numpy(), rtol=1e-6)

    latents = jnp.asarray(noise) * sampler.init_noise_sigma
    ours = jax.jit(lambda x: sample_loop(sampler, toy_jax, x, key=KEY))(latents)
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert np.isfinite(ours).all()
    assert np.abs(ours - noise.transpose(0, 3, 1, 2)).max() > 0.1
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_eager_steps_and_gradients_agree_with_loop(name):
    config = {**SD_CONFIG, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    sampler = make_sampler(name, config, 6)
    latents = sampler.initial_latents(jnp.asarray(noise_nhwc(seed=1)))
    run = jax.jit(lambda x: sample_loop(sampler, toy_jax, x, key=KEY))
    x, state = latents, sampler.init_state(latents)
    for i in range(sampler.num_steps):
        out = toy_jax(sampler.scale_model_input(x, i), jnp.asarray(sampler.timesteps[i]), i)
        x, state = sampler.step(state, out, i, x, sampler.step_noise(KEY, i, x.shape))
    np.testing.assert_allclose(np.asarray(x), np.asarray(run(latents)), atol=1e-6, rtol=0)
    assert float(sampler.sigma(0)) > float(sampler.sigma(sampler.num_steps - 1)) > 0
    grad = jax.grad(lambda x: run(x).sum())(latents)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


def test_euler_a_noise_follows_the_key():
    """Same key, same latents; another key, other latents (all steps but the last add noise); no key: an error."""
    sampler = make_sampler("euler_a", SD_CONFIG, 8)
    latents = sampler.initial_latents(jnp.asarray(noise_nhwc(seed=2)))
    run = jax.jit(lambda x, key: sample_loop(sampler, toy_jax, x, key=key))
    first, again, other = (np.asarray(run(latents, k)) for k in (KEY, KEY, jax.random.PRNGKey(43)))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2
    assert sampler.stochastic and sampler.sigma_space and not make_sampler("euler_karras", SD_CONFIG, 8).stochastic
    assert float(sampler.coefs["sigma_up"][-1]) == 0.0 and (sampler.coefs["sigma_up"][:-1] > 0).all()
    with pytest.raises(ValueError, match="PRNG key"):
        sample_loop(sampler, toy_jax, latents)
    with pytest.raises(ValueError, match="step noise"):
        sampler.step((), latents, 0, latents)


def test_unknown_sampler_and_bad_configs_raise():
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'.*ddim, dpm\+\+2m, euler"):
        make_sampler("plms", SD_CONFIG, 10)
    with pytest.raises(ValueError, match="thresholding"):
        make_sampler("ddim", {**SD_CONFIG, "thresholding": True}, 10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_sampler("euler", {**SD_CONFIG, "timestep_spacing": "karras"}, 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("dpm++2m", SD_CONFIG, 0)


def _unet_pair(path):
    from diffusers import UNet2DConditionModel

    from jax_inversion.models.loading import load_pretrained

    ours = load_pretrained(path, components=("unet",))
    reference = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32).eval()
    return ours, reference


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2"])
@pytest.mark.heavy(29)
def test_tiny_unet_with_guidance_matches_diffusers(fixture, request, monkeypatch):
    """10 guided steps of each sampler with our Flax UNet equal diffusers' pipeline loop with its UNet.

    The bound is 1e-4 absolute, or 10 ppm of the latents' range where the random epsilon model
    drives them to ~30: fp32 rounding differences (~1e-6 relative) are amplified by guidance
    and 1/sqrt(alphas_cumprod), so even the two UNets under one diffusers scheduler differ by ~7e-5 there.
    """
    ours, reference = _unet_pair(request.getfixturevalue(fixture))
    config = ours.scheduler_config
    assert config["prediction_type"] == {"tiny_sd1": "epsilon", "tiny_sd2": "v_prediction"}[fixture]
    rng = np.random.default_rng(7)
    width = ours.unet.config.cross_attention_dim[0]
    cond, uncond = (rng.standard_normal((2, 77, width)).astype(np.float32) for _ in range(2))
    noise = noise_nhwc((2, 8, 8, 4), seed=3)
    guidance = 7.5
    states = jnp.asarray(np.concatenate([uncond, cond]))
    torch_states = torch.from_numpy(np.concatenate([uncond, cond]))

    def denoise_jax(x, t, i):
        out = ours.unet.apply({"params": ours.unet_params}, jnp.concatenate([x, x]), t, states)
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def denoise_torch(x, t):
        out = reference(torch.cat([x, x]), t, torch_states).sample
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    for name in ("ddim", "dpm++2m", "euler", "euler_a"):  # the Karras ones differ only in tables (the toy test)
        sampler = make_sampler(name, config, 10)
        feed_step_noise(monkeypatch, sampler, noise.shape)
        expected = torch_sample(torch_scheduler(name, config), denoise_torch, nchw(noise), 10)
        latents = sampler.initial_latents(jnp.asarray(noise))
        result = jax.jit(lambda x: sample_loop(sampler, denoise_jax, x, key=KEY))(latents)
        result = np.asarray(result).transpose(0, 3, 1, 2)
        assert np.abs(expected - noise.transpose(0, 3, 1, 2) * sampler.init_noise_sigma).max() > 0.1
        diff = np.abs(result - expected).max()
        scale = np.abs(expected).max()
        assert diff < max(1e-4, 1e-5 * scale), f"{fixture}/{name}: max abs diff {diff:.3e} at scale {scale:.1f}"

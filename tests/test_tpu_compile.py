"""The train step compiled for a TPU slice on this CPU (libtpu, compile-only devices: no TPU needed).

libtpu comes with the ``test`` extra; ``JAX_PLATFORMS=cpu`` (conftest) keeps jax from probing for a
chip. The test runs ``jax-inversion compile`` as a user would and checks its JSON against the TPU
compiler's own program text: the Mosaic kernel (``tpu_custom_call``) is in the compiled step.
"""
import json
import os
import subprocess
import sys

import pytest

from jax_inversion.models.tiny import TINY_SCHEDULER, TINY_UNET, TINY_VAE, tiny_text_config, write_config_only_model


SEFI_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sefi.py")


def run_compile(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jax_inversion.cli", "compile", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.heavy(60)
def test_the_auto_step_compiles_for_a_v5e_slice_with_the_tpu_kernel_on_its_long_layers(tmp_path):
    """SeFi-IDE's step: TI's diffusion term plus per-stage key/value rows and the class-word reference forward,
    the step libtpu 0.0.42 segfaulted on until that forward ran whole on TPU (``StepConfig.whole_reference_forward``).

    The UNet has one level (every attention layer at 32 x 32 latents, 1,024 tokens), which halves the compile
    (54 s -> 33 s alone); which layers get the kernel on the two-level UNet is test_attention's
    ``test_unet_with_pallas_attention_in_interpret_mode_equals_xla``."""
    one_level = dict(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D"], attention_head_dim=[2])
    unet = {**{k: v for k, v in TINY_UNET.items() if k != "_class_name"}, **one_level}
    vae = {k: v for k, v in TINY_VAE.items() if k != "_class_name"}
    model = write_config_only_model(str(tmp_path / "model"), unet, vae, tiny_text_config(None, 0, 0), TINY_SCHEDULER)
    assert not [f for _, _, files in os.walk(model) for f in files if f.endswith((".safetensors", ".bin"))]  # configs only
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    result = run_compile("--topology=v5e:2x4", "--json", "--search_remat=", f"--config={SEFI_CONFIG}", f"--config.model={model}",
                         f"--config.data.resolution={32 * factor}",  # 32x32 latents: 1,024-token self-attention
                         "--config.loss_options.attention.resolution=32",  # the term reads the only level's maps
                         "--config.train.batch_size=16", "--config.data.initializer_token=cat", "--config.data.class_word=cat")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["topology"] == "v5e:2x4" and report["chips"] == 8 and report["batch_per_chip"] == 2
    assert report["compiled"] and report["fits"] and report["error"] == ""
    assert report["hbm_bytes_per_chip"] == 16 * 2**30 and 0 < report["bytes_per_chip"] < report["hbm_bytes_per_chip"]
    assert report["flops_per_step"] > 0
    # The self-attention layers (down, mid, two up) run the TPU kernel; the cross-attention layers, whose maps the
    # attention term reads, compute their probabilities themselves and are not counted. The compiler's program
    # holds the Mosaic kernels themselves.
    assert report["attention"] == {"splash": 4}
    assert report["phases"][0]["tpu_kernel_calls"] >= 4


def test_an_unknown_topology_is_one_line_and_exit_1():
    result = run_compile("--topology=v9:2x2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("compile: unknown TPU generation 'v9' in --topology v9:2x2: use one of v4")


@pytest.mark.parametrize("limit", [0, 1, 5, 12, 64, 100])
def test_the_largest_batch_search_finds_the_last_batch_that_fits(monkeypatch, limit):
    """Checked against a stand-in compiler whose peak grows linearly with the batch (1 GiB + 1 GiB per
    example per chip) on 4 chips: after two peaks the line predicts the answer, and one more compile
    confirms it; the answer is capped at MAX_BATCH_PER_CHIP."""
    from jax_inversion.training import tpu_plan
    from jax_inversion.configs.ti import get_config

    compiled = []

    def peak(config, devices, batch_size):
        compiled.append(batch_size // len(devices))
        assert config.train.remat == "dots" and config.train.gradient_accumulation == 1
        return (1 + batch_size // len(devices)) * 2**30

    monkeypatch.setattr(tpu_plan, "_peak", peak)
    capacity = (1 + limit) * 2**30 + 5
    found = tpu_plan.largest_batch_per_chip(get_config(), [object()] * 4, capacity, "dots").largest
    assert found == min(limit, tpu_plan.MAX_BATCH_PER_CHIP)
    assert len(compiled) == len(set(compiled)) == {0: 1, 1: 2, 5: 4, 12: 4, 64: 3, 100: 3}[limit]  # 1, 2, the line's answer, one above

    # The report's own compile (8 per chip) is known: the search starts from it when it fits, is bounded by it when not.
    compiled.clear()
    known = {8: (1 + 8) * 2**30}
    found, peaks = tpu_plan.largest_batch_per_chip(get_config(), [object()] * 4, capacity, "dots", known)
    assert peaks == {b: (1 + b) * 2**30 for b in [8, *compiled]}  # every peak the answer rests on, the known one too
    assert found == min(limit, tpu_plan.MAX_BATCH_PER_CHIP)
    assert len(compiled) == len(set(compiled)) and 8 not in compiled
    if limit >= 8:
        assert min(compiled) > 8  # nothing below the known fit is compiled
        assert compiled == {12: [16, 12, 13], 64: [16, 64], 100: [16, 64]}[limit]
    else:
        assert max(compiled) < 8


@pytest.mark.parametrize("capacity_gib", [1.4, 3.0, 9.5, 20.0, 31.0, 47.0, 90.0, 200.0])
@pytest.mark.parametrize("bend", ["up", "flat"])
def test_the_largest_batch_search_survives_a_curved_peak_and_misses_that_do_not_compile(monkeypatch, capacity_gib, bend):
    """A peak that bends upward, or flattens toward the capacity as the TPU compiler's does when it rematerializes
    near the chip's HBM (so the line overshoots either way), and a compiler that refuses every batch that does not
    fit, as the TPU compiler does (RESOURCE_EXHAUSTED: no peak to learn from): the answer is still the last
    batch that fits, found by brute force here, in at most about 2 log2(64) compiles, each batch once."""
    from jax_inversion.training import tpu_plan
    from jax_inversion.configs.ti import get_config

    capacity = int(capacity_gib * 2**30)
    if bend == "up":
        true_peak = lambda per_chip: int((1 + 0.25 * per_chip + 0.01 * per_chip**2) * 2**30)
    else:  # rises fast, then flattens just below the capacity and crosses it late (SD1.5 on v5e: 7.7, 12.9, 14.7, 15.0 GiB)
        true_peak = lambda per_chip: int((capacity_gib * (1 - 0.5 * 0.9 ** per_chip) + 0.02 * max(0, per_chip - 30)) * 2**30)
    compiled = []

    def peak(config, devices, batch_size):
        compiled.append(batch_size // len(devices))
        value = true_peak(batch_size // len(devices))
        return value if value <= capacity else None

    monkeypatch.setattr(tpu_plan, "_peak", peak)
    expected = max((b for b in range(1, tpu_plan.MAX_BATCH_PER_CHIP + 1) if true_peak(b) <= capacity), default=0)
    for known in ({}, {8: peak(None, [0], 8)}):
        compiled.clear()
        found = tpu_plan.largest_batch_per_chip(get_config(), [object()], capacity, "dots", known).largest
        assert found == expected, (known, compiled)
        assert len(compiled) == len(set(compiled)) <= 2 * 6 + 2


@pytest.mark.parametrize("error,searched", [
    ("JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
     "(25.17G) exceeds available HBM (15.75G).", True),  # SDXL at 1024 px, 8 per chip, on v5e: a smaller batch may fit
    ("NotImplementedError: Mosaic kernels cannot be automatically partitioned. Please wrap the call in a shard_map.", False),
])
def test_a_step_refused_for_memory_still_gets_its_largest_batch(monkeypatch, error, searched):
    """The report's own batch (8 per chip) does not compile: refused for HBM, the search runs from below it (the
    answer a user needs most then) and the lines say it; any other compile error is reported without a search.
    A stand-in compiler (no step is compiled): 1 GiB + 1 GiB per example per chip against 4.5 GiB of HBM."""
    import types

    from jax_inversion.configs.ti import get_config
    from jax_inversion.training import tpu_plan

    devices = [types.SimpleNamespace(device_kind="TPU v5 lite", process_index=k // 4) for k in range(8)]
    monkeypatch.setattr(tpu_plan, "topology_devices", lambda name: devices)
    monkeypatch.setattr(tpu_plan, "hbm_bytes", lambda name, n: int(4.5 * 2**30))
    model = types.SimpleNamespace(unet=types.SimpleNamespace(dtype="bfloat16"))
    monkeypatch.setattr(tpu_plan, "setup_run", lambda config, devices, shapes_only: types.SimpleNamespace(resolution=64, model=model))
    monkeypatch.setattr(tpu_plan, "compile_phases", lambda run, batch_size: [tpu_plan.PhaseCompile("concept", None, {}, error)])
    compiled = []

    def peak(config, devices, batch_size):
        compiled.append(batch_size // len(devices))
        per_chip = 1 + batch_size // len(devices)
        return per_chip * 2**30 if per_chip <= 4.5 else None  # what does not fit does not compile, as on TPU

    monkeypatch.setattr(tpu_plan, "_peak", peak)
    config = get_config()
    config.train.batch_size = 64
    report = tpu_plan.plan_topology(config, "v5e:2x4", search=("none", "blocks"))
    assert not report["compiled"] and not report["fits"] and report["error"] == error
    lines = tpu_plan.format_report(report).splitlines()
    assert lines[1] == f"not compiled: {error}"
    if not searched:
        assert compiled == [] and "largest_batch_per_chip" not in report and len(lines) == 2
        return
    assert report["largest_batch_per_chip"] == {"none": 3, "blocks": 3}
    assert report["search_peaks"]["none"]["8"] is None and "8" not in report["search_peaks"]["blocks"]  # known for none only
    assert report["search_peaks"]["none"]["3"] == 4 * 2**30 and report["search_peaks"]["none"]["4"] is None
    assert lines[2] == "largest batch per chip that fits: remat none: 3, remat blocks: 3"


@pytest.mark.parametrize("topology,devices,gib", [
    ("v4:2x2x1", 8, 16),  # 4 chips of 32 GiB, one device per TensorCore
    ("v5e:2x4", 8, 16), ("v5e:4x4", 16, 16), ("v5p:2x2x1", 4, 95), ("v6e:2x4", 8, 32),
])
def test_hbm_per_device_is_the_chips_hbm_shared_by_its_devices(topology, devices, gib):
    from jax_inversion.training.tpu_plan import hbm_bytes

    assert hbm_bytes(topology, devices) == gib * 2**30

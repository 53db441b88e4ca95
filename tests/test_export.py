"""Export to the files PyTorch pipelines load, proven in diffusers; import back; extended tokens."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.artifacts.checkpoints import read_run
from jax_inversion.artifacts.export import ExportError, export_run, read_embedding_file
from jax_inversion.commands.default_job import write_concept_images
from jax_inversion.configs.ti import get_config
from jax_inversion.training.train import train
from tests.helpers import make_config
from tests.xla_flags import xla_flags


@pytest.fixture(scope="module")
def run(one_level_sd1, tmp_path_factory):
    concept = write_concept_images(str(tmp_path_factory.mktemp("concept")), count=2)
    workdir = str(tmp_path_factory.mktemp("run"))
    config = make_config(one_level_sd1, concept, num_steps=4, checkpoint_every=2)
    train(config, workdir)
    _, state, _ = read_run(workdir)
    return workdir, np.asarray(state["embeddings"]["text_encoder"]), config


@pytest.fixture(scope="module")
def pipeline_factory(one_level_sd1):
    import torch
    from diffusers import StableDiffusionPipeline

    def make():
        return StableDiffusionPipeline.from_pretrained(one_level_sd1, safety_checker=None, torch_dtype=torch.float32)

    return make


@pytest.mark.parametrize(
    "fmt,name,token",
    [("diffusers", "e.safetensors", None), ("diffusers", "e.bin", None), ("a1111", "e.pt", None), ("a1111", "e.safetensors", "<ball>")],
)
def test_export_loads_in_diffusers_bit_exact(run, pipeline_factory, tmp_path, fmt, name, token):
    workdir, rows, _ = run
    path = str(tmp_path / name)
    assert export_run(workdir, path, fmt) == [path]
    pipe = pipeline_factory()
    pipe.load_textual_inversion(path, token=token)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<ball>", "<ball>_1"])
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids].detach().numpy()
    assert np.array_equal(loaded, rows)
    assert pipe.maybe_convert_prompt("a <ball>", pipe.tokenizer) == "a <ball> <ball>_1"


def test_export_earlier_step_and_all(run, tmp_path):
    workdir, rows, _ = run
    _, early, _ = read_run(workdir, 2)
    export_run(workdir, str(tmp_path / "s2.safetensors"), "diffusers", step=2)
    assert np.array_equal(read_embedding_file(str(tmp_path / "s2.safetensors"))["rows"]["text_encoder"], np.asarray(early["embeddings"]["text_encoder"]))
    assert not np.array_equal(np.asarray(early["embeddings"]["text_encoder"]), rows)
    written = export_run(workdir, str(tmp_path / "all"), "diffusers", all_concepts=True)
    assert written == [str(tmp_path / "all" / "ball-ti.safetensors")]  # A1111's trigger "ball-ti", never the word "ball"


def test_round_trip_export_import(run, tmp_path):
    workdir, rows, config = run
    for fmt, name in [("diffusers", "rt.safetensors"), ("a1111", "rt.pt"), ("extended", "rt_ext.safetensors")]:
        path = str(tmp_path / name)
        export_run(workdir, path, fmt)
        again = get_config()
        again.update_from_flattened_dict({"model": config.model, "data.concept_dir": config.data.concept_dir,
                                         "data.placeholder_token": "<ball>", "data.num_vectors": 2,
                                         "train.batch_size": 8, "train.num_steps": 0, "init_from": path})
        state = train(again, str(tmp_path / f"import_{fmt}"))
        assert np.array_equal(np.asarray(state.embeddings["text_encoder"]), rows), fmt


def test_import_shape_checked(run, tmp_path):
    workdir, _, config = run
    from safetensors.numpy import save_file

    from jax_inversion.artifacts.export import initial_rows_from_file

    wide = str(tmp_path / "wide.safetensors")
    save_file({"<x>": np.zeros((2, 768), np.float32)}, wide)
    with pytest.raises(ExportError, match="768-wide"):
        initial_rows_from_file(wide, {"text_encoder": 32}, 2)
    with pytest.raises(ExportError, match="num_vectors=3"):
        initial_rows_from_file(wide, {"text_encoder": 768}, 3)


def test_extended_tokens_torch_processor_equals_flax(one_level_sd1, tmp_path):
    """Per-stage K/V rows and per-layer rows: diffusers UNet + our processor == our Flax UNet."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from jax_inversion.text import tokens as tokens_lib
    from jax_inversion.artifacts.extended import read_extended, write_extended
    from tests.helpers import flax_conditioning
    from jax_inversion.models.loading import load_pretrained
    from jax_inversion.models.unet import cross_attention_layers
    from jax_inversion.artifacts.torch import ExtendedTokens

    rng = np.random.default_rng(0)
    n, d, stages = 2, 32, 5
    layer = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    path_kv, path_layer = str(tmp_path / "kv.safetensors"), str(tmp_path / "layer.safetensors")
    rows = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    write_extended(path_kv, {"<subj>": {"base": rows(n, d), "key": rows(stages, n, d), "value": rows(stages, n, d)}})
    write_extended(path_layer, {"<subj>": {"base": rows(n, d), "layers": {layer: rows(n, d)}}})

    model = load_pretrained(one_level_sd1)
    torch_unet = UNet2DConditionModel.from_pretrained(one_level_sd1, subfolder="unet").eval()
    assert layer in cross_attention_layers(model.unet.config, 16)
    sample = rng.standard_normal((3, 16, 16, 4)).astype(np.float32)
    timesteps = np.array([10, 450, 990])  # stages 0, 2, 4
    for path in (path_kv, path_layer):
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(one_level_sd1, "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(one_level_sd1, "text_encoder")).eval()
        tokens = ExtendedTokens.load(path)
        tokens.add_to(tokenizer, text_encoder)
        states = tokens.encode(tokenizer, text_encoder, ["a photo of <subj>", "<subj> on the beach", "a <subj> cube"])
        tokens.install(torch_unet, states)
        with torch.no_grad():
            ref = torch_unet(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps), states.base).sample.numpy()
        tokens.uninstall(torch_unet)

        flax_tokenizer = load_pretrained(one_level_sd1, components=()).tokenizer
        layout = tokens_lib.add_placeholder_tokens(flax_tokenizer, tokens.strings)
        ids = flax_tokenizer([tokens.prompt(p) for p in ["a photo of <subj>", "<subj> on the beach", "a <subj> cube"]],
                             padding="max_length", max_length=77, return_tensors="np").input_ids
        parts = read_extended(path)["<subj>"]
        conditioning = flax_conditioning(model.text_encoder, model.text_encoder_params, jnp.asarray(ids),
                                         layout.first_id, parts, jnp.asarray(timesteps))
        ours = model.unet.apply({"params": model.unet_params}, jnp.asarray(sample), jnp.asarray(timesteps), conditioning)
        np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)
        # And the tokens do something: plain base conditioning gives another output.
        plain = model.unet.apply({"params": model.unet_params}, jnp.asarray(sample), jnp.asarray(timesteps),
                                 flax_conditioning(model.text_encoder, model.text_encoder_params, jnp.asarray(ids),
                                                   layout.first_id, {"base": parts["base"]}))
        assert float(np.abs(np.asarray(plain).transpose(0, 3, 1, 2) - ref).max()) > 1e-3


def _export_cli(*args):
    return subprocess.run([sys.executable, "-m", "jax_inversion.cli", "export", *args], capture_output=True, text=True)


def _last_line(result):
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


def test_bad_export_requests(run, tmp_path):
    workdir, _, _ = run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no checkpoints" in _last_line(_export_cli(f"--workdir={empty}", f"--out={tmp_path}/x.safetensors"))
    assert "available steps are [2, 4]" in _last_line(_export_cli(f"--workdir={workdir}", "--step=3", f"--out={tmp_path}/x.safetensors"))
    assert "two text encoders" in _last_line(_export_cli(f"--workdir={workdir}", "--format=sdxl", f"--out={tmp_path}/x.safetensors"))
    existing = tmp_path / "keep.safetensors"
    existing.write_bytes(b"precious")
    assert "--overwrite" in _last_line(_export_cli(f"--workdir={workdir}", f"--out={existing}"))
    assert existing.read_bytes() == b"precious"
    ok = _export_cli(f"--workdir={workdir}", f"--out={existing}", "--overwrite")
    assert ok.returncode == 0 and read_embedding_file(str(existing))["token"] == "<ball>"
    assert ".pt or .safetensors" in _last_line(_export_cli(f"--workdir={workdir}", "--format=a1111", f"--out={tmp_path}/x.bin"))


def test_multi_concept_run_exports_all_or_one_extended_file(tmp_path):
    """A run holding two concepts (e.g. Lego's <subj> and <cpt>): --all writes one file per
    concept, extended writes both tokens in one file, a single diffusers file is refused."""
    import jax.numpy as jnp

    from jax_inversion.artifacts.checkpoints import CheckpointManager
    from jax_inversion.artifacts.extended import read_extended

    rows = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    meta = {"model": "m", "placeholder_token": "<subj>", "layout": {"tokens": ["<subj>", "<cpt>", "<cpt>_1"], "first_id": 10},
            "embedding_dim": 8, "concepts": [{"name": "<subj>", "rows": [0, 1]}, {"name": "<cpt>", "rows": [1, 3]}]}
    manager = CheckpointManager(str(tmp_path / "run"), 1, 1)
    manager.save(5, {"embeddings": {"text_encoder": jnp.asarray(rows)}, "step": jnp.asarray(5)}, meta, force=True)
    manager.wait()
    with pytest.raises(ExportError, match="pass --all"):
        export_run(str(tmp_path / "run"), str(tmp_path / "x.safetensors"), "diffusers")
    written = export_run(str(tmp_path / "run"), str(tmp_path / "out"), "diffusers", all_concepts=True)
    assert [os.path.basename(p) for p in written] == ["subj-ti.safetensors", "cpt-ti.safetensors"]
    assert np.array_equal(read_embedding_file(written[1])["rows"]["text_encoder"], rows[1:3])
    assert read_embedding_file(written[1])["token"] == "<cpt>"
    one = export_run(str(tmp_path / "run"), str(tmp_path / "both.safetensors"), "extended")[0]
    both = read_extended(one)
    assert set(both) == {"<subj>", "<cpt>"} and np.array_equal(both["<cpt>"]["base"], rows[1:3])


def test_export_on_another_device_count(run, tmp_path):
    """A run trained on 8 devices exports from a 1-device process (a pod run read on a laptop)."""
    import os

    from jax_inversion.artifacts.export import read_embedding_file

    workdir, rows, _ = run
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    done = subprocess.run([sys.executable, "-m", "jax_inversion.cli", "export", f"--workdir={workdir}",
                           f"--out={tmp_path}/one.safetensors"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(read_embedding_file(f"{tmp_path}/one.safetensors")["rows"]["text_encoder"], rows)


def test_atomic_write_gives_the_usual_permissions_and_keeps_what_exists(tmp_path):
    """Outputs are readable as any new file is (umask), not mkstemp's 0600; no overwrite keeps the old file."""
    from jax_inversion.core.files import atomic_write

    path = str(tmp_path / "embedding.safetensors")
    old_umask = os.umask(0o022)
    try:
        atomic_write(path, lambda tmp: open(tmp, "w").write("first"), overwrite=False)
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o644
    with pytest.raises(FileExistsError, match="--overwrite"):
        atomic_write(path, lambda tmp: open(tmp, "w").write("second"), overwrite=False)
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["embedding.safetensors"]


def _data_section_sha256(path: str) -> str:
    """sha256 of a safetensors file's bytes after its header, read straight from disk (modelspec's hash_sha256)."""
    import hashlib

    blob = open(path, "rb").read()
    return "0x" + hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little") :]).hexdigest()


def test_exports_carry_modelspec_and_a1111_metadata(run, one_level_sd1, tmp_path):
    """Every export says what it is: modelspec keys (architecture ending in textual-inversion, trigger, date,
    resolution, tensors' hash), base model name and hash, steps, vectors, method, clip skip; the .pt has A1111's
    fields; export --info prints them, and a foreign file's too."""
    import datetime
    import glob
    import hashlib

    import torch
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from jax_inversion.artifacts.export import describe_file

    workdir, rows, _ = run
    unet_files = sorted(glob.glob(os.path.join(one_level_sd1, "unet", "*.safetensors")))
    digest = hashlib.sha256()
    for f in unet_files:
        digest.update(open(f, "rb").read())
    base_sha = digest.hexdigest()
    for fmt, name in [("diffusers", "d.safetensors"), ("a1111", "a.safetensors"), ("extended", "x.safetensors")]:
        path = export_run(workdir, str(tmp_path / name), fmt)[0]
        with safe_open(path, framework="np") as f:
            meta = f.metadata()
        assert meta["modelspec.sai_model_spec"] == "1.0.0"
        assert meta["modelspec.architecture"].endswith("/textual-inversion")
        assert meta["modelspec.trigger_phrase"] == ("a" if fmt == "a1111" else "<ball>")  # A1111 triggers by file name
        assert meta["jax_inversion.steps"] == "4" and meta["jax_inversion.vectors"] == "2"
        assert meta["jax_inversion.method"] == "textual inversion" and meta["jax_inversion.clip_skip"] == "1"
        assert meta["jax_inversion.base_model"] == os.path.basename(one_level_sd1)
        assert meta["jax_inversion.base_model_sha256"] == base_sha
        assert meta["modelspec.resolution"] == "32x32"  # the tiny model's native side: UNet 16 x VAE factor 2
        assert meta["modelspec.hash_sha256"] == _data_section_sha256(path)
        written = datetime.datetime.fromisoformat(meta["modelspec.date"])
        assert abs((datetime.datetime.now(datetime.timezone.utc) - written).total_seconds()) < 600
    pt = export_run(workdir, str(tmp_path / "ball-ti.pt"), "a1111")[0]
    payload = torch.load(pt, weights_only=True)
    assert payload["name"] == "<ball>" and payload["step"] == 4  # diffusers' loader takes the token from "name"
    assert payload["sd_checkpoint"] is None  # a diffusers folder is no A1111 checkpoint file: no short hash to give
    assert payload["sd_checkpoint_name"] == os.path.basename(one_level_sd1)
    assert payload["metadata"]["jax_inversion.token"] == "<ball>"
    info = describe_file(pt)
    assert info["format"] == "A1111 .pt" and info["step"] == 4 and info["tokens"] == {"<ball>": "2 x 32"}
    # another tool's file: kohya/A1111 safetensors without metadata
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"emb_params": np.zeros((3, 768), np.float32)}, foreign)
    info = describe_file(foreign)
    assert info["format"].startswith("A1111/kohya") and info["model family"] == "SD 1.x" and "metadata" not in info
    out = subprocess.run([sys.executable, "-m", "jax_inversion.cli", "export", "--info", pt], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "sd_checkpoint_name: " + os.path.basename(one_level_sd1) in out.stdout and "modelspec.trigger_phrase: ball-ti" in out.stdout


def test_trigger_file_names_and_a1111_short_hash():
    """--all names a file (A1111's trigger word) so that it never equals an ordinary word; A1111's sd_checkpoint is
    the first 10 hex digits of the base file's sha256 (its "AutoV2"), and only a single file has one."""
    from jax_inversion.artifacts.export import a1111_checkpoint_fields, describe_method, trigger_file_name

    assert trigger_file_name("<cat>") == "cat-ti" and trigger_file_name("<my cat>") == "my_cat-ti"
    assert trigger_file_name("sks") == "sks"
    sha = "0123456789abcdef" * 4
    assert a1111_checkpoint_fields({"base_model": {"path": "/m/v1-5.safetensors", "sha256": sha, "name": "v1-5"}}) == ("0123456789", "v1-5")
    assert a1111_checkpoint_fields({"base_model": {"path": "/m/sd15", "sha256": sha, "name": "sd15"}}) == (None, "sd15")
    assert a1111_checkpoint_fields({}) == (None, None)
    assert describe_method({"loss": {"diffusion": 1.0, "anchor": 0.0}}) == "textual inversion"
    assert describe_method({"loss": {"diffusion": 1.0, "anchor": 0.95}, "data": {"num_stages": 4, "separate_kv": True}}) == (
        "diffusion 1 + anchor 0.95; 4 timestep stages, K/V")

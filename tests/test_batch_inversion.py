"""Batch inversion: many concepts in one job equal each concept trained alone."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_inversion.artifacts.checkpoints import read_run
from jax_inversion.commands.default_job import write_concept_images
from tests.xla_flags import xla_flags


@pytest.fixture(scope="module")
def concept_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    for i, name in enumerate(["ball", "cube", "dot", "star"]):
        write_concept_images(str(root / name), count=2 + i % 2, seed=10 + i)
    return str(root)


def _config(model, steps):
    from tests.helpers import make_config

    config = make_config(model, "", num_steps=steps, batch_size=2, checkpoint_every=steps, log_every=1,
                         learning_rate=5e-2, max_grad_norm=0.05)
    config.data.placeholder_token = "<concept>"
    config.data.initializer_token = ""  # random init: exercises each concept's seed
    config.seed = 3
    return config


@pytest.mark.heavy(60)
def test_joint_training_equals_each_concept_alone(one_level_sd1, concept_root, tmp_path):
    """4 concepts x batch 2 on 8 devices vs each concept alone (batch 2 on 2 devices, its seed):
    same rows after 3 steps. Clipping is per concept and tight enough (0.05) to act."""
    from jax_inversion.artifacts.export import read_embedding_file
    from jax_inversion.training.train import train

    steps = 3
    joint = _config(one_level_sd1, steps)
    joint.concepts = concept_root
    train(joint, str(tmp_path / "joint"))
    _, state, meta = read_run(str(tmp_path / "joint"))
    rows = np.asarray(state["embeddings"]["text_encoder"])
    assert rows.shape == (4, 2, 32)
    names = [c["name"] for c in sorted(meta["concept_batch"], key=lambda c: c["index"])]
    assert names == ["<ball>", "<cube>", "<dot>", "<star>"]

    with open(tmp_path / "joint" / "metrics.jsonl") as f:
        import json

        record = json.loads(f.readline())
    assert {f"concept/{n}" for n in names} <= set(record)
    assert record["loss"] == pytest.approx(sum(record[f"concept/{n}"] for n in names), rel=1e-5)

    # Gradient accumulation in batch inversion: 2 micro-batches (each concept's examples split between them) give
    # the same steps as the whole concept-major batch.
    accumulated = _config(one_level_sd1, steps)
    accumulated.concepts = concept_root
    accumulated.train.gradient_accumulation = 2
    train(accumulated, str(tmp_path / "accumulated"))
    same = np.asarray(read_run(str(tmp_path / "accumulated"))[1]["embeddings"]["text_encoder"])
    np.testing.assert_allclose(same, rows, atol=1e-5 * np.abs(rows).max(), rtol=1e-4)

    for index, name in enumerate(names):
        alone = _config(one_level_sd1, steps)
        alone.seed = 3 + index  # the seed the batch gave this concept
        alone.data.concept_dir = os.path.join(concept_root, name.strip("<>"))
        train(alone, str(tmp_path / name.strip("<>")), devices=jax.devices()[:2])
        expected = np.asarray(read_run(str(tmp_path / name.strip("<>")))[1]["embeddings"]["text_encoder"])
        initial_moved = np.abs(expected).max()
        np.testing.assert_allclose(rows[index], expected, atol=1e-5 * initial_moved, rtol=1e-4, err_msg=name)

    # One file per concept, exported by a 1-device process from the 8-device run's checkpoint.
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    done = subprocess.run([sys.executable, "-m", "jax_inversion.cli", "export", f"--workdir={tmp_path / 'joint'}",
                           f"--out={tmp_path / 'exported'}", "--all"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "exported")) == ["ball-ti.safetensors", "cube-ti.safetensors", "dot-ti.safetensors",
                                                         "star-ti.safetensors"]
    parsed = read_embedding_file(str(tmp_path / "exported" / "dot-ti.safetensors"))
    assert parsed["token"] == "<dot>"
    np.testing.assert_array_equal(parsed["rows"]["text_encoder"], rows[2])


def test_concept_list_yaml_and_errors(tmp_path, concept_root):
    from jax_inversion.configs.ti import get_config
    from jax_inversion.data.images import DataError
    from jax_inversion.data.phases import read_concept_list

    config = get_config()
    config.seed = 7
    path = tmp_path / "concepts.yaml"
    path.write_text(f"- {{name: '<ball>', dir: {concept_root}/ball, initializer: ball}}\n- {{name: '<cube>', dir: cube, seed: 42}}\n")
    concepts = read_concept_list(str(path), config)
    assert [(c.name, c.initializer, c.seed) for c in concepts] == [("<ball>", "ball", 7), ("<cube>", "", 42)]
    assert concepts[1].image_dir == str(tmp_path / "cube")  # relative to the YAML file
    path.write_text("- {name: '<a>', dir: x}\n- {name: '<a>', dir: y}\n")
    with pytest.raises(DataError, match="repeat"):
        read_concept_list(str(path), config)
    path.write_text("- {name: '<a>', folder: x}\n")
    with pytest.raises(DataError, match="needs 'name' and 'dir'"):
        read_concept_list(str(path), config)
    with pytest.raises(DataError, match="neither a YAML file nor a folder"):
        read_concept_list(str(tmp_path / "missing.yaml"), config)

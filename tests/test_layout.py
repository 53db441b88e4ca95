"""Layout model: JSONL checks, training to the targets, valid boxes, file round trip, fallback, CLI."""
import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jax_inversion.sampling import layout
from jax_inversion.sampling.layout import FIXED_BOXES, LayoutError

WORDS = ["cat", "dog", "toy", "cube", "ball", "sphere"]
HEIGHTS = dict(zip(WORDS, [0.6, 0.5, 0.3, 0.4, 0.2, 0.7]))
SLOTS = ((0.05, 0.45), (0.55, 0.95))


def make_text_model(directory: str) -> str:
    """A tiny model with only tokenizer + text encoder (random rows): what train-layout loads, in a second."""
    from transformers import CLIPTokenizer

    from jax_inversion.models import tiny
    from jax_inversion.models import clip

    tiny.write_clip_tokenizer(os.path.join(directory, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    config = tiny.tiny_text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    abstract = clip.init_abstract_params(clip.CLIPTextTransformer(clip.CLIPTextConfig.from_dict(config)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), abstract)
    tiny.write_component(os.path.join(directory, "text_encoder"), config, params, "model.safetensors")
    tiny.write_model_index(directory)
    return directory


def synthetic_records():
    """Every ordered pair: the word earlier in WORDS goes left; each word has its own height."""
    def box(slot, word):
        h = HEIGHTS[word]
        return [SLOTS[slot][0], 0.5 - h / 2, SLOTS[slot][1], 0.5 + h / 2]

    records = []
    for a, b in itertools.permutations(WORDS, 2):
        left_first = WORDS.index(a) < WORDS.index(b)
        records.append({"words": [a, b], "boxes": [box(0 if left_first else 1, a), box(1 if left_first else 0, b)]})
    return records


def assert_valid(box_i, box_j):
    for box in (box_i, box_j):
        assert box.shape == (4,)
        assert np.all(np.isfinite(box)) and np.all(box >= 0) and np.all(box <= 1)
        assert box[0] < box[2] and box[1] < box[3]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from jax_inversion.models.loading import load_pretrained

    path = make_text_model(str(tmp_path_factory.mktemp("tiny_text")))
    model = load_pretrained(path, components=("text_encoder",))
    table = np.asarray(model.text_encoder_params["text_model"]["embeddings"]["token_embedding"]["embedding"])
    return path, model.tokenizer, table


@pytest.fixture(scope="module")
def trained(text_model):
    _, tokenizer, table = text_model
    records = synthetic_records()
    params, history = layout.train_layout_model(records, tokenizer, table, steps=300, learning_rate=3e-3, seed=0, hidden=64)
    return records, layout.LayoutPredictor(params, **layout.model_config(params)), history


def test_training_reaches_targets(text_model, trained):
    _, tokenizer, table = text_model
    records, predictor, history = trained
    assert history.shape == (300,) and history[-1] < 0.1 * history[0]
    for record in records:
        predicted = np.stack(layout.predict_boxes(predictor, tokenizer, table, *record["words"]))
        assert np.abs(predicted - np.asarray(record["boxes"])).max() < 0.05, record["words"]


def test_boxes_always_valid(text_model, trained):
    _, _, table = text_model
    _, predictor, _ = trained
    d = table.shape[1]
    fresh_params = layout.LayoutMLP(hidden=16).init(jax.random.PRNGKey(1), np.zeros((1, 2 * d), np.float32))["params"]
    fresh = layout.LayoutPredictor(fresh_params, **layout.model_config(fresh_params))
    rng = np.random.default_rng(0)
    for model in (predictor, fresh):
        for scale in (0.0, 1e-3, 0.02, 1.0, 1e4):
            for _ in range(5):
                assert_valid(*model.boxes(scale * rng.standard_normal(d), scale * rng.standard_normal(d)))
    raw = np.asarray([[-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, 1e4, 1e4], [1e4, -1e4, -1e4, 1e4]], np.float32)
    for box in np.asarray(layout.boxes_from_logits(raw)):
        assert_valid(box, box)


def test_save_load_round_trip_and_overwrite(text_model, trained, tmp_path):
    _, tokenizer, table = text_model
    records, predictor, _ = trained
    path = str(tmp_path / "layout.safetensors")
    layout.save_layout_model(path, predictor.params, {"pairs": len(records)})
    loaded = layout.load_layout_model(path)
    assert (loaded.hidden, loaded.layers, loaded.embedding_dim, loaded.meta) == (64, 2, table.shape[1], {"pairs": len(records)})
    for words in (["cat", "dog"], ["sphere", "toy"], ["red cube", "ball"]):
        assert np.array_equal(
            np.stack(layout.predict_boxes(path, tokenizer, table, *words)),
            np.stack(layout.predict_boxes(predictor, tokenizer, table, *words)),
        )
    before = os.path.getmtime(path), open(path, "rb").read()
    with pytest.raises(LayoutError, match="already exists.*--overwrite"):
        layout.save_layout_model(path, predictor.params)
    assert (os.path.getmtime(path), open(path, "rb").read()) == before
    layout.save_layout_model(path, predictor.params, {"v": 2}, overwrite=True)
    assert layout.load_layout_model(path).meta == {"v": 2}
    assert os.listdir(tmp_path) == ["layout.safetensors"]


def test_wrong_files_and_inputs(trained, tmp_path):
    _, predictor, _ = trained
    embedding = str(tmp_path / "embedding.safetensors")
    save_file({"<cat>": np.zeros((1, 32), np.float32)}, embedding)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(LayoutError, match="not a layout model"):
        layout.load_layout_model(embedding)
    with pytest.raises(LayoutError, match="cannot read"):
        layout.load_layout_model(str(garbage))
    with pytest.raises(LayoutError, match="missing"):
        layout.load_layout_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(LayoutError, match=r"shape \(768,\).*expects \(32,\)"):
        predictor.boxes(np.zeros(768), np.zeros(768))
    with pytest.raises(LayoutError, match="non-finite"):
        predictor.boxes(np.full(32, np.nan), np.zeros(32))


def test_multi_row_embeddings_are_averaged(text_model, trained):
    _, tokenizer, table = text_model
    _, predictor, _ = trained
    ids = tokenizer.encode("red cube", add_special_tokens=False)
    assert len(ids) == 2
    assert np.allclose(layout.word_embedding(tokenizer, table, "red cube"), table[ids].mean(0))
    rows = table[ids]
    assert np.array_equal(
        np.stack(layout.predict_boxes_from_embeddings(predictor, rows, table[ids[0]])),
        np.stack(predictor.boxes(rows.mean(0), table[ids[0]])),
    )


def test_fallback_is_fixed_boxes(text_model):
    _, tokenizer, table = text_model
    for boxes in (layout.predict_boxes(None, tokenizer, table, "cat", "dog"),
                  layout.predict_boxes_from_embeddings(None, table[0], table[1])):
        assert np.array_equal(np.stack(boxes), np.asarray(FIXED_BOXES, np.float32))


GOOD = '{"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5, 0.8], [0.6, 0.2, 0.95, 0.8]]}'


@pytest.mark.parametrize(
    "line,problem",
    [
        ('{"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5, 0.8]', "not valid JSON"),
        ('["cat", "dog"]', 'with "words" and "boxes"'),
        ('{"words": ["cat"], "boxes": [[0.1, 0.2, 0.5, 0.8], [0.6, 0.2, 0.95, 0.8]]}', "2 non-empty strings"),
        ('{"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5, 0.8]]}', "2 boxes"),
        ('{"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5], [0.6, 0.2, 0.95, 0.8]]}', "4 numbers"),
        ('{"words": ["cat", "dog"], "boxes": [[10, 20, 50, 80], [0.6, 0.2, 0.95, 0.8]]}', "outside \\[0, 1\\].*not pixels"),
        ('{"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5, 0.8], [0.9, 0.2, 0.6, 0.8]]}', "box 1 .*x0 < x1"),
    ],
)
def test_bad_jsonl_line(tmp_path, line, problem):
    path = tmp_path / "layout.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n")
    with pytest.raises(LayoutError, match=f"layout.jsonl:3: .*{problem}") as info:
        layout.read_layout_jsonl(str(path))
    assert "\n" not in str(info.value)


def test_read_jsonl(tmp_path):
    path = tmp_path / "layout.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\n")
    assert layout.read_layout_jsonl(str(path))[1] == {"words": ["cat", "dog"], "boxes": [[0.1, 0.2, 0.5, 0.8], [0.6, 0.2, 0.95, 0.8]]}
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LayoutError, match="no records"):
        layout.read_layout_jsonl(str(tmp_path / "empty.jsonl"))


_CLI = (
    "import sys; from jax_inversion import cli; "
    "cli.COMMANDS.setdefault('train-layout', ('train_layout', 'layout model')); cli.run(sys.argv)"
)


def _cli(*args):
    return subprocess.run([sys.executable, "-c", _CLI, "train-layout", *args], capture_output=True, text=True)


def test_train_layout_command(text_model, tmp_path):
    model_dir, tokenizer, table = text_model
    data = tmp_path / "layout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    out = str(tmp_path / "layout.safetensors")
    ok = _cli(f"--model={model_dir}", f"--data={data}", f"--out={out}", "--steps=100", "--hidden=32", "--learning_rate=3e-3")
    assert ok.returncode == 0, ok.stderr
    assert f"wrote {out}: 30 pairs, 100 steps, loss" in ok.stdout
    predictor = layout.load_layout_model(out)
    assert predictor.meta["pairs"] == 30 and predictor.hidden == 32
    assert_valid(*layout.predict_boxes(out, tokenizer, table, "cat", "dog"))
    again = _cli(f"--model={model_dir}", f"--data={data}", f"--out={out}")
    assert again.returncode == 1 and "--overwrite" in again.stderr.strip().splitlines()[-1]
    data.write_text(GOOD + '\n{"words": ["cat", "dog"], "boxes": [[0, 0, 1, 1], [0, 0, 2, 1]]}\n')
    bad = _cli(f"--model={model_dir}", f"--data={data}", f"--out={tmp_path / 'other.safetensors'}")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith(f"train-layout: {data}:2: box 1")

"""Tests for the textual-inversion input pipeline (images, prompts, batch sampling)."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from jax_inversion.data import images as data
from jax_inversion.data.images import BatchSampler, DataError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _save(path, size=(32, 24), color=(10, 200, 30), **kwargs):
    Image.new("RGB", size, color).save(path, **kwargs)
    return str(path)


def _half_red_image(size=(40, 20)):
    """Red left half, blue right half."""
    img = Image.new("RGB", size, BLUE)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), RED), (0, 0))
    return img


def _is(pixel, color):
    return np.allclose(pixel, np.array(color) / 127.5 - 1.0, atol=0.15)


def test_list_concept_images_filters_and_sorts(tmp_path, caplog):
    _save(tmp_path / "b.png")
    _save(tmp_path / "a.jpg")
    _save(tmp_path / "c.WEBP")
    _save(tmp_path / "d.jpeg")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    os.mkdir(tmp_path / "sub")
    _save(tmp_path / "sub" / "e.png")
    with caplog.at_level(logging.WARNING):
        paths = data.list_concept_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["a.jpg", "b.png", "c.WEBP", "d.jpeg"]
    assert "notes.txt" in caplog.text
    assert ".DS_Store" not in caplog.text


def test_list_concept_images_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.list_concept_images(str(tmp_path / "missing"))
    file_path = _save(tmp_path / "x.png")
    with pytest.raises(DataError, match="not a directory"):
        data.list_concept_images(file_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images"):
        data.list_concept_images(str(empty))


def test_exif_rotation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "rotated.jpg")
    _half_red_image().save(path, exif=exif, quality=95)
    assert data.open_image(path).size == (20, 40)
    out = data.load_image(path, 16)
    assert out.shape == (16, 16, 3)
    assert _is(out[1, 8], RED)
    assert _is(out[14, 8], BLUE)


def test_alpha_flattened_onto_white(tmp_path):
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    img.paste(Image.new("RGBA", (8, 16), (0, 0, 0, 0)), (0, 0))
    path = str(tmp_path / "alpha.png")
    img.save(path)
    out = data.load_image(path, 16)
    assert np.allclose(out[:, :8], 1.0)
    assert _is(out[4, 12], RED)

    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (4, 0, 8, 8))
    pal_path = str(tmp_path / "pal.png")
    pal.save(pal_path, transparency=0)
    out = data.load_image(pal_path, 8)
    assert np.allclose(out[:, :4], 1.0)
    assert _is(out[4, 6], RED)


def test_load_image_shape_range_and_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    path = str(tmp_path / "noise.png")
    noise.save(path)
    out = data.load_image(path, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    gray = str(tmp_path / "gray.png")
    Image.new("L", (10, 10), 0).save(gray)
    assert np.allclose(data.load_image(gray, 12), -1.0)


def test_corrupt_file_names_it(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(DataError, match="broken.png") as err:
        data.load_image(str(path), 16)
    assert "remove or replace it" in str(err.value)


def test_random_crop(tmp_path):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (16, 128, 3), dtype=np.uint8)).save(path)
    a = data.load_image(path, 16, center_crop=False, rng=np.random.default_rng(0))
    b = data.load_image(path, 16, center_crop=False, rng=np.random.default_rng(5))
    again = data.load_image(path, 16, center_crop=False, rng=np.random.default_rng(0))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, again)
    with pytest.raises(ValueError, match="rng"):
        data.load_image(path, 16, center_crop=False)


def test_templates():
    assert len(data.OBJECT_TEMPLATES) == 27 and len(data.STYLE_TEMPLATES) == 19
    assert data.templates_for("object", None)[0] == "a photo of a {}"
    assert data.templates_for("style", None)[0] == "a painting in the style of {}"
    assert data.templates_for("object", ["{} on a beach", "a {} toy"]) == ["{} on a beach", "a {} toy"]
    with pytest.raises(DataError, match="object"):
        data.templates_for("animal", None)
    with pytest.raises(DataError, match="exactly one"):
        data.templates_for("object", ["a photo"])
    with pytest.raises(DataError, match="exactly one"):
        data.templates_for("object", ["{} and {}"])
    with pytest.raises(DataError, match="stray braces"):
        data.templates_for("object", ["{} in {place}"])


def test_placeholder_string():
    assert data.placeholder_string("<cat>", 1) == "<cat>"
    assert data.placeholder_string("<cat>", 3) == "<cat> <cat>_1 <cat>_2"
    with pytest.raises(DataError):
        data.placeholder_string("<cat>", 0)
    with pytest.raises(DataError):
        data.placeholder_string("my cat", 1)


def test_tokenize_prompts(tmp_path):
    from transformers import CLIPTokenizer

    from jax_inversion.models.tokenizer_files import write_clip_tokenizer

    write_clip_tokenizer(str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = data.tokenize_prompts(tokenizer, ["a photo of a cat", "a dog " * 100])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert ids[1, -1] == tokenizer.eos_token_id
    assert data.tokenize_prompts(tokenizer, ["a cat"], max_length=10).shape == (1, 10)


def test_sampler_deterministic_and_resumable():
    s = BatchSampler(num_images=5, num_prompts=27, global_batch_size=4, seed=3)
    run = [s.indices(step) for step in range(10)]
    fresh = BatchSampler(num_images=5, num_prompts=27, global_batch_size=4, seed=3)
    for step in reversed(range(10)):
        for key in ("image", "prompt", "flip"):
            np.testing.assert_array_equal(run[step][key], fresh.indices(step)[key])
            assert run[step][key].shape == (4,) and run[step][key].dtype == np.int32
    other = BatchSampler(num_images=5, num_prompts=27, global_batch_size=4, seed=4)
    assert any(not np.array_equal(run[i]["prompt"], other.indices(i)["prompt"]) for i in range(10))
    flips = np.concatenate([r["flip"] for r in run])
    assert set(flips.tolist()) == {0, 1}
    no_flip = BatchSampler(5, 27, 4, seed=3, flip_probability=0.0)
    assert all(not no_flip.indices(i)["flip"].any() for i in range(10))


@pytest.mark.parametrize("num_images,batch", [(5, 4), (3, 8), (7, 7), (1, 2)])
def test_sampler_images_even(num_images, batch):
    s = BatchSampler(num_images, 10, batch, seed=0)
    steps = 12
    stream = np.concatenate([s.indices(i)["image"] for i in range(steps)])
    for start in range(0, len(stream) - num_images + 1, num_images):
        assert sorted(stream[start:start + num_images].tolist()) == list(range(num_images))
    for length in (batch, len(stream) - 1, len(stream)):
        counts = np.bincount(stream[:length], minlength=num_images)
        assert set(counts.tolist()) <= {length // num_images, -(-length // num_images)}


def test_host_slices_concatenate():
    s = BatchSampler(6, 4, 8, seed=1)
    batch = s.indices(3)
    for hosts in (1, 2, 4, 8):
        parts = [s.host_slice(batch, i, hosts) for i in range(hosts)]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
    with pytest.raises(DataError, match="divisible"):
        s.host_slice(batch, 0, 3)


def test_sampler_validation():
    with pytest.raises(DataError):
        BatchSampler(0, 1, 1, seed=0)
    with pytest.raises(DataError):
        BatchSampler(1, 1, 1, seed=0, flip_probability=1.5)

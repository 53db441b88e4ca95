"""Auxiliary losses match hand-computed values on tiny arrays and run under jit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_inversion.objectives.losses import (
    anchor_prompt_loss,
    anchor_sparse_codes,
    anchor_sparse_loss,
    attention_match_loss,
    info_nce_context,
    layout_guidance_loss,
    location_loss,
    masked_diffusion_mse,
    nonnegative_omp,
    resize_mask,
    word_embedding,
    word_table,
)

T = 0.07


def _orthonormal_rows(count, dim, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q[:count].astype(np.float32)


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- InfoNCE -----------------------------------------------------------------------------


def test_info_nce_single_positive_single_negative():
    loss = info_nce_context(
        jnp.array([[1.0, 0.0]]), jnp.array([[[1.0, 0.0]]]), jnp.array([[True]]),
        jnp.array([[[0.0, 1.0]]]), jnp.array([[True]]), temperature=T,
    )
    expected = math.log(math.exp(1 / T) + math.exp(0.0)) - 1 / T
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)


def test_info_nce_ignores_padding_and_rows_without_positives():
    v = jnp.array([[1.0, 0.0], [0.3, -2.0]])
    positives = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[5.0, 5.0], [1.0, 1.0]]])
    positive_mask = jnp.array([[True, False], [False, False]])
    negatives = jnp.array([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    negative_mask = jnp.array([[True, False], [True, True]])
    loss = info_nce_context(v, positives, positive_mask, negatives, negative_mask, T)
    expected = math.log(math.exp(1 / T) + 1.0) - 1 / T
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(info_nce_context)(v, positives, positive_mask, negatives, negative_mask, T)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)


def test_info_nce_multiple_positives_hand_value():
    v = np.array([1.0, 1.0])
    positives = np.array([[1.0, 0.0], [0.0, 1.0]])
    negatives = np.array([[-1.0, 0.0], [2.0, 2.0], [0.0, -3.0]])
    negative_mask = np.array([True, True, False])
    pos_terms = [math.exp(_cos(v, w) / T) for w in positives]
    neg_terms = [math.exp(_cos(v, w) / T) for w, valid in zip(negatives, negative_mask) if valid]
    expected = math.log(sum(pos_terms) + sum(neg_terms)) - math.log(sum(pos_terms))
    loss = info_nce_context(
        jnp.array([v]), jnp.array([positives]), jnp.array([[True, True]]),
        jnp.array([negatives]), jnp.array([negative_mask]), T,
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_info_nce_no_positives_is_zero():
    loss = info_nce_context(
        jnp.ones((2, 2)), jnp.ones((2, 1, 2)), jnp.zeros((2, 1), bool), jnp.ones((2, 1, 2)), jnp.ones((2, 1), bool)
    )
    assert float(loss) == 0.0


def test_info_nce_gradient_flows_into_v_only_and_raises_positive_cosine():
    v = jnp.array([[1.0, 0.3]])
    positives = jnp.array([[[0.2, 1.0]]])
    negatives = jnp.array([[[1.0, 0.0], [0.6, -0.8]]])
    masks = (jnp.array([[True]]), jnp.array([[True, True]]))
    args = (positives, masks[0], negatives, masks[1])
    grads = jax.grad(info_nce_context, argnums=(0, 1, 3))(v, *args)
    np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)
    stepped = v - 0.01 * grads[0]
    assert _cos(stepped[0], positives[0, 0]) > _cos(v[0], positives[0, 0])
    assert float(info_nce_context(stepped, *args)) < float(info_nce_context(v, *args))


# --- word embeddings ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from jax_inversion.models.tokenizer_files import write_clip_tokenizer

    directory = str(tmp_path_factory.mktemp("clip_tokenizer"))
    write_clip_tokenizer(directory, ["cat", "dog"])
    return CLIPTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def table(tokenizer):
    return np.random.default_rng(0).normal(size=(len(tokenizer), 6)).astype(np.float32)


def test_word_embedding_single_and_multi_token(tokenizer, table):
    cat_ids = tokenizer.encode("cat", add_special_tokens=False)
    zq_ids = tokenizer.encode("zq", add_special_tokens=False)
    assert len(cat_ids) == 1 and len(zq_ids) == 2
    np.testing.assert_array_equal(word_embedding(tokenizer, table, "cat"), table[cat_ids[0]])
    expected = (table[zq_ids[0]] + table[zq_ids[1]]) / 2
    np.testing.assert_allclose(word_embedding(tokenizer, table, "zq"), expected, rtol=1e-6)


def test_word_embedding_rejects_empty_word(tokenizer, table):
    with pytest.raises(ValueError, match="has no tokens"):
        word_embedding(tokenizer, table, "")


def test_word_table_pads_to_longest_list(tokenizer, table):
    rows, mask = word_table(tokenizer, table, [["cat"], ["dog", "zq"], []])
    assert rows.shape == (3, 2, 6) and rows.dtype == np.float32
    np.testing.assert_array_equal(mask, [[True, False], [True, True], [False, False]])
    np.testing.assert_array_equal(rows[0, 0], word_embedding(tokenizer, table, "cat"))
    np.testing.assert_array_equal(rows[1, 1], word_embedding(tokenizer, table, "zq"))
    np.testing.assert_array_equal(rows[0, 1], 0.0)
    np.testing.assert_array_equal(rows[2], 0.0)
    empty_rows, empty_mask = word_table(tokenizer, table, [[], []])
    assert empty_rows.shape == (2, 1, 6) and not empty_mask.any()


# --- non-negative OMP --------------------------------------------------------------------


def _random_dictionary(seed):
    return np.random.default_rng(seed).normal(size=(80, 32)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_omp_is_sparse_nonnegative_least_squares_on_its_atoms(seed):
    dictionary = _random_dictionary(seed)
    target = np.random.default_rng(100 + seed).normal(size=32).astype(np.float32)
    codes = np.asarray(nonnegative_omp(target, dictionary, 5))
    assert codes.shape == (80,)
    assert np.all(codes >= 0.0)
    support = np.flatnonzero(codes)
    assert 1 <= support.size <= 5
    least_squares, *_ = np.linalg.lstsq(dictionary[support].T, target, rcond=None)
    np.testing.assert_allclose(codes[support], least_squares, rtol=1e-3, atol=1e-4)
    assert np.linalg.norm(target - codes @ dictionary) < np.linalg.norm(target)


def test_omp_recovers_nonnegative_combination_of_orthonormal_atoms():
    basis = _orthonormal_rows(32, 32)
    dictionary = np.concatenate([basis, -basis, -basis[:16]])
    target = 3.0 * basis[2] + 1.5 * basis[7] + 0.5 * basis[11]
    codes = np.asarray(nonnegative_omp(target, dictionary, 5))
    expected = np.zeros(80, np.float32)
    expected[[2, 7, 11]] = [3.0, 1.5, 0.5]
    np.testing.assert_allclose(codes, expected, atol=1e-5)
    assert np.count_nonzero(codes) == 3


def test_omp_recovers_combination_of_correlated_atoms():
    dictionary = _random_dictionary(4)
    target = 1.0 * dictionary[0] + 2.0 * dictionary[1] + 0.5 * dictionary[2]
    expected = np.zeros(80, np.float32)
    expected[:3] = [1.0, 2.0, 0.5]
    np.testing.assert_allclose(np.asarray(nonnegative_omp(target, dictionary, 5)), expected, atol=1e-4)


def test_omp_negative_correlations_select_nothing():
    dictionary = np.abs(_random_dictionary(5))
    target = -np.abs(np.random.default_rng(6).normal(size=32)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(nonnegative_omp(target, dictionary, 5)), 0.0)


# --- anchor losses -----------------------------------------------------------------------


def test_anchor_sparse_loss_hand_value_codes_and_descent():
    anchors = np.eye(8, 16, dtype=np.float32)
    v = np.zeros((2, 16), np.float32)
    v[0, :2] = [2.0, 1.0]
    v[1, 3] = 0.5
    expected_codes = np.zeros((2, 8), np.float32)
    expected_codes[0, :2] = [2.0, 1.0]
    expected_codes[1, 3] = 0.5
    np.testing.assert_allclose(np.asarray(anchor_sparse_codes(v, anchors, 5)), expected_codes, atol=1e-5)
    first_row = 2.0 * ((2 - 1) ** 2 + 1**2) + 1.0 * (2**2 + (1 - 1) ** 2)
    second_row = 0.5 * (0.5 - 1) ** 2
    elements = 77 * 16  # the rows' squared distances, summed, per prompt input element
    loss, grad = jax.value_and_grad(anchor_sparse_loss)(jnp.asarray(v), anchors, 5, elements)
    np.testing.assert_allclose(float(loss), (first_row + second_row) / elements, rtol=1e-5)

    def nearest_anchor_distance(x):
        return np.linalg.norm(np.asarray(x)[:, None] - anchors[None], axis=-1).min(axis=1)

    stepped = v - 0.5 * np.asarray(grad)
    assert np.all(nearest_anchor_distance(stepped) < nearest_anchor_distance(v))


def test_anchor_variants_agree_in_scale_for_the_same_row():
    """v = 0.7 a + 0.3 b: the paper's loss is (0.7 * 0.3^2 + 0.3 * 0.7^2) |a - b|^2 / (L d) = 0.21 |a - b|^2 / (L d),
    the code's (anchor word a, in a prompt of L tokens) 0.3^2 |a - b|^2 / (L d): a factor 7/3 apart, where the
    old 1/|anchors| normalisation made the paper's L d / |anchors| (740 for SD1.5) times stronger."""
    rng = np.random.default_rng(3)
    length, d = 77, 16
    anchors = rng.normal(size=(6, d)).astype(np.float32)
    a, b = anchors[0], anchors[1]
    v = 0.7 * a + 0.3 * b
    distance = float(np.sum((a - b) ** 2))
    paper = float(anchor_sparse_loss(v[None], anchors, 5, length * d))
    np.testing.assert_allclose(paper, 0.21 * distance / (length * d), rtol=1e-4)
    prompt = np.tile(rng.normal(size=(1, length, d)).astype(np.float32), (2, 1, 1))
    anchored = prompt.copy()
    prompt[:, 5], anchored[:, 5] = v, a  # the placeholder at position 5; the anchor word in its place
    code = float(anchor_prompt_loss(prompt, anchored))
    np.testing.assert_allclose(code, 0.09 * distance / (length * d), rtol=1e-4)
    assert 1.0 <= paper / code <= 3.0  # the stated factor: within 3x for rows between two anchors
    np.testing.assert_allclose(paper / code, 7 / 3, rtol=1e-3)


def test_anchor_prompt_loss_hand_value_and_constant_anchor():
    prompt = jnp.array([[[1.0, 2.0], [0.0, -1.0]]])
    anchor = jnp.array([[[0.0, 2.0], [2.0, 1.0]]])
    expected = (1.0 + 0.0 + 4.0 + 4.0) / 4
    np.testing.assert_allclose(float(anchor_prompt_loss(prompt, anchor)), expected)
    grad_anchor = jax.grad(anchor_prompt_loss, argnums=1)(prompt, anchor)
    np.testing.assert_array_equal(np.asarray(grad_anchor), 0.0)


# --- masks and attention -----------------------------------------------------------------


def test_resize_mask_block_average_row_major():
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, 0, :2] = 1.0
    mask[0, 2:, 0] = 1.0
    expected = [[2 / 4, 0.0, 2 / 4, 0.0]]
    np.testing.assert_allclose(np.asarray(resize_mask(mask, 2)), expected)


def test_resize_mask_non_divisible_keeps_range_and_constants():
    ones = resize_mask(np.ones((2, 7, 5), np.float32), 3)
    assert ones.shape == (2, 9)
    np.testing.assert_allclose(np.asarray(ones), 1.0, atol=1e-6)
    mixed = np.asarray(resize_mask(np.random.default_rng(0).uniform(size=(1, 10, 10)), 4))
    assert mixed.shape == (1, 16) and mixed.min() >= 0.0 and mixed.max() <= 1.0


def _left_half_mask(side=8):
    mask = np.zeros((1, side, side), np.float32)
    mask[0, :, : side // 2] = 1.0
    return mask


def _location_maps():
    """B=1, 2 heads, 4x4 grid, 3 tokens: token 0 inside, token 1 outside, token 2 3:1 in:out."""
    probs = np.zeros((1, 2, 16, 3), np.float32)
    inside_cell, outside_cell = 0 * 4 + 1, 2 * 4 + 3
    probs[0, :, inside_cell, 0] = 0.7
    probs[0, :, outside_cell, 1] = 0.4
    probs[0, 0, inside_cell, 2] = 0.3
    probs[0, 1, outside_cell, 2] = 0.1
    return probs


def test_location_loss_inside_outside_and_split_tokens():
    maps = {"up": _location_maps()}
    masks = _left_half_mask()

    def loss(selected):
        return float(location_loss(maps, np.array([selected]), masks))

    np.testing.assert_allclose(loss([True, False, False]), 0.0, atol=1e-6)
    np.testing.assert_allclose(loss([False, True, False]), 1.0, atol=1e-6)
    head_mean_inside, head_mean_outside = 0.3 / 2, 0.1 / 2
    split = 1.0 - head_mean_inside / (head_mean_inside + head_mean_outside)
    np.testing.assert_allclose(loss([False, False, True]), split, atol=1e-6)
    np.testing.assert_allclose(loss([True, True, True]), (0.0 + 1.0 + split) / 3, atol=1e-6)
    assert loss([False, False, False]) == 0.0


def test_location_loss_half_and_half_is_one_half():
    probs = np.zeros((1, 1, 4, 1), np.float32)
    probs[0, 0, [0, 1], 0] = 0.25
    maps = {"mid": probs}
    np.testing.assert_allclose(float(location_loss(maps, np.array([[True]]), _left_half_mask())), 0.5, atol=1e-6)


def test_location_loss_averages_layers_of_different_sides():
    mask = np.zeros((1, 8, 8), np.float32)
    mask[0, :2, :2] = 1.0
    fine = np.zeros((1, 1, 16, 1), np.float32)
    fine[0, 0, 0, 0] = 1.0
    coarse = np.zeros((1, 3, 4, 1), np.float32)
    coarse[0, :, 0, 0] = 1.0
    coarse_inside_share = (2 * 2) / (4 * 4)
    expected = (0.0 + (1.0 - coarse_inside_share)) / 2
    loss = location_loss({"fine": fine, "coarse": coarse}, np.array([[True]]), mask)
    np.testing.assert_allclose(float(loss), expected, atol=1e-6)


def test_location_loss_rejects_non_square_maps():
    with pytest.raises(ValueError, match="square"):
        location_loss({"bad": np.ones((1, 1, 6, 1))}, np.array([[True]]), np.ones((1, 4, 4)))


def test_layout_guidance_loss_is_squared_per_head_hand_value():
    """One token on a 2x2 grid, box = the left column. Head 0 puts 3/4 of its mass inside, head 1 1/4:
    the code's loss is ((1 - 3/4)^2 + (1 - 1/4)^2) / 2 = 0.3125; the location loss (heads averaged,
    unsquared) 1 - 1/2 = 0.5. With 0.9 and 0.7 inside: 0.05, below the 0.2 threshold, where the
    location loss, 0.2, is not."""
    mask = np.array([[[1.0, 0.0], [1.0, 0.0]]], np.float32)  # positions 0 and 2 (row-major) inside

    def maps(inside_0, inside_1):
        head = lambda r: [r / 2, (1 - r) / 2, r / 2, (1 - r) / 2]
        return {"l": np.array([[head(inside_0), head(inside_1)]], np.float32)[..., None]}  # [1, 2, 4, 1]

    token = np.array([[True]])
    np.testing.assert_allclose(float(layout_guidance_loss(maps(0.75, 0.25), token, mask)), 0.3125, rtol=1e-5)
    np.testing.assert_allclose(float(location_loss(maps(0.75, 0.25), token, mask)), 0.5, rtol=1e-5)
    near = maps(0.9, 0.7)
    np.testing.assert_allclose(float(layout_guidance_loss(near, token, mask)), 0.05, rtol=1e-4)
    assert float(layout_guidance_loss(near, token, mask)) < 0.2 <= float(location_loss(near, token, mask)) + 1e-6


def test_guided_latents_stop_below_threshold_hand_steps():
    """loss(x) = x^2 (grad 2x), step 0.25: x goes 1 -> 0.5 -> 0.25 -> 0.125; the 4th iteration's loss, 0.015625,
    is at most 0.02: as in the code's while loop, its step (-> 0.0625) is still taken and the 5th is not."""
    from jax_inversion.sampling.generate import guided_latents

    loss_and_grad = lambda x: (jnp.sum(x**2), 2 * x)
    out, done, iterations = guided_latents(jnp.ones(1), loss_and_grad, 5, 0.02, 0.25)
    np.testing.assert_allclose(np.asarray(out), [0.0625])
    assert bool(done) and int(iterations) == 4
    out, done, iterations = guided_latents(jnp.ones(1), loss_and_grad, 5, 0.0, 0.25)
    np.testing.assert_allclose(np.asarray(out), [1 / 32])
    assert not bool(done) and int(iterations) == 5
    out, done, iterations = guided_latents(jnp.ones(1), loss_and_grad, 5, 0.02, 0.25, done=True)  # done before
    np.testing.assert_allclose(np.asarray(out), [1.0])
    assert int(iterations) == 0


def test_attention_match_loss_sum_reduction_hand_value():
    """"sum": per example the squared differences over pixels and selected tokens, summed; examples averaged."""
    rng = np.random.default_rng(8)
    maps = {"x": rng.uniform(size=(2, 2, 4, 3)).astype(np.float32)}
    refs = {"x": rng.uniform(size=(2, 2, 4, 3)).astype(np.float32)}
    token_mask = np.array([[False, True, False], [True, False, True]])
    squared = (maps["x"].mean(axis=1) - refs["x"].mean(axis=1)) ** 2  # [B, HW, L]
    expected = (squared[0, :, 1].sum() + squared[1, :, 0].sum() + squared[1, :, 2].sum()) / 2
    np.testing.assert_allclose(float(attention_match_loss(maps, refs, token_mask, "sum")), expected, rtol=1e-5)
    mean = float(attention_match_loss(maps, refs, token_mask))
    np.testing.assert_allclose(mean, (squared[0, :, 1].mean() + squared[1, :, 0].mean() + squared[1, :, 2].mean()) / 3, rtol=1e-5)


def test_attention_match_loss_identical_maps_is_zero():
    probs = np.random.default_rng(1).uniform(size=(2, 3, 16, 5)).astype(np.float32)
    assert float(attention_match_loss({"a": probs}, {"a": probs}, np.ones((2, 5), bool))) == 0.0


def test_attention_match_loss_hand_value():
    rng = np.random.default_rng(6)
    maps = {"x": rng.uniform(size=(2, 2, 4, 3)).astype(np.float32), "y": rng.uniform(size=(2, 3, 1, 3)).astype(np.float32)}
    refs = {name: rng.uniform(size=probs.shape).astype(np.float32) for name, probs in maps.items()}
    token_mask = np.array([[False, True, False], [True, False, True]])
    layer_values = []
    for name in maps:
        _, heads, positions, _ = maps[name].shape
        selected = []
        for b, l in zip(*np.nonzero(token_mask)):
            total = 0.0
            for p in range(positions):
                mine = sum(maps[name][b, h, p, l] for h in range(heads)) / heads
                theirs = sum(refs[name][b, h, p, l] for h in range(heads)) / heads
                total += (mine - theirs) ** 2
            selected.append(total / positions)
        layer_values.append(sum(selected) / len(selected))
    expected = sum(layer_values) / len(layer_values)
    loss = attention_match_loss(maps, refs, token_mask)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    grad_refs = jax.grad(attention_match_loss, argnums=1)(maps, refs, token_mask)
    np.testing.assert_array_equal(np.asarray(grad_refs["x"]), 0.0)


def test_masked_diffusion_mse_hand_value():
    rng = np.random.default_rng(7)
    prediction = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
    target = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
    masks = np.zeros((2, 4, 4), np.float32)
    masks[0, :2, :2] = 1.0
    masks[0, 2:, 2:] = 0.5
    masks[1, 0, 0] = 1.0
    weights = np.array([1.0, 0.5], np.float32)
    cell_masks = [np.array([[1.0, 0.0], [0.0, 0.5]]), np.array([[0.25, 0.0], [0.0, 0.0]])]
    expected = 0.0
    for b in range(2):
        numerator = 0.0
        for i in range(2):
            for j in range(2):
                error = sum((prediction[b, i, j, c] - target[b, i, j, c]) ** 2 for c in range(3)) / 3
                numerator += cell_masks[b][i, j] * error
        expected += weights[b] * numerator / cell_masks[b].sum()
    expected /= 2
    loss = masked_diffusion_mse(prediction, target, masks, weights)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_masked_diffusion_mse_full_mask_is_plain_mse():
    rng = np.random.default_rng(8)
    prediction = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)
    target = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)
    weights = np.array([1.0, 2.0, 0.5], np.float32)
    per_example = ((prediction - target) ** 2).reshape(3, -1).mean(axis=1)
    loss = masked_diffusion_mse(prediction, target, np.ones((3, 8, 8), np.float32), weights)
    np.testing.assert_allclose(float(loss), float(np.mean(per_example * weights)), rtol=1e-5)


def test_masked_diffusion_mse_empty_mask_is_zero():
    loss = masked_diffusion_mse(np.ones((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)), np.zeros((1, 4, 4)), np.ones(1))
    assert float(loss) == 0.0


# --- jit ---------------------------------------------------------------------------------


def test_losses_compose_inside_an_outer_jit_with_gradients():
    rng = np.random.default_rng(9)
    v = rng.normal(size=(3, 8)).astype(np.float32)
    anchors = rng.normal(size=(12, 8)).astype(np.float32)
    maps = {"a": _location_maps(), "b": rng.uniform(size=(1, 2, 4, 3)).astype(np.float32)}
    refs = {name: rng.uniform(size=probs.shape).astype(np.float32) for name, probs in maps.items()}
    token_mask = np.array([[True, False, True]])
    masks = _left_half_mask()
    latents = rng.normal(size=(1, 2, 4, 3)).astype(np.float32)
    noise = rng.normal(size=(1, 2, 4, 3)).astype(np.float32)
    context = (v[:, None] + 0.1, np.ones((3, 1), bool), -v[:, None], np.ones((3, 1), bool))

    def total(v, maps, latents):
        return (
            info_nce_context(v, *context)
            + anchor_sparse_loss(v, anchors, 4, 10.0)
            + anchor_prompt_loss(v[None], v[None] * 0.5)
            + location_loss(maps, token_mask, masks)
            + attention_match_loss(maps, refs, token_mask)
            + masked_diffusion_mse(latents, noise, masks, np.ones(1))
        )

    value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(v, maps, latents)
    expected = (
        float(info_nce_context(v, *context))
        + float(anchor_sparse_loss(v, anchors, 4, 10.0))
        + float(anchor_prompt_loss(v[None], v[None] * 0.5))
        + float(location_loss(maps, token_mask, masks))
        + float(attention_match_loss(maps, refs, token_mask))
        + float(masked_diffusion_mse(latents, noise, masks, np.ones(1)))
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    # The gradients against central finite differences along a random direction per argument. The anchor
    # terms hold their targets fixed (stop_gradient: the sparse code, the anchor prompt), so the differences do too,
    # with the sparse term written out by hand: sum_ij code_ij |v_i - e_j|^2 / elements.
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)
        args = f64((v, maps, latents))
        codes = np.asarray(anchor_sparse_codes(args[0], jnp.asarray(anchors, jnp.float64), 4))
        held = np.asarray(args[0]) * 0.5

        def by_hand(v, maps, latents):
            sparse = jnp.sum(codes * jnp.sum((v[:, None] - anchors[None]) ** 2, axis=-1)) / 10.0
            return (info_nce_context(v, *context) + sparse + jnp.mean((v - held) ** 2) + location_loss(maps, token_mask, masks)
                    + attention_match_loss(maps, refs, token_mask) + masked_diffusion_mse(latents, noise, masks, np.ones(1)))

        exact = jax.grad(total, argnums=(0, 1, 2))(*args)
        for i in range(3):
            direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), args[i])
            shifted = lambda h: by_hand(*[jax.tree_util.tree_map(lambda x, d: x + h * d, a, direction) if j == i else a
                                          for j, a in enumerate(args)])
            eps = 1e-3  # the losses compute in float32 inside (_f32): a step well above its rounding
            numeric = (float(shifted(eps)) - float(shifted(-eps))) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(exact[i]), jax.tree_util.tree_leaves(direction)))
            np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=1e-6, err_msg=f"argument {i}")
    # and the float32 jitted ones agree with them
    for g32, g64 in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(exact)):
        np.testing.assert_allclose(np.asarray(g32), np.asarray(g64), rtol=1e-3, atol=1e-5)

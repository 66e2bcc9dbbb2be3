"""The torch side of the recipes (frrn_dist/data/recipes.py), against independent numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from frrn_dist.data.recipes import (
    NUM_PARAMS,
    PARAM_DX,
    PARAM_DY,
    PARAM_FLIP,
    PARAM_Z,
    RecipeError,
    draw_crops,
    draw_params,
    finish_batch,
    gamma_exponent,
    majority_vote,
    make_recipe,
    translate,
)


def reference_vote(label: np.ndarray, f: int) -> np.ndarray:
    """CHIANTI's rule by brute force: per f x f cell, count every member's value among the cell's f*f members;
    the cell takes the most frequent value if it fills more than half of it, else 255."""
    h, w = label.shape[0] // f, label.shape[1] // f
    cells = label.reshape(h, f, w, f).transpose(0, 2, 1, 3).reshape(h, w, f * f)
    counts = (cells[..., :, None] == cells[..., None, :]).sum(-1)  # (h, w, f*f): frequency of each member
    best = np.take_along_axis(cells, counts.argmax(-1)[..., None], -1)[..., 0]
    return np.where(2 * counts.max(-1) > f * f, best, 255).astype(np.uint8)


def test_reference_vote_by_hand():
    label = np.array([[1, 1, 2, 2], [1, 3, 2, 3], [5, 5, 7, 7], [255, 255, 8, 9]], np.uint8)
    np.testing.assert_array_equal(reference_vote(label, 2), [[1, 2], [255, 255]])
    np.testing.assert_array_equal(reference_vote(np.array([[4, 4], [4, 255]], np.uint8), 2), [[4]])


@pytest.mark.parametrize("f", [2, 3, 4])
@pytest.mark.parametrize("num_values", [2, 3, 20])
def test_majority_vote_matches_brute_force(f, num_values):
    rng = np.random.default_rng(f * 100 + num_values)
    # Few values make majorities and exact ties (f=2, 4) frequent; 255 takes part in the count like any class.
    values = np.array([0, 7, 255, 18, 3, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], np.uint8)[:num_values]
    labels = values[rng.integers(0, num_values, (3, 8 * f, 12 * f))]
    got = majority_vote(torch.from_numpy(labels), f).numpy()
    want = np.stack([reference_vote(x, f) for x in labels])
    assert got.dtype == np.uint8 and got.shape == (3, 8, 12)
    np.testing.assert_array_equal(got, want)
    # The cases the rule is about actually occur: void kept by majority, no-majority cells voided, classes kept.
    if num_values == 3:
        assert (want == 255).any() and (want == 0).any() and (want == 7).any()


def test_majority_vote_threshold_is_strictly_more_than_half():
    # f=2: 2 of 4 is not a majority (255); 3 of 4 is. f=3: 5 of 9 is.
    a = torch.tensor([[[1, 1], [2, 2]]], dtype=torch.uint8)
    b = torch.tensor([[[1, 1], [1, 2]]], dtype=torch.uint8)
    assert majority_vote(a, 2).item() == 255
    assert majority_vote(b, 2).item() == 1
    c = torch.tensor([[4, 4, 4], [4, 4, 9], [9, 9, 9]], dtype=torch.uint8)[None]
    assert majority_vote(c, 3).item() == 4
    # Void as the majority stays void.
    d = torch.tensor([[[255, 255], [255, 3]]], dtype=torch.uint8)
    assert majority_vote(d, 2).item() == 255


def test_gamma_exponent_is_eq_14():
    assert float(gamma_exponent(0.0)) == 1.0
    # frrn-spec §2.3: |z| <= 0.05 gives g in [0.815, 1.227]
    assert math.isclose(float(gamma_exponent(-0.05)), 1.2270, abs_tol=5e-4)
    assert math.isclose(float(gamma_exponent(0.05)), 0.8150, abs_tol=5e-4)
    z = torch.tensor([-0.03, 0.02], dtype=torch.float64)
    want = [math.log(0.5 + v / math.sqrt(2)) / math.log(0.5 - v / math.sqrt(2)) for v in z.tolist()]
    assert torch.allclose(gamma_exponent(z), torch.tensor(want, dtype=torch.float64))


def test_translate_reflects_image_and_voids_label():
    x = torch.arange(5 * 6, dtype=torch.float32).reshape(1, 1, 5, 6)
    y = torch.arange(5 * 6, dtype=torch.int64).reshape(1, 5, 6)
    xi, yi = translate(x, y, [(2, -1)])  # down 2, left 1
    # out[r, c] = in[r - 2, c + 1] where that exists
    assert torch.equal(yi[0, 2:, :5], y[0, :3, 1:])
    assert (yi[0, :2] == 255).all() and (yi[0, :, 5] == 255).all()
    assert torch.equal(xi[0, 0, 2:, :5], x[0, 0, :3, 1:])
    # Reflection without repeating the edge: rows above the shifted-in content mirror it about row 2.
    assert torch.equal(xi[0, 0, 0], xi[0, 0, 4]) and torch.equal(xi[0, 0, 1], xi[0, 0, 3])
    # And the column coming in on the right mirrors about column 4.
    assert torch.equal(xi[0, 0, :, 5], xi[0, 0, :, 3])
    # Zero offset is the identity.
    x0, y0 = translate(x, y, [(0, 0)])
    assert torch.equal(x0, x) and torch.equal(y0, y)


def test_finish_batch_eval_is_scale_and_vote():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (2, 8, 12), dtype=np.uint8)
    x, y = finish_batch(torch.from_numpy(images), torch.from_numpy(labels), None, factor=2)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 6) and y.dtype == torch.int64 and y.shape == (2, 4, 6)
    np.testing.assert_allclose(x.numpy(), images.transpose(0, 3, 1, 2) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), np.stack([reference_vote(v, 2) for v in labels]))


def test_finish_batch_applies_each_row_to_its_sample():
    rng = np.random.default_rng(2)
    images = rng.integers(1, 255, (3, 6, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.repeat(rng.integers(0, 19, (3, 6, 8), dtype=np.uint8), 2, 1), 2, 2)  # vote is exact
    params = np.zeros((3, NUM_PARAMS), np.float32)
    params[1, PARAM_FLIP] = 1
    params[2, [PARAM_DY, PARAM_DX, PARAM_Z]] = [1, -2, 0.04]
    x, y = finish_batch(torch.from_numpy(images), torch.from_numpy(labels), params, factor=2)
    base = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    small = torch.from_numpy(labels[:, ::2, ::2]).long()
    assert torch.equal(x[0], base[0]) and torch.equal(y[0], small[0])
    assert torch.equal(x[1], base[1].flip(-1)) and torch.equal(y[1], small[1].flip(-1))
    g = float(gamma_exponent(0.04))
    assert torch.allclose(x[2, :, 1:, :6], base[2, :, :5, 2:] ** g, atol=1e-6)
    assert torch.equal(y[2, 1:, :6], small[2, :5, 2:]) and (y[2, 0] == 255).all() and (y[2, :, 6:] == 255).all()


def test_make_recipe_sizes_and_defaults():
    r = make_recipe("paper", source_hw=(1024, 2048), input_hw=(256, 512))
    assert (r.factor, r.region_hw, r.translate_px, r.gamma_z, r.flip) == (4, (1024, 2048), 30, 0.05, False)
    r = make_recipe("seed", source_hw=(1024, 2048), input_hw=(256, 512))
    assert (r.factor, r.region_hw, r.translate_px, r.flip) == (2, (512, 1024), 0, True)
    r = make_recipe("eval", source_hw=(1024, 2048), input_hw=(512, 1024), translate_px=40, flip=True)
    assert (r.factor, r.translate_px, r.gamma_z, r.flip, r.random) == (2, 0, 0.0, False, False)
    assert make_recipe("paper", source_hw=(1024, 2048), input_hw=(256, 512), flip=True).flip


@pytest.mark.parametrize(
    "name, input_hw, words",
    [
        ("paper", (300, 600), ["1024x2048", "300x600"]),  # not an integer factor
        ("eval", (256, 1024), ["1024x2048", "256x1024"]),  # two different factors
        ("seed", (768, 1024), ["1536x2048", "1024x2048"]),  # the 2x crop does not fit
    ],
)
def test_make_recipe_rejects_sizes_naming_both(name, input_hw, words):
    with pytest.raises(RecipeError) as e:
        make_recipe(name, source_hw=(1024, 2048), input_hw=input_hw)
    assert all(w in str(e.value) for w in words)


def test_make_recipe_rejects_bad_values():
    for kwargs in [dict(translate_px=256), dict(translate_px=-1), dict(gamma_z=0.8)]:
        with pytest.raises(RecipeError):
            make_recipe("paper", source_hw=(1024, 2048), input_hw=(256, 512), **kwargs)
    with pytest.raises(RecipeError, match="recipe='crop'"):
        make_recipe("crop", source_hw=(1024, 2048), input_hw=(256, 512))


def test_draws_follow_the_recipe():
    rng = np.random.default_rng(0)
    r = make_recipe("paper", source_hw=(128, 256), input_hw=(32, 64), translate_px=3, gamma_z=0.05)
    p = draw_params(rng, 4000, r)
    assert set(np.unique(p[:, PARAM_DY])) == set(range(-3, 4)) == set(np.unique(p[:, PARAM_DX]))
    assert (p[:, PARAM_FLIP] == 0).all() and np.abs(p[:, PARAM_Z]).max() < 0.05 and p[:, PARAM_Z].std() > 0.02
    s = make_recipe("seed", source_hw=(128, 256), input_hw=(32, 64))
    p, c = draw_params(rng, 4000, s), draw_crops(rng, 4000, s)
    assert (p[:, [PARAM_DY, PARAM_DX]] == 0).all() and 0.45 < p[:, PARAM_FLIP].mean() < 0.55
    # every corner on the f=2 grid, each reached: the packed label.x2.png holds the crop's vote
    assert set(np.unique(c[:, 0])) == set(range(0, 128 - 64 + 1, 2)) and set(np.unique(c[:, 1])) == set(
        range(0, 256 - 128 + 1, 2)
    )

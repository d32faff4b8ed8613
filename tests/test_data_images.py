"""The pure image functions: colour constancy."""

from __future__ import annotations

import numpy as np
import pytest

from dermaclass.data.images import apply_colour, shades_of_gray


def test_shades_of_gray_neutralises_a_colour_cast() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(40, 200, (24, 32, 1)).repeat(3, axis=2).astype(np.uint8)
    tinted = np.clip(grey * np.array([1.25, 1.0, 0.7]), 0, 255).astype(np.uint8)  # a warm lamp
    out = shades_of_gray(tinted).astype(np.float64)
    means = out.reshape(-1, 3).mean(axis=0)
    assert means.max() / means.min() < 1.05  # the cast is gone: channels balanced again
    assert tinted.reshape(-1, 3).mean(axis=0).max() / tinted.reshape(-1, 3).mean(axis=0).min() > 1.5


def test_shades_of_gray_leaves_a_neutral_image_and_handles_black() -> None:
    grey = np.full((8, 8, 3), 120, np.uint8)
    assert np.array_equal(shades_of_gray(grey), grey)
    black = np.zeros((8, 8, 3), np.uint8)
    assert np.array_equal(shades_of_gray(black), black)
    red_only = np.zeros((8, 8, 3), np.uint8)
    red_only[..., 0] = 200
    assert shades_of_gray(red_only).dtype == np.uint8  # no division by zero


def test_shades_of_gray_is_the_minkowski_estimate_and_ignores_pixel_order() -> None:
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal([150, 110, 90], 40, (30, 40, 3)), 0, 255).astype(np.uint8)
    x = img.astype(np.float64)
    illuminant = np.mean(x**6, axis=(0, 1)) ** (1 / 6)  # the textbook per-pixel formula, in float64
    gains = np.linalg.norm(illuminant) / (illuminant * np.sqrt(3))
    reference = np.floor(np.clip(x * gains + 0.5, 0, 255))
    out = shades_of_gray(img)
    # Equal but where the two float64 sums round differently at a level boundary (one level).
    assert np.abs(out - reference).max() <= 1 and np.mean(out != reference) < 1e-3
    for flip in (np.fliplr, np.flipud):
        assert np.array_equal(shades_of_gray(np.ascontiguousarray(flip(img))), flip(out))
    assert np.array_equal(shades_of_gray(img[:, ::-1]), out[:, ::-1])  # a non-contiguous view too


def test_apply_colour_choices() -> None:
    img = np.full((4, 4, 3), 50, np.uint8)
    assert apply_colour(img, "none") is img and apply_colour(img, None) is img
    with pytest.raises(ValueError, match="unknown colour constancy"):
        apply_colour(img, "retinex")

"""Training augmentations: shapes and types kept, and ``zoom`` framing the lesion closer."""

from __future__ import annotations

import numpy as np
import pytest

from dermaclass.data.augment import train_pipeline

SIZE = (64, 48)  # width, height


def _disc() -> np.ndarray:
    """A red centred 'lesion' covering about a seventh of a grey frame (the border fill is black)."""
    h, w = SIZE[1], SIZE[0]
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 160, np.uint8)
    img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2] = (220, 30, 30)
    return img


@pytest.mark.parametrize("kind", ["basic", "zoom", "augmix"])
def test_pipelines_keep_shape_and_dtype(kind: str) -> None:
    aug = train_pipeline(kind, SIZE)
    out = aug(image=_disc())["image"]
    assert out.shape == (SIZE[1], SIZE[0], 3) and out.dtype == np.uint8


def test_zoom_frames_the_lesion_closer_than_basic() -> None:
    img = _disc()

    def lesion_share(kind: str) -> float:
        aug = train_pipeline(kind, SIZE)
        aug.set_random_seed(0)  # albumentations 2 draws from its own generator, not numpy's global one
        return float(np.mean([red(aug(image=img)["image"]).mean() for _ in range(300)]))

    def red(x: np.ndarray) -> np.ndarray:
        return x[..., 0].astype(int) - x[..., 1] > 80

    base = red(img).mean()
    basic, zoom = lesion_share("basic"), lesion_share("zoom")
    assert basic == pytest.approx(base, rel=0.35)
    assert zoom > basic * 1.15  # the lesion fills more of the frame on average


def test_none_and_unknown() -> None:
    assert train_pipeline("none", SIZE) is None
    with pytest.raises(ValueError, match="choose none, basic, zoom or augmix"):
        train_pipeline("strong", SIZE)

"""Training augmentations, applied by albumentations to uint8 arrays from the decode cache.

Dermoscopy has no canonical orientation (a lesion photographed upside down is the same
lesion), so flips and full rotations are safe; scale and small colour changes mimic
different dermatoscopes, distances and lighting (``zoom``: a wider scale range, for other
framings of the lesion). AugMix (seed 002's default augmentation,
Hendrycks et al. 2020) is an option, built from the same albumentations operations: k
randomly composed chains, mixed with Dirichlet weights, then blended with the original.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np


def basic_pipeline(size: tuple[int, int], *, zoom: bool = False) -> A.Compose:
    """Flips, free rotation, scale and colour jitter, cropped back to (width, height).

    ``zoom``: a wider scale range (crops down to 35 % of the area, i.e. up to 1.7x closer, and
    affine scale 0.75-1.33), for dermatoscopes and crops that frame the lesion tighter or
    looser than HAM10000's 4:3 frames (derm7pt's atlas crops fill the frame with the lesion).
    """
    width, height = size
    affine_scale, crop_area, crop_p = ((0.75, 1.33), (0.35, 1.0), 0.8) if zoom else ((0.9, 1.15), (0.75, 1.0), 0.5)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(rotate=(-180, 180), scale=affine_scale, translate_percent=(-0.05, 0.05), border_mode=0, p=0.9),
            A.RandomResizedCrop(
                size=(height, width), scale=crop_area, ratio=(width / height * 0.9, width / height * 1.1), p=crop_p
            ),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.02, p=0.8),
        ]
    )


class AugMix:
    """AugMix on uint8 HWC arrays: mix ``width`` random chains of depth 1-``depth``."""

    def __init__(self, size: tuple[int, int], *, width: int = 3, depth: int = 3, alpha: float = 1.0) -> None:
        w, h = size
        self.ops = [
            A.Affine(rotate=(-30, 30), border_mode=0, p=1.0),
            A.Affine(shear=(-15, 15), border_mode=0, p=1.0),
            A.Affine(translate_percent=(-0.1, 0.1), border_mode=0, p=1.0),
            A.Equalize(p=1.0),
            A.Posterize(num_bits=(4, 6), p=1.0),
            A.Solarize(threshold_range=(0.5, 1.0), p=1.0),
            A.RandomBrightnessContrast(p=1.0),
            A.Sharpen(p=1.0),
        ]
        # flips only: a 90-degree turn would change the shape of a non-square image
        self.base = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
        self.width, self.depth, self.alpha = width, depth, alpha
        self.size = (h, w)

    def __call__(self, *, image: np.ndarray, **_: Any) -> dict[str, np.ndarray]:
        image = self.base(image=image)["image"]
        rng = np.random.default_rng()
        weights = rng.dirichlet([self.alpha] * self.width).astype(np.float32)
        mix = np.zeros(image.shape, dtype=np.float32)
        for w in weights:
            out = image
            for _ in range(rng.integers(1, self.depth + 1)):
                out = self.ops[rng.integers(len(self.ops))](image=out)["image"]
            mix += w * out.astype(np.float32)
        m = np.float32(rng.beta(self.alpha, self.alpha))
        blended = (1 - m) * image.astype(np.float32) + m * mix
        return {"image": np.clip(blended + 0.5, 0, 255).astype(np.uint8)}


def train_pipeline(kind: str, size: tuple[int, int]) -> Any | None:
    """The training augmentation for ``kind`` (none / basic / zoom / augmix); None means no augmentation."""
    if kind == "none":
        return None
    if kind in ("basic", "zoom"):
        return basic_pipeline(size, zoom=kind == "zoom")
    if kind == "augmix":
        return AugMix(size)
    raise ValueError(f"unknown augmentation {kind!r}; choose none, basic, zoom or augmix")

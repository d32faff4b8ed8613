"""Refer what the model cannot judge: input checks and out-of-distribution scores.

A classifier trained on dermoscopy answers with a class for any picture, so the app must say
"refer" when an image is not something the model can judge. Three layers, cheapest first:

1. input checks before the model (``input_problem``): an image too small to judge is
   refused; an image that is mostly one colour (a flat field, a blank frame) or has almost
   no colour (a greyscale picture, most screenshots) is referred;
2. a feature-space out-of-distribution score fitted at the end of training (serving.refit) on
   the training split's features (a pooled inner backbone layer, ``models.WithFeatures``), with the
   cut-off that ``keep`` of the validation images pass:
   - ``mahalanobis``: Lee et al. 2018, "A simple unified framework for detecting
     out-of-distribution samples and adversarial attacks": the smallest Mahalanobis distance
     to a class mean under one shared covariance (Ledoit-Wolf shrinkage, scikit-learn, since
     192 to 1280 dimensions from a few thousand images need it);
   - ``knn``: Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors":
     the distance to the k-th nearest training feature after L2 normalisation;
3. ``energy`` (Liu et al. 2020) on the logits, the earlier default, kept as an option.

Every score is "higher = more like the training data". What a score needs is stored beside
the weights as ``ood.safetensors`` (arrays only, never a pickle) and described in
``model.json``. The method of a new bundle was picked by ``benchmarks/bench_refer.py``.
Everything here is a pure function of images, features, logits and arrays: fitting a
bundle's score (which needs its network) is ``serving.refit.fit_ood``.

This is decision support, not a diagnostic device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermaclass.errors import InputProblem

log = logging.getLogger(__name__)

OOD_METHODS: tuple[str, ...] = ("mahalanobis", "knn", "energy")
#: An ensemble's score: the mean over its members of each member's own score, measured from
#: that member's cut-off in units of the spread of its validation scores (``member_margins``).
#: The members' methods and scales differ (a Mahalanobis distance is not an energy), so raw
#: scores cannot be averaged; margins can, and the ensemble's cut-off is 0.
ENSEMBLE_OOD = "members"
OOD_FILE = "ood.safetensors"

#: Shorter side below which an image is refused: a 128x96 network input upsampled from fewer
#: pixels than this holds no dermoscopic structure to judge.
MIN_SIDE = 64
#: Share of pixels in the most common coarse colour from which an image is referred: above the
#: largest share among all 10,015 HAM10000 images (0.94), with a margin; a flat field with
#: sensor noise scores 1.0. Set on HAM10000 alone; the external sets only report how many
#: of their images it refers (benchmarks/results/refer.json).
ONE_COLOUR_SHARE = 0.97

#: Mean per-pixel colourfulness (max - min over R, G, B) below which an image is referred:
#: dermoscopy is colour (the smallest among all HAM10000 images is 5.2; 1 % are under 15);
#: greyscale pictures score 0 and screenshots of documents mostly under 1. Set on HAM10000
#: alone, below its minimum with a margin (benchmarks/results/refer.json).
MIN_COLOURFULNESS = 3.0

NOT_DERMOSCOPY = "this does not look like a dermoscopic image of a skin lesion"


# ---- input checks ------------------------------------------------------------------------------
THUMBNAIL_SIDE = 64  # px wide: the input checks judge the whole picture, not its fine detail


def thumbnail(image: Any, *, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The RGB image as uint8 at most ``side`` px wide (box-averaged), for the input checks."""
    from PIL import Image

    a = np.asarray(image, dtype=np.uint8)
    h, w = a.shape[:2]
    if w > side:
        a = np.asarray(Image.fromarray(a).resize((side, max(1, round(side * h / w))), Image.Resampling.BOX))
    return a[..., :3]


def one_colour_share(image: np.ndarray, *, levels: int = 8) -> float:
    """Share of pixels in the most common colour after quantising each channel to ``levels`` bins,
    on the thumbnail: 1.0 for a flat field, about 0.1-0.6 for dermoscopy."""
    q = (thumbnail(image).astype(np.int32) * levels) // 256
    codes = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
    return float(np.bincount(codes.ravel(), minlength=levels**3).max() / codes.size)


def colourfulness(image: np.ndarray) -> float:
    """Mean over pixels of (max - min) of R, G, B on the thumbnail: 0 for a greyscale image."""
    a = thumbnail(image).astype(np.int16)
    return float(np.mean(a.max(axis=-1) - a.min(axis=-1)))


def input_problem(
    image: Any,
    *,
    min_side: int = MIN_SIDE,
    one_colour: float = ONE_COLOUR_SHARE,
    min_colourfulness: float = MIN_COLOURFULNESS,
) -> str | None:
    """Plain-words reason to refer an RGB image (PIL or HxWx3 array) before the model sees it,
    or None. Raises ``InputProblem`` for an image too small to judge."""
    a = np.asarray(image)
    h, w = a.shape[:2]
    if min(h, w) < min_side:
        raise InputProblem(
            f"too small to judge: the image is {w}x{h} pixels; a dermoscopic image needs at least "
            f"{min_side} pixels on its shorter side"
        )
    small = thumbnail(a)  # once: both checks read the same thumbnail (a thumbnail of it is itself)
    share = one_colour_share(small)
    if share >= one_colour:
        return f"{NOT_DERMOSCOPY} (one colour covers {share:.0%} of it)"
    if colourfulness(small) < min_colourfulness:
        return f"{NOT_DERMOSCOPY} (it has almost no colour; dermoscopic images are in colour)"
    return None


# ---- Mahalanobis (Lee et al. 2018) -------------------------------------------------------------
def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Class means and the shared precision matrix of the class-centred features (Ledoit-Wolf)."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    means = np.zeros((n_classes, f.shape[1]))
    present = np.zeros(n_classes, dtype=bool)
    for c in range(n_classes):
        if np.any(y == c):
            means[c], present[c] = f[y == c].mean(axis=0), True
    if not present.any():
        raise ValueError("no features to fit the out-of-distribution score on")
    centred = f - means[y]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"means": means[present].astype(np.float32), "precision": precision.astype(np.float32)}


def mahalanobis_score(features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance to a class mean (higher = more in-distribution)."""
    f = np.asarray(features, dtype=np.float64)
    p = np.asarray(stats["precision"], dtype=np.float64)
    d2 = [np.einsum("nd,de,ne->n", f - m, p, f - m) for m in np.asarray(stats["means"], dtype=np.float64)]
    return -np.min(d2, axis=0)


# ---- k nearest neighbours (Sun et al. 2022) ----------------------------------------------------
def _unit(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def fit_knn(features: np.ndarray, *, k: int = 10, max_bank: int = 8000, seed: int = 0) -> dict[str, np.ndarray]:
    """A bank of L2-normalised training features (a random subset of at most ``max_bank``, to keep
    the bundle small) and k. Sun et al. scale k with the bank (k = 50 at 100 % of ImageNet's
    1.2 M images, k = 1 at 1 %); a few thousand images call for a small k (k = 10 referred as
    many non-dermoscopic images as k = 5 and fewer external dermoscopy images in the screen of
    bench_refer). At 192 dimensions the whole HAM10000 training split fits in 2.7 MB."""
    f = _unit(features)
    if len(f) > max_bank:
        f = f[np.sort(np.random.default_rng(seed).choice(len(f), max_bank, replace=False))]
    return {"bank": f.astype(np.float16), "k": np.asarray([min(k, len(f))], dtype=np.int64)}


def knn_score(features: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Minus the distance to the k-th nearest bank feature (higher = more in-distribution)."""
    bank = np.asarray(stats["bank"], dtype=np.float32)
    k = int(np.asarray(stats["k"]).ravel()[0])
    q = _unit(features)
    if q.shape[1] != bank.shape[1]:
        raise ValueError(
            f"features of {q.shape[1]} dimensions against a bank of {bank.shape[1]}: the score was "
            "fitted on another layer; refit it (`dermaclass fit-ood`)"
        )
    # Unit vectors: |a - b|^2 = 2 - 2 a.b, so the k-th nearest is the k-th largest similarity.
    sim = q @ bank.T
    kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
    return -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))


# ---- energy (Liu et al. 2020) -----------------------------------------------------------------------
def energy_score(logits: np.ndarray) -> np.ndarray:
    """The negative free energy logsumexp(logits) per image (Liu et al. 2020, "Energy-based
    out-of-distribution detection"): higher means more like the training data."""
    from scipy.special import logsumexp

    return logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


# ---- one entry point -------------------------------------------------------------------------------
def fit(method: str, features: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """The arrays ``score`` needs for ``method`` (energy needs none)."""
    if method == "mahalanobis":
        return fit_mahalanobis(features, labels, n_classes)
    if method == "knn":
        return fit_knn(features)
    if method == "energy":
        return {}
    raise ValueError(f"unknown out-of-distribution method {method!r}; choose from {', '.join(OOD_METHODS)}")


def score(method: str, *, logits: np.ndarray, features: np.ndarray | None, stats: dict[str, np.ndarray]) -> np.ndarray:
    """The out-of-distribution score of ``method`` for a batch (higher = more like the training data)."""
    if method == "energy":
        return energy_score(logits)
    if features is None:
        raise ValueError(f"the {method} score needs the backbone features")
    if method == "mahalanobis":
        return mahalanobis_score(features, stats)
    if method == "knn":
        return knn_score(features, stats)
    raise ValueError(f"unknown out-of-distribution method {method!r}; choose from {', '.join(OOD_METHODS)}")


def member_margins(scores: Sequence[np.ndarray], cutoffs: Sequence[float], scales: Sequence[float]) -> np.ndarray:
    """The ensemble's score (``ENSEMBLE_OOD``): mean over members of (score - cut-off) / scale.

    Below 0 means the members, on average, put the image further below their own cut-offs
    than above them. A scale that is not positive (a member fitted before scales were
    stored) counts as 1.
    """
    if not len(scores):
        raise ValueError("no member scores to combine")
    margins = [
        (np.asarray(s, np.float64) - float(t)) / (float(d) if d and d > 0 else 1.0)
        for s, t, d in zip(scores, cutoffs, scales, strict=True)
    ]
    return np.mean(margins, axis=0)


def threshold(scores: np.ndarray, *, keep: float) -> float:
    """The cut-off that ``keep`` of the given (validation) scores reach or exceed."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no scores to set an out-of-distribution threshold on")
    return float(np.quantile(s, 1.0 - keep, method="lower"))


def save_stats(folder: str | Path, stats: dict[str, np.ndarray]) -> Path | None:
    """Write the score's arrays as ``ood.safetensors`` in ``folder`` (atomically); None for energy."""
    from safetensors.numpy import save_file

    from dermaclass.fileio import atomic_path

    if not stats:
        return None
    out = Path(folder) / OOD_FILE
    with atomic_path(out) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in stats.items()}, str(tmp))
    return out


def load_stats(folder: str | Path, method: str) -> dict[str, np.ndarray]:
    """The arrays of ``method`` from a bundle folder, with a clear error when they are missing."""
    from safetensors.numpy import load_file

    if method == "energy":
        return {}
    path = Path(folder) / OOD_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the bundle's out-of-distribution method {method!r} needs it "
            "(retrain, or run `dermaclass fit-ood` on the bundle)"
        )
    stats = load_file(str(path))
    need = {"mahalanobis": {"means", "precision"}, "knn": {"bank", "k"}}[method]
    if not need <= set(stats):
        raise ValueError(f"{path}: holds {sorted(stats)}, but {method} needs {sorted(need)}")
    return stats

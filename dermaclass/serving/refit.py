"""Fit what a finished bundle serves besides its weights: calibration and the referral rule.

After training, and again whenever a clinic asks (``dermaclass calibrate``, ``dermaclass
fit-ood``), the same sequence runs on the valid split, scored as the app scores (with the
bundle's test-time augmentation):

1. ``calibrate_bundle``: temperature scaling (Guo et al. 2017), the optional prior shift
   (logit adjustment, Menon et al. 2021) and the operating points (e.g. a melanoma threshold
   for 90 % validation sensitivity), fitted by ``evaluate.calibration`` and written into
   ``model.json``; then
2. ``fit_ood``: the out-of-distribution score (serving.refer) fitted on the train split's
   features, its cut-off on the valid split, and the validation referral rate of the whole rule.

The weights never change here, so exports stay valid. Test and external images are never
read: a threshold fitted on them would flatter the figures they report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dermaclass import models
from dermaclass.config import CALIBRATION_SETTINGS, Config
from dermaclass.data.labels import class_indices
from dermaclass.evaluate.calibration import calibrate, class_prior
from dermaclass.evaluate.metrics import classification_metrics
from dermaclass.evaluate.run import EvaluationError, split_images
from dermaclass.serving.predictor import Predictor
from dermaclass.serving.refer import OOD_FILE, OOD_METHODS, fit, save_stats, score, threshold

log = logging.getLogger(__name__)


def calibrate_bundle(
    bundle: str | Path,
    *,
    logits: np.ndarray,
    labels: Sequence[str],
    train_images: Sequence[np.ndarray],
    train_labels: Sequence[str],
    valid_images: Sequence[np.ndarray],
    valid_labels: Sequence[str],
    cfg: Config,
    ood_method: str,
    ood_keep: float,
    keep_floor: bool = False,
    note: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the bundle's calibration on ``logits`` (the valid split as the bundle serves it;
    ``labels`` in the same order), write it with its operating points and valid metrics into
    ``model.json``, then fit the referral rule (``fit_ood`` on the images). The prior is the
    class frequency of ``train_labels``.

    ``keep_floor``: keep the bundle's referral floor instead of ``cfg.refer_below``; ``note``
    is stored in the calibration (who refitted it, when). Returns the valid metrics.
    """
    bundle = Path(bundle)
    meta = models.read_bundle_meta(bundle)
    classes = list(meta.classes)
    y = class_indices(labels, classes, source=f"{bundle}: the validation split")
    calibration, points, probs = calibrate(
        np.asarray(logits),
        y,
        classes,
        prior=class_prior([str(v) for v in train_labels], classes),
        **cfg.calibration_settings(),
    )
    if note:
        calibration["refitted"] = note
    if keep_floor and meta.calibration.get("refer"):
        calibration["refer"] = meta.calibration["refer"]
    metrics = classification_metrics(y, probs, classes)
    models.write_bundle_meta(
        bundle,
        meta.with_(
            calibration=calibration,
            operating_points=points,
            metrics_valid=metrics,
            # the settings it was fitted by (the floor only when it was refitted too)
            config={
                **meta.config,
                **{k: cfg.to_dict()[k] for k in CALIBRATION_SETTINGS if not (keep_floor and k == "refer_below")},
            },
        ),
    )
    # The out-of-distribution score reads the saved bundle exactly as the app will, and the
    # referral floor reads the new probabilities.
    fit_ood(
        bundle,
        train_images=train_images,
        train_labels=train_labels,
        valid_images=valid_images,
        valid_labels=valid_labels,
        method=ood_method,
        keep=ood_keep,
        force=True,
    )
    return metrics


def recalibrate(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    split_file: str | Path | None = None,
    cfg: Config | None = None,
    force: bool = False,
    tta: Literal["none", "flips2", "flips4"] | None = None,
) -> dict[str, Any]:
    """Refit a bundle's calibration on the valid split of ``data`` (``dermaclass calibrate``):
    temperature, prior shift and operating points from ``cfg`` (``target_sensitivity``,
    ``operating_classes``, ``prior_class``, ``prior_sensitivity``), as training fits them at its
    end, then the referral rule (its score and cut-off, method and share kept as the bundle
    has them). The weights do not change, so exports stay valid. The prior is the class
    frequency of the train split. Never on test or external images.

    An ensemble is refitted as it was trained, on its members' held-out folds, by
    ``train.ensemble_fit.recalibrate_ensemble`` (which calls ``refit_network`` for each member).
    ``tta``: change the test-time augmentation the bundle serves with (everything is refitted on
    its logits); None keeps the bundle's.

    ``model.json`` is rewritten atomically; a bundle that is already calibrated is refitted
    only with ``force``. Returns the new ``calibration`` entry.
    """
    cfg = cfg or Config()
    bundle = Path(bundle)
    meta = models.read_bundle_meta(bundle)
    if meta.is_ensemble:  # the CLI sends an ensemble to train.ensemble_fit (training's data and folds)
        raise EvaluationError(
            f"{bundle}: an ensemble is recalibrated on its members' held-out folds: "
            "dermaclass.train.ensemble_fit.recalibrate_ensemble (`dermaclass calibrate` calls it)"
        )
    if meta.calibration and not force:
        raise FileExistsError(
            f"{bundle}: already calibrated (temperature {meta.temperature:.3f}); pass --force to refit it"
        )
    if tta is not None:  # the Predictor below scores with the new mode; undone if the refit fails
        mode = models.tta_mode(tta)
        models.write_bundle_meta(bundle, meta.with_(tta=mode, config={**meta.config, "tta": models.tta_setting(mode)}))
    try:
        parts = split_images(bundle, data, splits=("train", "valid"), split_file=split_file, cfg=cfg)
        if not len(parts["valid"][0]):
            raise EvaluationError(f"{bundle}: no validation images in {data} to calibrate on")
        return refit_network(bundle, train=parts["train"], valid=parts["valid"], cfg=cfg)
    except BaseException:
        models.write_bundle_meta(bundle, meta)
        raise


def refit_network(
    bundle: Path,
    *,
    train: tuple[Sequence[str], Sequence[np.ndarray]],
    valid: tuple[Sequence[str], Sequence[np.ndarray]],
    cfg: Config,
) -> dict[str, Any]:
    """``recalibrate``'s refit of one network on images already in hand: (labels, preprocessed
    images) of its train and valid splits, scored with the bundle's TTA. Returns the new
    ``calibration`` entry."""
    valid_labels, valid_images = valid
    predictor = Predictor(bundle, backend="torch", threads=cfg.threads)
    logits = predictor.logits(valid_images)  # with the bundle's test-time augmentation, as it serves
    ood = predictor.meta.ood
    calibrate_bundle(
        bundle,
        logits=logits,
        labels=valid_labels,
        valid_labels=valid_labels,
        train_labels=train[0],
        train_images=train[1],
        valid_images=valid_images,
        cfg=cfg,
        ood_method=ood.get("method", cfg.ood),
        ood_keep=ood.get("keep", cfg.ood_keep),
        keep_floor=True,
        note={"by": "dermaclass calibrate", "at": datetime.now(UTC).isoformat(timespec="seconds")},
    )
    calibration = models.read_bundle_meta(bundle).calibration
    log.info(
        "%s: recalibrated on %d validation images (temperature %.3f)",
        bundle,
        len(valid_labels),
        calibration["temperature"],
    )
    return calibration


def refit_ood(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    split_file: str | Path | None = None,
    cfg: Config | None = None,
    method: str | None = None,
    keep: float | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fit (or refit) a bundle's out-of-distribution score on the train split of ``data`` and
    set its cut-off on the valid split (``dermaclass fit-ood``: bundles trained before the
    feature-space scores, or a new method). Never on test or external images."""
    cfg = cfg or Config()
    parts = split_images(bundle, data, splits=("train", "valid"), split_file=split_file, cfg=cfg)
    return fit_ood(
        bundle,
        train_images=parts["train"][1],
        train_labels=parts["train"][0],
        valid_images=parts["valid"][1],
        valid_labels=parts["valid"][0],
        method=method or cfg.ood,
        keep=keep if keep is not None else cfg.ood_keep,
        force=force,
    )


def fit_ood(
    bundle: str | Path,
    *,
    train_images: Sequence[np.ndarray],
    train_labels: Sequence[str],
    valid_images: Sequence[np.ndarray],
    valid_labels: Sequence[str],
    method: str = "mahalanobis",
    keep: float = 0.95,
    force: bool = False,
) -> dict[str, Any]:
    """Fit the bundle's out-of-distribution score and its cut-off, and store both in the bundle.

    The score is fitted on the training split's features (one view, no test-time augmentation:
    cheaper, and the cut-off absorbs the difference) and its cut-off is set so that ``keep`` of
    the validation split passes, scored as the app scores (with the bundle's TTA). Writes
    ``ood.safetensors`` (arrays only) and rewrites ``calibration.refer`` in ``model.json``
    atomically, with the validation referral rate of the whole rule. Images are preprocessed
    arrays at the bundle's input size (as the decode cache holds them). A bundle that already
    has a fitted score keeps it unless ``force``.
    """
    bundle = Path(bundle)
    if models.read_bundle_meta(bundle).is_ensemble:
        raise models.ModelError(
            f"{bundle}: an ensemble's out-of-distribution score is its members' (each fitted when "
            "it was trained); refit a member's with `dermaclass fit-ood BUNDLE/members/mK DATA`"
        )
    if (bundle / OOD_FILE).exists() and not force:
        raise FileExistsError(f"{bundle / OOD_FILE}: the bundle already has a fitted out-of-distribution score")
    if method not in OOD_METHODS:
        raise ValueError(f"unknown out-of-distribution method {method!r}; choose from {', '.join(OOD_METHODS)}")
    pred = Predictor(bundle, backend="torch")
    train_y = class_indices(train_labels, pred.classes, source=f"{bundle}: the train split")
    y = class_indices(valid_labels, pred.classes, source=f"{bundle}: the valid split")
    if len(valid_images) == 0:
        raise models.ModelError(f"{bundle}: no validation images to set the out-of-distribution cut-off on")
    stats: dict[str, np.ndarray] = {}
    if method != "energy":
        _, train_features = pred.forward(list(train_images), tta=False)
        stats = fit(method, train_features, train_y, len(pred.classes))
    logits, features = pred.forward(list(valid_images))
    scores = score(method, logits=logits, features=features, stats=stats)
    cut = threshold(scores, keep=keep)
    probs = pred.calibrated(logits)
    kept = (probs.max(axis=1) >= pred.refer_below) & (scores >= cut)
    (bundle / OOD_FILE).unlink(missing_ok=True)  # an energy bundle keeps no stale arrays
    save_stats(bundle, stats)
    calibration = dict(pred.meta.calibration)
    calibration["refer"] = {
        **pred.meta.refer,
        "min_top_probability": pred.refer_below,
        "ood": {
            "method": method,
            "threshold": cut,
            "keep": keep,
            "file": OOD_FILE if stats else None,
            # the spread of the validation scores: an ensemble measures margins in it
            "scale": float(np.std(scores)),
            "layer": pred.feature_layer,
            "features": (f"global average pool of {pred.feature_layer or 'the body output'}") if stats else None,
            "fitted_on": f"train split, {len(train_images)} images" if stats else None,
            "threshold_set_on": f"valid split, {len(valid_images)} images",
        },
        "valid_referred": float(np.mean(~kept)),
        "valid_accuracy_kept": float(np.mean((probs.argmax(1) == y)[kept])) if kept.any() else None,
    }
    models.write_bundle_meta(bundle, pred.meta.with_(calibration=calibration))
    log.info(
        "%s: out-of-distribution score %s, cut-off %.4f; the whole rule refers %.1f %% of validation images",
        bundle,
        method,
        cut,
        100 * float(np.mean(~kept)),
    )
    return calibration["refer"]

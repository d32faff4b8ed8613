"""Calibration of a trained model on its validation split: temperature scaling (Guo et al.
2017), an optional prior shift (post-hoc logit adjustment, Menon et al. 2021) and operating
points (the highest threshold reaching a target sensitivity, e.g. for melanoma). Pure numpy
on (logits, labels); the training run and ``dermaclass calibrate`` call it with the logits
the bundle will serve (with its test-time augmentation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from dermaclass.evaluate.metrics import (
    expected_calibration_error,
    fit_temperature,
    operating_point,
    prior_shift,
    softmax,
)

log = logging.getLogger(__name__)
# A class the training split lacks gets this prior, not log(0): its offset is large and finite.
MIN_PRIOR = 1e-4


def class_prior(labels: Sequence[str], classes: Sequence[str]) -> list[float]:
    """Each class's share of ``labels`` (the training split's), in ``classes`` order."""
    y = np.asarray(labels, dtype=str)
    return [float(np.mean(y == c)) if len(y) else 0.0 for c in classes]


def _temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, dict]:
    """The fitted temperature, its probabilities and ECE before/after; T = 1 when fitting would
    make validation ECE worse (NLL and ECE can disagree on a small validation split: never ship
    a worse calibration)."""
    t = fit_temperature(logits, labels)
    raw, probs = softmax(logits), softmax(logits, t)
    before, after = expected_calibration_error(labels, raw), expected_calibration_error(labels, probs)
    refused = before is not None and after is not None and after > before
    if refused:
        log.warning("temperature %.3f would make validation ECE worse (%.4f -> %.4f); keeping T = 1", t, before, after)
        t, probs, after = 1.0, raw, before
    return (
        t,
        probs,
        {
            "ece_before": before,
            "ece_after": after,
            **({"refused": "the fitted temperature made validation ECE worse; T = 1 kept"} if refused else {}),
        },
    )


def calibrate(
    logits: np.ndarray,
    labels: np.ndarray,
    vocab: list[str],
    *,
    prior: Sequence[float] | None = None,
    operating_classes: Sequence[str],
    target_sensitivity: float,
    prior_class: str,
    prior_sensitivity: float,
    refer_below: float,
) -> tuple[dict, dict, np.ndarray]:
    """Temperature scaling, the prior shift, operating points and the referral floor, fitted on
    the validation split. The settings are ``Config.calibration_settings()``.

    ``prior``: the training split's class frequencies (in ``vocab`` order), needed for the prior
    shift (``prior_sensitivity`` > 0) towards ``prior_class``. Each of ``operating_classes``
    gets the highest threshold that reaches ``target_sensitivity`` on validation; images whose
    top probability is below ``refer_below`` are referred. The shift is chosen on the calibrated logits, stored
    as per-class offsets added to the raw logits (``calibration.offsets``), and the temperature
    is then refitted on the shifted logits, so the served probabilities are
    ``softmax((logits + offsets) / T)`` and the operating points are set on those.

    Returns the bundle's ``calibration`` and ``operating_points`` entries and the calibrated
    validation probabilities. The referral rule (``calibration.refer``) is fitted on the saved
    bundle by ``serving.refit.fit_ood``, since its score reads the bundle's features as the app does.
    """
    logits = np.asarray(logits, dtype=np.float64)
    t, probs, ece = _temperature(logits, labels)
    # The referral floor on the top calibrated probability; serving.refit.fit_ood adds the
    # out-of-distribution score to this rule once the bundle is saved.
    calibration: dict = {
        "method": "temperature",
        "temperature": t,
        "fitted_on": "valid",
        "n": int(len(labels)),
        **ece,
        "refer": {"min_top_probability": refer_below},
    }
    if prior_sensitivity > 0:
        if prior is None:
            raise ValueError("the prior shift needs the training split's class frequencies (prior)")
        if prior_class not in vocab:
            log.warning("prior class %r is not among the classes %s; no prior shift", prior_class, vocab)
        else:
            log_prior = np.log(np.clip(np.asarray(prior, dtype=np.float64), MIN_PRIOR, None))
            shift = prior_shift(
                logits / t, labels, log_prior, vocab.index(prior_class), target_sensitivity=prior_sensitivity
            )
            if not shift["reached"]:
                log.warning(
                    "prior shift: %s reaches validation sensitivity %.3f at most (tau %.1f), below %.2f",
                    prior_class,
                    shift["sensitivity"] or 0,
                    shift["tau"],
                    prior_sensitivity,
                )
            offsets = t * shift["tau"] * log_prior  # in raw-logit units, so a new temperature can follow
            t, probs, ece = _temperature(logits + offsets, labels)
            ece.pop("ece_before")  # "before" stays the network's own softmax
            calibration.update(
                temperature=t,
                **ece,
                offsets=offsets.tolist(),
                prior_shift={
                    "method": "logit adjustment (Menon et al. 2021)",
                    "class": prior_class,
                    "tau": shift["tau"],
                    "target_sensitivity": prior_sensitivity,
                    "reached": shift["reached"],
                    "valid_sensitivity_before": shift["sensitivity_before"],
                    "valid_sensitivity": shift["sensitivity"],
                    "prior": dict(zip(vocab, np.asarray(prior, dtype=float).round(5).tolist())),
                    "prior_from": "train split",
                },
            )
            log.info(
                "prior shift tau %.1f: valid %s sensitivity %.3f -> %.3f",
                shift["tau"],
                prior_class,
                shift["sensitivity_before"] or 0,
                shift["sensitivity"] or 0,
            )
    log.info(
        "temperature %.3f: valid ECE %.4f -> %.4f", t, calibration["ece_before"] or 0, calibration["ece_after"] or 0
    )
    points = operating_points(
        labels, probs, vocab, operating_classes=operating_classes, target_sensitivity=target_sensitivity
    )
    return calibration, points, probs


def operating_points(
    labels: np.ndarray,
    probs: np.ndarray,
    vocab: Sequence[str],
    *,
    operating_classes: Sequence[str],
    target_sensitivity: float,
) -> dict[str, dict[str, Any]]:
    """The bundle's ``operating_points`` entry: for each of ``operating_classes``, the highest
    threshold on its calibrated probability that reaches ``target_sensitivity`` on ``labels``."""
    points = {}
    for cls in operating_classes:
        if cls not in vocab:
            log.warning("operating class %r is not among the classes %s; no threshold for it", cls, list(vocab))
            continue
        op = operating_point(labels, probs, list(vocab).index(cls), target_sensitivity=target_sensitivity)
        points[cls] = {
            "threshold": op["threshold"],
            "target_sensitivity": target_sensitivity,
            "valid_sensitivity": op["sensitivity"],
            "valid_specificity": op["specificity"],
        }
        if op["threshold"] is not None:
            log.info(
                "operating point %s: P >= %.4f gives valid sensitivity %.3f, specificity %.3f",
                cls,
                op["threshold"],
                op["sensitivity"],
                op["specificity"],
            )
    return points

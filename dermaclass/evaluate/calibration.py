"""Calibration of a trained model on its validation split: temperature scaling (Guo et al.
2017) and operating points (the highest threshold reaching a target sensitivity, e.g. for
melanoma). Pure numpy on (logits, labels); the training run calls it with the logits the
bundle will serve (with its test-time augmentation).
"""

from __future__ import annotations

import logging

import numpy as np

from dermaclass.config import Config
from dermaclass.evaluate.metrics import expected_calibration_error, fit_temperature, operating_point, softmax

log = logging.getLogger(__name__)


def calibrate(cfg: Config, logits: np.ndarray, labels: np.ndarray, vocab: list[str]) -> tuple[dict, dict, np.ndarray]:
    """Temperature scaling, operating points and the referral rule, fitted on the validation split.

    Returns the bundle's ``calibration`` and ``operating_points`` entries and the calibrated
    validation probabilities. Every later prediction divides the logits by this temperature.
    The referral rule (``calibration.refer``) is fitted on the saved bundle by
    ``refer.fit_ood``, since its score reads the bundle's features as the app does.
    """
    t = fit_temperature(logits, labels)
    raw, probs = softmax(logits), softmax(logits, t)
    before, after = expected_calibration_error(labels, raw), expected_calibration_error(labels, probs)
    refused = before is not None and after is not None and after > before
    if refused:  # NLL and ECE can disagree on a small validation split: never ship a worse calibration
        log.warning("temperature %.3f would make validation ECE worse (%.4f -> %.4f); keeping T = 1", t, before, after)
        t, probs, after = 1.0, raw, before
    calibration = {"method": "temperature", "temperature": t, "fitted_on": "valid", "n": int(len(labels)),
                   "ece_before": before, "ece_after": after,
                   **({"refused": "the fitted temperature made validation ECE worse; T = 1 kept"} if refused else {})}
    log.info("temperature %.3f: valid ECE %.4f -> %.4f", t, calibration["ece_before"] or 0, calibration["ece_after"] or 0)
    points = {}
    for cls in cfg.operating_classes:
        if cls not in vocab:
            log.warning("operating class %r is not among the classes %s; no threshold for it", cls, vocab)
            continue
        op = operating_point(labels, probs, vocab.index(cls), target_sensitivity=cfg.target_sensitivity)
        points[cls] = {"threshold": op["threshold"], "target_sensitivity": cfg.target_sensitivity,
                       "valid_sensitivity": op["sensitivity"], "valid_specificity": op["specificity"]}
        if op["threshold"] is not None:
            log.info("operating point %s: P >= %.4f gives valid sensitivity %.3f, specificity %.3f",
                     cls, op["threshold"], op["sensitivity"], op["specificity"])
    return calibration, points, probs



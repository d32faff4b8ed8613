"""Evaluation: pure metrics over (labels, probabilities), and a bundle run on a labelled dataset.

- ``metrics``: balanced accuracy, macro-F1, AUROC, mAP (seed 002), per-class sensitivity and
  specificity, calibration error, grouped bootstrap intervals, temperature scaling, the
  prior shift, operating points and their trade-off curves, all pure functions returning
  plain dicts;
- ``calibration``: the temperature, prior shift and operating points fitted from valid logits;
- ``record``: the typed ``Report`` that ``dermaclass.report`` renders;
- ``run``: a model bundle on a dataset split -> predictions and its ``Report``;
- ``external``: other clinics' labelled sets, for reporting only (never fitted on).
"""

from dermaclass.evaluate.metrics import (
    bootstrap_intervals,
    classification_metrics,
    confused_pairs,
    expected_calibration_error,
    fit_temperature,
    flag_rates,
    operating_point,
    prior_shift,
    reliability_bins,
    softmax,
    top_k_accuracy,
)

__all__ = [
    "bootstrap_intervals",
    "classification_metrics",
    "confused_pairs",
    "expected_calibration_error",
    "fit_temperature",
    "flag_rates",
    "operating_point",
    "prior_shift",
    "reliability_bins",
    "softmax",
    "top_k_accuracy",
]

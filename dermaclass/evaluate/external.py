"""External validation: a bundle on labelled dermoscopy from outside its training clinics.

Internal splits flatter a model: one ResNet recipe scores about 0.83 balanced accuracy on an
internal HAM10000 split and 0.67-0.69 on an external test (Abhishek et al., DermaMNIST-E).
A clinic retrains to get a model that works on *its* patients, so every benchmark and the
bundled model's report carry figures on whole external sets beside the internal test split.

External sets are for measuring only: nothing (temperature, thresholds, checkpoints, early
stopping) is ever fitted on them. ``headline`` is a pure function of a ``Report``;
``evaluate_external`` runs ``evaluate_bundle`` on every image of each set (``--split all``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dermaclass.config import Config
from dermaclass.evaluate.record import Report
from dermaclass.evaluate.run import EvaluationError

log = logging.getLogger(__name__)

# The figures every table compares recipes on (balanced accuracy is over the classes present).
HEADLINE_KEYS = ("balanced_accuracy", "macro_f1", "macro_auroc", "accuracy", "ece", "log_loss")


def headline(report: Report) -> dict[str, Any]:
    """The compact figures of one evaluation: headline metrics with intervals, per-class
    sensitivity/specificity/support, and the stored operating points' rates."""
    iv = report.overall_intervals
    per_class = report.per_class
    return {
        "n": report.n,
        "tta": report.tta,
        **{k: report.metrics.get(k) for k in HEADLINE_KEYS},
        "intervals": {k: iv.get(k) for k in ("balanced_accuracy", "macro_f1", "macro_auroc") if iv.get(k)},
        "per_class": {
            c: {
                "support": m.get("support"),
                "sensitivity": m.get("sensitivity"),
                "specificity": m.get("specificity"),
                "auroc": m.get("auroc"),
            }
            for c, m in per_class.items()
        },
        "operating_points": {
            c: {k: op.get(k) for k in ("threshold", "sensitivity", "specificity", "curve", "fitted_here")}
            for c, op in report.operating_points.items()
        },
    }


def parse_sets(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> {name: path}; a missing folder is an error."""
    sets: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        p = Path(path)
        if not name or not p.is_dir():
            raise EvaluationError(f"{p}: external set folder not found (give NAME=FOLDER or FOLDER)")
        if name in sets:
            raise EvaluationError(f"external set name {name!r} given twice")
        sets[name] = p
    return sets


def evaluate_external(
    bundle: str | Path,
    sets: Mapping[str, str | Path],
    *,
    cfg: Config | None = None,
    tta: bool | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``headline`` figures of the bundle on every image of each external set (no split file)."""
    from dermaclass.evaluate.run import evaluate_bundle

    out: dict[str, dict[str, Any]] = {}
    for name, path in sets.items():
        ev = evaluate_bundle(
            bundle,
            path,
            split="all",
            cfg=cfg or Config(),
            n_boot=n_boot,
            seed=seed,
            thumbnails=False,
            gallery=0,
            tta=tta,
        )
        out[name] = {"data": str(path), **headline(ev.report)}
        log.info(
            "external %s: %d images, balanced accuracy %.4f",
            name,
            ev.report.n,
            ev.report.balanced_accuracy or float("nan"),
        )
    return out

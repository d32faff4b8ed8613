"""``report.json`` as a typed record: what ``dermaclass evaluate`` writes and every reader reads.

A ``Report`` is built in one place (``evaluate.run.evaluate_bundle``), completed through
``with_`` (e.g. the external sets), written by ``to_dict`` and read by ``read_report`` /
``from_dict``, which checks the format version and the fields a reader relies on (class
list, confusion-matrix shape, per-class figures, intervals) and refuses anything else with
``ReportError`` (exit 4) naming the file and the field. The figures themselves stay the
plain dicts of the pure metric functions (``evaluate.metrics``), which ``dermaclass.report``
renders (MONAI's metric/handler split); in the file they sit at the top level, as before.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermaclass.errors import ReportError
from dermaclass.fileio import check_record_header, record_fields

#: The report.json format this dermaclass writes; it reads this one and every older one.
REPORT_FORMAT = 1
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class Report:
    """One evaluation of one bundle on one labelled split."""

    classes: tuple[str, ...]
    #: ``evaluate.metrics.classification_metrics``: n, accuracy, balanced_accuracy, macro_f1,
    #: macro_auroc, mAP, top2_accuracy, log_loss, ece, per_class, confusion_matrix
    metrics: dict[str, Any]
    class_names: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    tta: str | None = None
    intervals: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)
    confused_pairs: list[dict[str, Any]] = field(default_factory=list)
    worst_errors: list[dict[str, Any]] = field(default_factory=list)
    gallery_images: bool = False
    #: other clinics' sets, ``evaluate.external.headline`` per set (compared on, never fitted on)
    external: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str | None = None
    dermaclass_version: str | None = None
    disclaimer: str | None = None
    format: int = REPORT_FORMAT

    # ---- the figures every reader wants ----------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.metrics["n"])

    @property
    def balanced_accuracy(self) -> float | None:
        return self.metrics.get("balanced_accuracy")

    @property
    def per_class(self) -> dict[str, dict[str, Any]]:
        return self.metrics["per_class"]

    @property
    def overall_intervals(self) -> dict[str, list[float] | None]:
        return self.intervals.get("overall") or {}

    @property
    def names(self) -> dict[str, str]:
        return {c: self.class_names.get(c, c) for c in self.classes}

    def with_(self, **changes: Any) -> Report:
        return dataclasses.replace(self, **changes)

    # ---- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The report.json layout: the record's sections with the metric figures at the top level."""
        out = record_fields(self, skip=("metrics",))
        at = list(out).index("classes") + 1  # the figures follow the class list, as readers expect
        items = list(out.items())
        return dict(items[:at] + [(k, v) for k, v in self.metrics.items() if k not in out] + items[at:])

    @classmethod
    def from_dict(cls, d: Any, source: str | Path = REPORT_FILE) -> Report:
        """The record of a parsed report.json; ``ReportError`` naming the field when it is not one."""

        def bad(what: str, problem: str) -> ReportError:
            return ReportError(f"{source}: {what} {problem}; not a dermaclass report (or edited by hand)")

        check_record_header(
            d,
            source=source,
            kind="report",
            current=REPORT_FORMAT,
            error=ReportError,
            required=("classes", "n", "balanced_accuracy", "per_class", "confusion_matrix"),
        )
        classes = d["classes"]
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise bad("classes", "must be a list of class codes")
        per_class = d["per_class"]
        if not isinstance(per_class, dict) or set(per_class) != set(classes):
            raise bad("per_class", f"must have one entry per class ({', '.join(classes)})")
        cm = d["confusion_matrix"]
        if not (
            isinstance(cm, list)
            and len(cm) == len(classes)
            and all(isinstance(row, list) and len(row) == len(classes) for row in cm)
        ):
            raise bad("confusion_matrix", f"must be {len(classes)}x{len(classes)} (one row and column per class)")
        n = d["n"]
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise bad("n", f"is {n!r}, not a count of images")
        for key in ("model", "data", "intervals", "calibration", "operating_points", "external", "class_names"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise bad(key, "must be an object")
        named = {f.name for f in dataclasses.fields(cls)} - {"metrics"}
        kwargs = {k: v for k, v in d.items() if k in named and v is not None}
        kwargs["classes"] = tuple(classes)
        return cls(**kwargs, metrics={k: v for k, v in d.items() if k not in named})


def read_report(folder: str | Path) -> Report:
    """The checked record of ``folder/report.json`` (or of that file itself)."""
    path = Path(folder)
    path = path if path.suffix == ".json" else path / REPORT_FILE
    if not path.is_file():
        raise ReportError(
            f"{path.parent}: no {REPORT_FILE} here (run `dermaclass evaluate MODEL DATA --out {path.parent}`)"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ReportError(f"{path}: unreadable report ({type(exc).__name__}: {str(exc)[:200]})") from None
    return Report.from_dict(d, path)

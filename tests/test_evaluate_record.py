"""report.json as a typed record: round trip, and what a reader refuses (exit 4, naming the field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dermaclass.evaluate.record import REPORT_FORMAT, Report, ReportError, read_report


def _report() -> Report:
    per_class = {
        c: {"support": 5, "sensitivity": 0.6, "specificity": 0.8, "precision": 0.5, "f1": 0.55, "auroc": 0.7}
        for c in ("mel", "nv")
    }
    return Report(
        classes=("mel", "nv"),
        class_names={"mel": "melanoma"},
        metrics={
            "n": 10,
            "accuracy": 0.7,
            "balanced_accuracy": 0.6,
            "per_class": per_class,
            "confusion_matrix": [[3, 2], [2, 3]],
        },
        data={"split": "test", "n": 10},
        intervals={"overall": {"balanced_accuracy": [0.4, 0.8]}},
    )


def test_round_trip_keeps_the_file_layout(tmp_path: Path) -> None:
    r = _report()
    d = r.to_dict()
    assert d["format"] == REPORT_FORMAT and d["balanced_accuracy"] == 0.6 and "metrics" not in d  # figures at the top
    (tmp_path / "report.json").write_text(json.dumps(d))
    back = read_report(tmp_path)
    assert back == r and back.n == 10 and back.overall_intervals["balanced_accuracy"] == [0.4, 0.8]
    assert back.names == {"mel": "melanoma", "nv": "nv"}
    assert read_report(tmp_path / "report.json") == r


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: {**d, "format": REPORT_FORMAT + 1}, "newer than this dermaclass reads"),
        (lambda d: {**d, "format": "one"}, "format is 'one'"),
        (lambda d: {k: v for k, v in d.items() if k != "per_class"}, "lacks per_class"),
        (lambda d: {**d, "confusion_matrix": [[1, 2, 3], [4, 5, 6]]}, "confusion_matrix must be 2x2"),
        (lambda d: {**d, "per_class": {"mel": {}}}, "per_class must have one entry per class"),
        (lambda d: {**d, "n": -1}, "n is -1"),
        (lambda d: {**d, "external": []}, "external must be an object"),
        (lambda d: [d], "JSON object"),
    ],
)
def test_bad_reports_are_refused_naming_the_field(tmp_path: Path, change, problem: str) -> None:  # noqa: ANN001
    (tmp_path / "report.json").write_text(json.dumps(change(_report().to_dict())))
    with pytest.raises(ReportError, match=problem) as info:
        read_report(tmp_path)
    assert info.value.exit_code == 4 and "report.json" in str(info.value)


def test_missing_and_unreadable_reports(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no report.json here"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="unreadable report"):
        read_report(tmp_path)

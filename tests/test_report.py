"""Rendering from report dicts, and compare's paired deltas and drop flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermaclass.cli import app
from dermaclass.evaluate.metrics import classification_metrics
from dermaclass.evaluate.record import Report
from dermaclass.report import CompareError, compare_reports, confusion_png, render_html, write_compare

CLASSES = ["bkl", "mel", "nv"]


def fake_report(folder: Path, labels: np.ndarray, probs: np.ndarray, *, images_sha: str = "same") -> Path:
    """An evaluate output folder written from labels and probabilities (the compare inputs)."""
    folder.mkdir(parents=True)
    n = len(labels)
    preds = pd.DataFrame(
        {
            "image": [f"img{i:04d}" for i in range(n)],
            "group": [f"lesion{i // 2}" for i in range(n)],
            "label": [CLASSES[i] for i in labels],
            "predicted": [CLASSES[i] for i in probs.argmax(1)],
        }
    )
    for i, c in enumerate(CLASSES):
        preds[f"p_{c}"] = probs[:, i]
    preds.to_csv(folder / "predictions.csv", index=False)
    report = Report(
        classes=tuple(CLASSES),
        class_names={"mel": "melanoma"},
        metrics=classification_metrics(labels, probs, CLASSES),
        model={"bundle": str(folder), "weights_sha256": "0" * 64},
        data={"images_sha256": images_sha, "n": n, "split": "test", "root": "data"},
    )
    (folder / "report.json").write_text(json.dumps(report.to_dict()))
    return folder


def _probs(labels: np.ndarray, correct: np.ndarray) -> np.ndarray:
    pred = np.where(correct, labels, (labels + 1) % 3)
    p = np.full((len(labels), 3), 0.1)
    p[np.arange(len(labels)), pred] = 0.8
    return p


@pytest.fixture
def two_reports(tmp_path: Path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 100)
    ok = rng.random(300) < 0.85
    old = fake_report(tmp_path / "old", y, _probs(y, ok))
    injected = ok.copy()
    injected[(y == 1) & (rng.random(300) < 0.5)] = False  # half the melanomas now missed
    new = fake_report(tmp_path / "new", y, _probs(y, injected))
    same = fake_report(tmp_path / "same", y, _probs(y, ok))
    return old, new, same


def test_compare_flags_an_injected_sensitivity_drop(two_reports, tmp_path: Path) -> None:
    old, new, _ = two_reports
    result = compare_reports(old, new, n_boot=300)
    assert result["paired"] and result["sensitivity_drops"] == ["mel"]
    mel = result["per_class"]["mel"]["sensitivity"]
    assert mel["delta"] < -0.2 and mel["delta_interval"][1] < 0
    assert result["per_class"]["nv"]["sensitivity"]["delta"] == 0
    paths = write_compare(result, tmp_path / "cmp")
    assert "SENSITIVITY DROP" in paths["html"].read_text()
    assert Image.open(paths["png"]).size[0] > 300


def test_identical_models_have_zero_deltas_and_no_flag(two_reports) -> None:
    old, _, same = two_reports
    result = compare_reports(old, same, n_boot=100)
    assert result["sensitivity_drops"] == []
    assert result["overall"]["balanced_accuracy"]["delta"] == 0
    assert result["overall"]["balanced_accuracy"]["delta_interval"] == [0.0, 0.0]  # paired: no sampling noise


def test_compare_refuses_different_test_sets(two_reports, tmp_path: Path) -> None:
    old, _, _ = two_reports
    y = np.repeat([0, 1, 2], 10)
    other = fake_report(tmp_path / "other", y, _probs(y, np.ones(30, bool)), images_sha="different")
    with pytest.raises(CompareError, match="different test sets"):
        compare_reports(old, other)
    forced = compare_reports(old, other, force=True, n_boot=50)
    assert forced["forced"] and not forced["paired"]
    with pytest.raises(CompareError, match="not an evaluate output folder"):
        compare_reports(old, tmp_path)


def test_cli_compare_exits_6_on_a_drop(two_reports, tmp_path: Path) -> None:
    old, new, same = two_reports
    res = CliRunner().invoke(
        app, ["report", "compare", str(old), str(new), "--out", str(tmp_path / "c1"), "--n-boot", "100"]
    )
    assert res.exit_code == 6, res.output
    assert "DROP" in res.output
    res = CliRunner().invoke(
        app, ["report", "compare", str(old), str(same), "--out", str(tmp_path / "c2"), "--n-boot", "50"]
    )
    assert res.exit_code == 0, res.output


def _report_dict(k: int) -> dict:
    classes = [f"c{i}" for i in range(k)]
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 200)
    p = rng.dirichlet(np.ones(k), 200)
    m = classification_metrics(y, p, classes)
    return {
        **m,
        "classes": classes,
        "class_names": {c: f"<b>{c}</b> long name" for c in classes},
        "data": {"split": "test"},
    }


@pytest.mark.parametrize("k", [7, 10])
def test_confusion_png_renders_at_7_to_10_classes(k: int, tmp_path: Path) -> None:
    png = confusion_png(_report_dict(k))
    path = tmp_path / "cm.png"
    path.write_bytes(png)
    w, h = Image.open(path).size
    assert w > 2 * h * 0.8 and h >= 500  # two panels side by side, room for full names


def test_html_escapes_clinic_strings(tiny_bundle, colour_data, tmp_path: Path) -> None:
    from dermaclass.config import load_config
    from dermaclass.evaluate.run import evaluate_bundle

    ev = evaluate_bundle(tiny_bundle, colour_data, cfg=load_config(cache_dir=str(tmp_path / "c")), n_boot=10)
    report = ev.report.to_dict()
    report["class_names"]["mel"] = "<script>alert(1)</script>"
    html = render_html(report, confusion=b"x", reliability=b"x", thumbnails={})
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "(too few to judge)" in html  # 3 test images a class: no verdict from them


def test_model_card_from_bundle_and_report(tiny_bundle, colour_data, tmp_path: Path) -> None:
    import shutil

    from dermaclass.config import load_config
    from dermaclass.evaluate.run import evaluate_bundle
    from dermaclass.report import write_report

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    write_report(
        evaluate_bundle(bundle, colour_data, cfg=load_config(cache_dir=str(tmp_path / "c")), n_boot=20),
        bundle / "report",
    )
    data_card = tmp_path / "clinic.md"
    data_card.write_text("# Data card: clinic\n\n## License\n**CC BY 4.0** (the clinic's own images)\n")
    res = CliRunner().invoke(app, ["report", "card", str(bundle), "--name", "tiny", "--data-card", str(data_card)])
    assert res.exit_code == 0, res.output
    card = (bundle / "MODEL_CARD.md").read_text()
    report = json.loads((bundle / "report" / "report.json").read_text())
    # The licence comes from the data card the run names, not from HAM10000.
    assert "Not a medical device" in card and "licence **CC BY 4.0**" in card and "non-commercial" not in card
    assert f"| balanced accuracy (mean sensitivity) | {report['balanced_accuracy']:.3f}" in card
    assert "melanoma (`mel`)" in card and "How to retrain" in card and "(too few to judge)" in card
    assert card.endswith(".\n") or card.endswith("```\n")  # a text file ends with one newline
    assert CliRunner().invoke(app, ["report", "card", str(bundle)]).exit_code == 2  # never overwritten silently


def test_the_model_card_reads_classes_thresholds_and_minimum_size_from_the_bundle(tiny_bundle) -> None:
    """Nothing about the classes or the input size is written into the template: a bundle with
    its operating point on another class and a 32x24 input gets a card that says so."""
    from dermaclass.models import read_bundle_meta
    from dermaclass.report import model_card_markdown

    meta = read_bundle_meta(tiny_bundle)
    op = next(iter(meta.operating_points.values()))
    moved = meta.with_(operating_points={"bkl": {**op, "threshold": 0.25}})
    card = model_card_markdown(moved, None, name="tiny")
    assert "flags possible benign keratosis-like lesion, and says when to refer" in card
    assert "- operating point `bkl`: flag when P(bkl) >= 0.2500" in card and "P(mel)" not in card
    assert min(meta.input_size) < 64 and f"images under {min(meta.input_size)} px on their shorter side refused" in card


def test_a_prior_shift_of_zero_is_reported_as_none(tiny_bundle) -> None:
    from dermaclass.models import read_bundle_meta
    from dermaclass.report import model_card_markdown

    meta = read_bundle_meta(tiny_bundle)
    shift = {"class": "nv", "tau": 0.0, "target_sensitivity": 0.8, "valid_sensitivity": 0.805}
    card = model_card_markdown(meta.with_(calibration={**meta.calibration, "prior_shift": shift}), None, name="t")
    assert "- prior shift: none; `nv` reaches validation sensitivity 0.805 without it (target 0.8)" in card
    assert "tau 0.0" not in card


def test_a_class_with_too_few_test_images_is_never_flagged(tmp_path: Path) -> None:
    """One bkl test image wrong in the new model gave "SENSITIVITY DROP in bkl" and exit 6."""
    y = np.r_[np.zeros(1, int), np.ones(60, int), np.full(60, 2)]
    old = fake_report(tmp_path / "old", y, _probs(y, np.ones(len(y), bool)))
    wrong = np.ones(len(y), bool)
    wrong[0] = False
    new = fake_report(tmp_path / "new", y, _probs(y, wrong))
    result = compare_reports(old, new, n_boot=100)
    assert result["per_class"]["bkl"]["sensitivity"]["delta"] == -1.0
    assert result["sensitivity_drops"] == [] and result["too_few_to_judge"] == ["bkl"]
    html = write_compare(result, tmp_path / "cmp")["html"].read_text()
    assert "too few test images to judge" in html


def test_the_difference_map_colours_a_new_confusion_as_worse() -> None:
    from dermaclass.report.figures import improvement

    diff = np.array([[-0.2, 0.2], [0.0, 0.0]])  # class 0 lost recall to a new confusion with class 1
    good = improvement(diff)
    assert good[0, 0] < 0 and good[0, 1] < 0  # both red: the off-diagonal rise is not painted blue
    assert improvement(-diff)[0, 1] > 0


def test_a_published_report_without_predictions_says_how_to_recreate_it(two_reports) -> None:
    old, new, _ = two_reports
    (old / "predictions.csv").unlink()
    with pytest.raises(CompareError, match="published without predictions.csv .*`dermaclass evaluate"):
        compare_reports(old, new, n_boot=10)

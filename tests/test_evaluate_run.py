"""A bundle evaluated on a labelled split: files, identity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import noise_image

from dermaclass import models
from dermaclass.config import load_config
from dermaclass.evaluate.record import Report, read_report
from dermaclass.evaluate.run import EvaluationError, evaluate_bundle, select_split
from dermaclass.report import write_report


def _cfg(tmp_path: Path):
    return load_config(cache_dir=str(tmp_path / "cache"))


def test_evaluate_test_split_writes_all_files(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    ev = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=50)
    split = pd.read_csv(tiny_bundle / "split.csv")
    test_images = set(split.loc[split["split"] == "test", "image"])
    assert set(ev.predictions["image"]) == test_images  # exactly the images training never saw
    r = ev.report
    assert r.n == len(test_images) and r.data["split"] == "test"
    assert 0 <= r.balanced_accuracy <= 1 and len(r.model["weights_sha256"]) == 64
    probs = ev.predictions[[f"p_{c}" for c in r.classes]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-5
    paths = write_report(ev, tmp_path / "out")
    for name in ("predictions.csv", "report.json", "report.html", "confusion_matrix.png"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name
    saved = json.loads(paths["report.json"].read_text())
    assert saved["balanced_accuracy"] == r.balanced_accuracy and Report.from_dict(saved) == r
    html = paths["report.html"].read_text()
    assert "not a diagnostic device" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained, offline
    with pytest.raises(FileExistsError):
        write_report(ev, tmp_path / "out")


def test_evaluate_without_tta_reads_the_decode_cache(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    # one forward path: chunks of a decode-cache view (which has no slices), with and without TTA
    a = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=10, tta=False).report
    b = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=10, tta=True).report
    assert a.tta is None and b.tta == "flips4" and a.n == b.n > 0


def test_same_images_give_the_same_identity(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    a = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=10).report
    b = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=10, split="valid").report
    c = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=10).report
    assert a.data["images_sha256"] == c.data["images_sha256"] != b.data["images_sha256"]


def test_unknown_labels_are_listed(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(colour_data, data)
    (data / "bcc").mkdir()
    noise_image(99).save(data / "bcc" / "x.png")
    (data / "nv" / "0.png").rename(data / "bcc" / "y.png")
    with pytest.raises(EvaluationError, match=r"labels the model does not know: 'bcc' \(2 images\)"):
        evaluate_bundle(tiny_bundle, data, cfg=_cfg(tmp_path), split="all", n_boot=10)


def test_missing_split_file_is_a_clear_error(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="no split file"):
        evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), split_file=tmp_path / "nope.csv", n_boot=10)


def test_select_split_counts() -> None:
    items = pd.DataFrame({"image": ["a", "b", "c", "new"]})
    split = pd.DataFrame({"image": ["a", "b", "c", "gone"], "split": ["test", "train", "test", "test"]})
    chosen, counts = select_split(items, split, "test", source="x")
    assert chosen["image"].tolist() == ["a", "c"]
    assert counts == {"evaluated": 2, "listed_in_split": 3, "listed_but_missing": 1, "not_in_split_file": 1}
    with pytest.raises(EvaluationError, match="no image of the data"):
        select_split(items, split.assign(split="train"), "test", source="x")


def test_cli_evaluate(tiny_bundle: Path, colour_data: Path, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from dermaclass.cli import app

    monkeypatch.setenv("DERMACLASS_CACHE", str(tmp_path / "cache"))
    args = ["evaluate", str(tiny_bundle), str(colour_data), "--out", str(tmp_path / "rep"), "--n-boot", "20"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "balanced accuracy" in res.output and (tmp_path / "rep" / "report.html").is_file()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(app, [*args[:4], str(tmp_path / "rep2"), "--split", "nope"])
    assert res.exit_code == 2


def test_report_without_thumbnails_lists_ids_only(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    ev = evaluate_bundle(tiny_bundle, colour_data, cfg=_cfg(tmp_path), n_boot=10, split="all", thumbnails=False)
    paths = write_report(ev, tmp_path / "pub")
    html = paths["report.html"].read_text()
    # The confusion matrix, the reliability diagram and the operating point's trade-off only.
    assert "tradeoff.png" in paths and html.count("data:image/png;base64,") == 3
    # No listed error only when there is no error at all; otherwise the worst is named by id.
    assert ev.report.worst_errors or ev.report.metrics["accuracy"] == 1.0
    if ev.report.worst_errors:
        assert ev.report.worst_errors[0]["image"] in html and "ours to publish" in html


def test_cli_evaluate_with_external_sets(tiny_bundle: Path, colour_data: Path, tmp_path: Path, monkeypatch) -> None:
    import json
    import shutil

    from typer.testing import CliRunner

    from dermaclass.cli import app
    from dermaclass.report.card import model_card_markdown

    monkeypatch.setenv("DERMACLASS_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other_clinic"  # two of the three classes, as derm7pt lacks akiec
    for c in ("mel", "nv"):
        shutil.copytree(colour_data / c, other / c)
    out = tmp_path / "rep"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tiny_bundle),
            str(colour_data),
            "--out",
            str(out),
            "--n-boot",
            "20",
            "--external",
            f"clinic_b={other}",
            "--tta",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "external clinic_b: 40 images" in res.output
    report = json.loads((out / "report.json").read_text())
    ext = report["external"]["clinic_b"]
    assert report["tta"] == "flips4" and ext["tta"] == "flips4" and ext["n"] == 40
    assert ext["per_class"]["bkl"]["support"] == 0 and ext["per_class"]["bkl"]["sensitivity"] is None
    present = [ext["per_class"][c]["sensitivity"] for c in ("mel", "nv")]
    assert abs(ext["balanced_accuracy"] - sum(present) / 2) < 1e-9  # the mean over the classes the set has
    assert len(ext["intervals"]["balanced_accuracy"]) == 2
    html = (out / "report.html").read_text()
    assert "External validation" in html and "clinic_b" in html
    card = model_card_markdown(models.read_bundle_meta(tiny_bundle), read_report(out), name="tiny")
    assert "## External validation" in card and "| clinic_b | 40 |" in card
    # A clinic's own data and a tiny random-init network: the card says so, and nothing about HAM10000.
    assert "HAM10000" not in card and "Vienna" not in card and "CC BY-NC" not in card
    assert "trained from random initialisation" in card and "licence not recorded" in card
    assert "one-cycle fit" in card and "seed 001" not in card
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tiny_bundle),
            str(colour_data),
            "--out",
            str(tmp_path / "r2"),
            "--external",
            str(tmp_path / "nowhere"),
        ],
    )
    assert res.exit_code == 3 and "nowhere" in res.output and not (tmp_path / "r2").exists()

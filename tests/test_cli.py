"""The command line: versions, reports, exit codes, and no tracebacks for user mistakes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import save_image
from typer.testing import CliRunner

from dermaclass import __version__
from dermaclass.cli import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(app, ["data", "validate", "--help"])
    assert result.exit_code == 0 and "Exit codes" in result.output and "--strict" in result.output


def test_python_dash_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "dermaclass", "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == f"dermaclass {__version__}"


def test_validate_json_names_each_problem_and_strict_fails(folder_dataset: Path) -> None:
    (folder_dataset / "acne" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    save_image(folder_dataset / "acnee" / "x.jpg", seed=777)  # a typo'd class folder
    (folder_dataset / "acne" / "x.txt").write_text("note")
    shutil.copy(folder_dataset / "crust" / "crust_03.jpg", folder_dataset / "ulcer" / "dup.jpg")
    names = folder_dataset.parent / "names.csv"
    names.write_text("acne,Acne\ncrust,Crust\nulcer,Ulcer\n")
    args = ["data", "validate", str(folder_dataset), "--class-names", str(names)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    named = {(p["kind"], p["file"]) for p in report["problems"]["list"]}
    assert ("not_image", "acne/broken.jpg") in named
    assert ("unknown_label", "acnee/x.jpg") in named
    assert ("duplicate_conflict", "ulcer/dup.jpg") in named and ("duplicate_conflict", "crust/crust_03.jpg") in named
    assert report["images"] == 35 and report["classes"] == 3
    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == 1
    assert "acne/broken.jpg" in strict.output


def test_clean_data_passes_strict(manifest_dataset: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(manifest_dataset), "--strict"])
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output


def test_missing_folder_is_one_line_exit_3(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(tmp_path / "nope")])
    assert result.exit_code == 3
    assert "no such folder" in result.output and "Traceback" not in result.output


def test_bad_config_exit_2(tmp_path: Path, manifest_dataset: Path) -> None:
    (tmp_path / "c.yaml").write_text("sead: 1\n")
    result = runner.invoke(app, ["data", "validate", str(manifest_dataset), "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "did you mean 'seed'" in result.output


def test_split_writes_refuses_overwrite_and_extends(manifest_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.csv"
    result = runner.invoke(
        app, ["data", "split", str(manifest_dataset), "--out", str(out), "--fractions", "0.6,0.2,0.2"]
    )
    assert result.exit_code == 0, result.output
    split = pd.read_csv(out)
    assert list(split.columns) == ["image", "label", "group", "split", "hash"] and len(split) == 45
    assert "groups in more than one split: 0" in result.output
    again = runner.invoke(app, ["data", "split", str(manifest_dataset), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    # new images arrive: extend the split in place, old rows unchanged
    for i in range(4):
        save_image(manifest_dataset / "images" / f"NEW_{i}.jpg", seed=900 + i)
    meta = pd.read_csv(manifest_dataset / "metadata.csv")
    new = pd.DataFrame(
        {
            "lesion_id": [f"LN{i}" for i in range(4)],
            "image_id": [f"NEW_{i}" for i in range(4)],
            "dx": ["mel", "nv", "bkl", "mel"],
            "age": 40,
        }
    )
    pd.concat([meta, new]).to_csv(manifest_dataset / "metadata.csv", index=False)
    result = runner.invoke(app, ["data", "split", str(manifest_dataset), "--out", str(out), "--split-file", str(out)])
    assert result.exit_code == 0, result.output
    extended = pd.read_csv(out)
    assert len(extended) == 49
    assert extended.iloc[:45].equals(split)


def test_card_prints_markdown(manifest_dataset: Path, tmp_path: Path) -> None:
    runner.invoke(app, ["data", "split", str(manifest_dataset), "--out", str(tmp_path / "s.csv")])
    result = runner.invoke(app, ["data", "card", str(manifest_dataset), "--split-file", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("## Statistics")
    assert "| mel | melanoma | 15 | 10 |" in result.output
    assert "| total |" in result.output


def test_predict_command(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    import json as _json

    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(colour_data / "mel" / "0.png"), "--model", str(tiny_bundle), "--json"])
    assert res.exit_code == 0, res.output
    first = _json.loads(res.output)
    assert first["top"] in ("bkl", "mel", "nv") and abs(sum(first["probabilities"].values()) - 1) < 1e-4
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"x")
    res = runner.invoke(app, ["predict", str(colour_data / "nv" / "0.png"), str(bad), "--model", str(tiny_bundle)])
    assert res.exit_code == 3 and "bad.jpg" in res.output and "not a diagnostic device" in res.output
    # An image too small to judge is refused by name; the others are still predicted.
    from PIL import Image

    dot = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(dot)
    res = runner.invoke(app, ["predict", str(dot), str(colour_data / "nv" / "0.png"), "--model", str(tiny_bundle)])
    text = " ".join(res.output.split())  # Rich wraps long lines
    assert res.exit_code == 3 and "dot.png: too small to judge" in text and "0.png:" in text


def test_fit_ood_command(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    import json as _json
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    runner = CliRunner()
    res = runner.invoke(app, ["fit-ood", str(bundle), str(colour_data), "--ood", "odin"])
    assert res.exit_code == 2 and "ood='odin' is not a valid choice" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["fit-ood", str(bundle), str(colour_data)])
    assert res.exit_code != 0 and "already has a fitted out-of-distribution score" in " ".join(res.output.split())
    res = runner.invoke(app, ["fit-ood", str(bundle), str(colour_data), "--ood", "knn", "--force"])
    assert res.exit_code == 0 and "knn score, cut-off" in " ".join(res.output.split()), res.output
    assert _json.loads((bundle / "model.json").read_text())["calibration"]["refer"]["ood"]["method"] == "knn"


def test_calibrate_command_keeps_the_bundles_settings_unless_given(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    import json as _json
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("checkpoints", "*.onnx"))
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", str(bundle), str(colour_data)])
    assert res.exit_code != 0 and "already calibrated" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["calibrate", str(bundle), str(colour_data), "--force", "--prior-sensitivity", "0.85"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "prior shift: tau" in text and "referral rule refers" in text, res.output
    res = runner.invoke(app, ["calibrate", str(bundle), str(colour_data), "--force", "--target-sensitivity", "0.8"])
    meta = _json.loads((bundle / "model.json").read_text())
    assert res.exit_code == 0 and meta["config"]["prior_sensitivity"] == 0.85  # kept: not given again
    assert meta["operating_points"]["mel"]["target_sensitivity"] == 0.8 and "prior_shift" in meta["calibration"]


def test_export_and_missing_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    res = CliRunner().invoke(app, ["export", str(bundle), "--onnx"])
    assert res.exit_code == 0 and (bundle / "model.onnx").is_file(), res.output
    res = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nowhere")])
    assert res.exit_code == 4 and "no model bundle" in res.output


def test_predict_text_keeps_the_melanoma_flag_and_help_keeps_defaults(tiny_bundle: Path, colour_data: Path) -> None:
    """Rich read "[mel flagged]" and "[default: ...]" as markup and deleted them."""
    import json as _json

    runner = CliRunner()
    flagged = None
    for path in sorted((colour_data / "mel").glob("*.png")):
        r = _json.loads(runner.invoke(app, ["predict", str(path), "--model", str(tiny_bundle), "--json"]).output)
        if r["flags"]["mel"]["flagged"]:
            flagged = path
            break
    assert flagged is not None
    res = runner.invoke(app, ["predict", str(flagged), "--model", str(tiny_bundle)])
    assert res.exit_code == 0 and "[mel flagged: P " in res.output
    res = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert "[default: the bundled model]" in res.output


def test_importing_the_trainer_prints_no_foreign_warnings() -> None:
    """fastai's torch.jit.script FutureWarning (and a pandas option warning) appeared on every command."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import dermaclass.train"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "jit.script" not in res.stderr and "chained_assignment" not in res.stderr


def test_piped_validate_output_keeps_whole_file_names(folder_dataset: Path) -> None:
    long = "a_very_long_file_name_from_the_clinic_export_" * 3 + "broken.jpg"
    (folder_dataset / "acne" / long).write_bytes(b"\xff\xd8\xff garbage")
    result = runner.invoke(app, ["data", "validate", str(folder_dataset)])  # CliRunner: not a terminal
    assert result.exit_code == 0 and f"acne/{long}" in result.output


def test_the_cli_and_predict_do_not_import_gradio() -> None:
    """`dermaclass predict` on a clinic workstation must not pay for (or depend on) the web stack."""
    import subprocess
    import sys

    code = (
        "import sys; import dermaclass.cli, dermaclass.serving.predictor, dermaclass.serving.refer; "
        "sys.exit(1 if 'gradio' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_bad_schedule_flag_exits_2_before_the_data_is_read(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "run"), "--cycle-mult", "1"]
    )
    assert res.exit_code == 2 and "cycle_mult=1: must be at least 2" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command",
    [["train"], ["lr-find"], ["evaluate"], ["fit-ood"], ["data", "validate"], ["data", "split"], ["data", "card"]],
)
def test_every_command_that_reads_a_dataset_takes_the_same_data_options(command: list[str]) -> None:
    """Declared once (cli.DATA_OPTIONS): lr-find once lacked --image-col, --label-col, --group-col and --workers."""
    text = CliRunner().invoke(app, [*command, "--help"], terminal_width=200).output
    for flag in ("--config", "--manifest", "--image-col", "--label-col", "--group-col", "--class-names", "--workers"):
        assert flag in text, (command, flag)


def test_train_flags_come_from_the_config_with_its_defaults() -> None:
    from dermaclass.cli.training import TRAIN_FLAGS
    from dermaclass.config import Config

    text = " ".join(CliRunner().invoke(app, ["train", "--help"]).output.split())
    for name in TRAIN_FLAGS:
        flag = {"init_bundle": "--from"}.get(name, "--" + name.replace("_", "-"))
        assert flag in text, flag
    # the defaults in force, read from Config (a hand-written "[default: none]" had drifted here)
    assert (
        f"Colour normalisation, the same at training and inference: none | shades-of-gray [default: {Config().colour_constancy}]"
        in text
    )
    assert "--batch-size <int> b (stepwise: b, 2b, 3b, 4b, b) [default: 32]" in text


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_export_openvino_then_predict_says_which_backend_served(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(bundle), "--int8"])
    assert res.exit_code == 2 and "--int8 needs --calibration" in " ".join(res.output.split())
    res = runner.invoke(app, ["export", str(bundle), "--openvino"])
    assert res.exit_code == 0 and (bundle / "model.xml").is_file() and not (bundle / "model.onnx").exists(), res.output
    image = str(next((colour_data / "mel").iterdir()))
    res = runner.invoke(app, ["predict", image, "--model", str(bundle), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["backend"] == "openvino", res.output
    res = runner.invoke(app, ["predict", image, "--model", str(bundle), "--backend", "torch"])
    assert res.exit_code == 0 and "served by torch with flip TTA (flips4)" in " ".join(res.output.split()), res.output

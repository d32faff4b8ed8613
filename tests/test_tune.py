"""tune: the search space, the study (SQLite), pruning, failures, best.yaml, the report, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_TRAIN_FLAGS, tiny_config
from typer.testing import CliRunner

from dermaclass import tune as T
from dermaclass.cli import app
from dermaclass.config import load_config
from dermaclass.errors import ConfigError, StudyError, TrainingError
from dermaclass.models import read_bundle_meta

optuna = pytest.importorskip("optuna")

#: A space that trains the tiny network in seconds: the LR and one or two epochs.
TINY_SPACE = {"lr": T.Param("float", 1e-3, 3e-2, log=True), "epochs": T.Param("int", 1, 2)}


def test_the_space_is_checked_before_any_trial() -> None:
    T.check_space(T.SPACE)
    with pytest.raises(ConfigError, match=r"unknown parameter 'l_r'; did you mean 'lr'"):
        T.resolve_space(overrides={"l_r": {"low": 1e-3, "high": 1e-2}})
    with pytest.raises(ConfigError, match=r"lr: empty range \[0.1, 0.01\]"):
        T.resolve_space(overrides={"lr": {"low": 0.1, "high": 0.01}})
    with pytest.raises(ConfigError, match="augment has no choices"):
        T.resolve_space(overrides={"augment": {"choices": []}})
    with pytest.raises(ConfigError, match=r"augment='sepia' is not a valid setting"):
        T.resolve_space(overrides={"augment": {"choices": ["basic", "sepia"]}})
    with pytest.raises(ConfigError, match="unknown keys"):
        T.resolve_space(overrides={"lr": {"lo": 1e-3}})
    with pytest.raises(ConfigError, match="--budget"):
        T.resolve_space(budget="overnight")


def test_budget_fixed_flags_and_conditions() -> None:
    short, full = T.resolve_space(budget="short"), T.resolve_space(budget="full")
    assert (short["n_cycles"].low, short["n_cycles"].high) == (1, 1) and full["n_cycles"].high == 3
    fixed = T.resolve_space(fixed=["arch", "recipe", "lr"])
    assert "lr" not in fixed and "recipe" not in fixed
    # n_cycles applies to the fixed recipe's value: searched for sgdr, not for baseline
    one = optuna.trial.FixedTrial({"n_cycles": 1, "epochs": 2})
    assert T.sample(one, {k: fixed[k] for k in ("n_cycles", "epochs")}, load_config(recipe="baseline")) == {"epochs": 2}
    # define-by-run: a conditional parameter is sampled only when it applies
    base = load_config(recipe="sgdr")
    trial = optuna.trial.FixedTrial({"lr": 0.01, "n_cycles": 2, "epochs": 3})
    assert T.sample(trial, {k: T.SPACE[k] for k in ("lr", "n_cycles", "epochs")}, base) == {"lr": 0.01, "n_cycles": 2}
    assert T.trial_config(base, {"image_size": "160x120"}).image_size == (160, 120)


def test_a_space_file_overrides_ranges(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 0.002, high: 0.02, log: true}\nrecipe: {choices: [sgdr, stepwise]}\n")
    space = T.resolve_space(overrides=T.load_space(path), source=str(path))
    assert (space["lr"].low, space["lr"].high) == (0.002, 0.02) and space["recipe"].choices == ("sgdr", "stepwise")
    path.write_text("- lr\n")
    with pytest.raises(ConfigError, match="expected"):
        T.load_space(path)


def test_a_study_runs_writes_best_yaml_and_its_report(colour_data: Path, tmp_path: Path) -> None:
    base = tiny_config(tmp_path)
    result = T.tune(base, [colour_data], tmp_path / "study", trials=3, space=TINY_SPACE, pruner="median")
    assert result.trials == 3 and result.complete + result.pruned + result.failed == 3 and result.complete >= 1
    assert (tmp_path / "study" / T.STUDY_DB).is_file() and (tmp_path / "study" / "split.csv").is_file()
    # every trial is an ordinary run on the study's one split
    runs = sorted((tmp_path / "study" / T.TRIALS_DIR).iterdir())
    assert len(runs) == 3 and all(
        (r / "split.csv").read_text() == runs[0].joinpath("split.csv").read_text() for r in runs
    )
    best = load_config(result.best_yaml)  # what `dermaclass train --config best.yaml` reads
    assert best.lr == pytest.approx(result.best_params["lr"]) and best.epochs == result.best_params["epochs"]
    assert best.split_file == str(tmp_path / "study" / "split.csv")
    assert {"trials", "top", "history"} <= set(result.report) and result.report["history"].stat().st_size > 0
    assert "| trial | valid balanced accuracy (served) | best epoch, raw" in result.report["top"].read_text()
    # the trial's value is the served bundle's; the pruner's best raw epoch is kept beside it
    study = T.open_study(tmp_path / "study", storage=None, sampler=None, pruner=None, resume=True, force=False)
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert t.user_attrs["valid_raw_best"] == max(t.intermediate_values.values())
        assert t.value == pytest.approx(read_bundle_meta(t.user_attrs["run"]).metrics_valid["balanced_accuracy"])
    with pytest.raises(FileExistsError, match="--resume continues it"):  # never started over silently
        T.tune(base, [colour_data], tmp_path / "study", trials=3, space=TINY_SPACE)
    more = T.tune(base, [colour_data], tmp_path / "study", trials=4, space=TINY_SPACE, resume=True)
    assert more.trials == 4


def test_a_failing_trial_is_recorded_and_the_study_goes_on(
    colour_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dermaclass.train as training

    real, calls = training.train, []

    def flaky(cfg, data, run_dir, **kw):  # noqa: ANN001, ANN003
        calls.append(run_dir)
        if len(calls) == 1:
            raise TrainingError("2 training images are too few for the baseline recipe")
        return real(cfg, data, run_dir, **kw)

    monkeypatch.setattr(training, "train", flaky)
    result = T.tune(tiny_config(tmp_path), [colour_data], tmp_path / "s", trials=2, space=TINY_SPACE, pruner="none")
    study = T.open_study(tmp_path / "s", storage=None, sampler=None, pruner=None, resume=True, force=False)
    first = study.trials[0]
    assert result.failed == 1 and result.complete == 1 and first.state.name == "FAIL"
    assert "too few" in first.user_attrs["error"]


def test_pruning_reports_every_epoch(colour_data: Path, tmp_path: Path) -> None:
    """A pruner that stops every trial after its first report: the trial ends PRUNED, not failed."""

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:  # noqa: ANN001
            return True

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(T.study, "make_pruner", lambda name: Always())  # where tune() looks it up
    try:
        result = T.tune(tiny_config(tmp_path), [colour_data], tmp_path / "p", trials=1, space=TINY_SPACE)
    finally:
        monkeypatch.undo()
    assert result.pruned == 1 and result.best_yaml is None
    study = T.open_study(tmp_path / "p", storage=None, sampler=None, pruner=None, resume=True, force=False)
    assert list(study.trials[0].intermediate_values) == [1]  # the first epoch's score, then pruned


def test_a_corrupt_or_foreign_database_is_a_clear_error(colour_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / T.STUDY_DB).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StudyError, match=r"cannot open the study database"):
        T.tune(tiny_config(tmp_path), [colour_data], out, trials=1, space=TINY_SPACE, resume=True)


def test_cli_refuses_a_bad_space_before_any_trial(colour_data: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {low: 0.001, high: 0.01}\n")
    res = CliRunner().invoke(app, ["tune", str(colour_data), "--out", str(tmp_path / "s"), "--space", str(space)])
    assert res.exit_code == 2 and "unknown parameter 'learning_rate'" in res.output
    assert not (tmp_path / "s").exists()


def test_a_killed_study_resumes(colour_data: Path, tmp_path: Path) -> None:
    """SIGKILL inside a trial, then --resume: the interrupted trial fails as interrupted and runs
    again, and the study ends with the trials asked for."""
    out = tmp_path / "study"
    space = tmp_path / "space.yaml"
    space.write_text("epochs: {low: 3, high: 3}\n")
    flags = [*TINY_TRAIN_FLAGS, "--recipe", "baseline", "--colour-constancy", "none"]
    only = ["--space", str(space), "--pruner", "none", "--trials", "2"]
    fixed = [
        "--lr", "0.01", "--lr-ratio", "100", "--wd", "0.01", "--head-epochs", "0", "--augment", "basic",
        "--imbalance", "sampler", "--label-smoothing", "0",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "dermaclass", "tune", str(colour_data), "--out", str(out), *flags, *fixed, *only]
    env = {**os.environ, "DERMACLASS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / T.TRIALS_DIR / "0001" / "progress.json"
    deadline = time.time() + 180
    try:  # kill it inside the second trial, after one of its epochs
        while time.time() < deadline and proc.poll() is None:
            if progress.is_file() and json.loads(progress.read_text())["history_rows"] >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    study = T.open_study(out, storage=None, sampler=None, pruner=None, resume=True, force=False)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"] and study.trials[2].user_attrs["retry_of"] == 1
    assert T.counted(study) == 2 and (out / "best.yaml").is_file()
    assert "2 complete, 0 pruned, 0 failed" in res.stdout

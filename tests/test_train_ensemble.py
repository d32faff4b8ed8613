"""Cross-fitted deep ensembles (train/ensemble.py) end to end on tiny generated images, and
the ensemble bundle as the Predictor serves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import train_command
from typer.testing import CliRunner

from dermaclass import models, schedules
from dermaclass.config import load_config
from dermaclass.data.splits import cross_folds
from dermaclass.errors import ConfigError, TrainingError
from dermaclass.models import ModelError
from dermaclass.serving.combine import combine
from dermaclass.serving.predictor import Predictor
from dermaclass.train import prepare_data, train_ensemble

TINY = dict(
    image_size="32,24",
    batch_size=8,
    arch="test_resnet",
    pretrained=False,
    head_epochs=0,
    epochs=2,
    recipe="baseline",
    lr=1e-2,
    colour_constancy="none",
)


def _cfg(tmp_path: Path, **kw):
    return load_config(**{**TINY, "cache_dir": str(tmp_path / "cache"), **kw})


@pytest.fixture
def ensemble(tiny_ensemble: Path) -> Path:
    return tiny_ensemble


def test_member_plan_and_member_specs() -> None:
    plan = schedules.member_plan(
        3, arch="a", image_size=(128, 96), seed=42, member_archs=("tf_efficientnet_lite1@160x120", "@96x72")
    )
    assert [(m.name, m.fold, m.seed, m.arch, m.image_size) for m in plan] == [
        ("m0", 0, 42, "tf_efficientnet_lite1", (160, 120)),
        ("m1", 1, 43, "a", (96, 72)),
        ("m2", 2, 44, "tf_efficientnet_lite1", (160, 120)),
    ]
    assert schedules.member_plan(2, arch="a", image_size=(32, 24), seed=0)[1].image_size == (32, 24)
    with pytest.raises(ValueError, match="ARCH@WIDTHxHEIGHT"):
        schedules.parse_member("tf_efficientnet_lite1")
    with pytest.raises(ConfigError, match="member_archs"):
        load_config(member_archs="lite@12x9")
    with pytest.raises(ConfigError, match="members"):
        load_config(members=0)


def test_cross_folds_keep_lesions_together_and_classes_spread() -> None:
    items = pd.DataFrame({"label": ["a"] * 40 + ["b"] * 20, "group": [f"g{i // 2}" for i in range(60)]})
    folds = cross_folds(items, 4, seed=0)
    assert set(folds) == {0, 1, 2, 3}
    assert (items.assign(fold=folds).groupby("group")["fold"].nunique() == 1).all()
    for k in range(4):
        assert (items["label"][folds == k] == "b").sum() >= 4  # every fold has the rare class
    assert (cross_folds(items, 4, seed=0) == folds).all()  # a pure function of its inputs


def test_ensemble_bundle_lists_members_and_serves_their_mean(ensemble: Path, colour_data: Path) -> None:
    meta = json.loads((ensemble / "model.json").read_text())
    assert meta["arch"] == "ensemble" and meta["ensemble"]["k"] == 2 and not (ensemble / "model.safetensors").exists()
    assert [m["path"] for m in meta["members"]] == ["members/m0", "members/m1"]
    assert [m["fold"] for m in meta["members"]] == [0, 1] and [m["seed"] for m in meta["members"]] == [42, 43]
    assert "out-of-fold" in meta["calibration"]["fitted_on"]
    assert meta["calibration"]["refer"]["ood"]["method"] == "members"
    assert meta["calibration"]["refer"]["min_top_probability"] == 0.5
    split = pd.read_csv(ensemble / "split.csv")
    pool = split[split["split"] != "test"]
    # Each member held out its own fold, which covers the pool with the test split untouched.
    assert set(pool["fold"]) == {0, 1} and (split.loc[split["split"] == "test", "fold"] == -1).all()
    assert (pool.groupby("group")["fold"].nunique() == 1).all()
    for k in (0, 1):
        member_split = pd.read_csv(ensemble / "members" / f"m{k}" / "split.csv")
        valid = set(member_split.loc[member_split["split"] == "valid", "image"])
        assert valid == set(pool.loc[pool["fold"] == k, "image"])
        assert set(member_split.loc[member_split["split"] == "test", "image"]) == set(
            split.loc[split["split"] == "test", "image"]
        )
    # n = the whole pool: calibration was fitted on every out-of-fold prediction.
    assert meta["calibration"]["n"] == len(pool)
    oof = pd.read_csv(ensemble / "out_of_fold.csv")
    assert sorted(oof["image"]) == sorted(pool["image"]) and np.allclose(
        oof.filter(like="p_").sum(axis=1), 1, atol=1e-4
    )

    pred = Predictor(ensemble)
    assert len(pred.networks) == 2 and pred.input_size == (32, 24)
    images = [pred.preprocess(p) for p in sorted((colour_data / "mel").glob("*.png"))[:4]]
    members = [Predictor(ensemble / "members" / f"m{k}") for k in (0, 1)]
    assert pred.combine_rule == meta["ensemble"]["combine"] == "mean of logits"  # the default
    expected = combine([m.logits(images) for m in members])
    assert np.allclose(pred.logits(images), expected, atol=1e-5)
    result = pred.predict(colour_data / "mel" / "0.png")
    assert result["networks"] == 2 and len(result["agreement"]["member_top"]) == 2
    assert 0 <= result["agreement"]["share"] <= 1 and np.isfinite(result["ood_score"])
    heat, overlay = pred.gradcam(colour_data / "mel" / "0.png")
    assert heat.shape == (24, 32) and overlay.shape == (24, 32, 3)
    with pytest.raises(ModelError, match="ensemble of 2 networks"):
        models.load_bundle(ensemble)


def test_predict_says_an_ensemble_answered_and_when_its_networks_disagree(
    ensemble: Path, colour_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dermaclass.cli import app
    from dermaclass.serving import predictor

    image = str(colour_data / "mel" / "0.png")
    res = CliRunner().invoke(app, ["predict", image, "--model", str(ensemble)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "answered by an ensemble of 2 networks" in res.output, res.output
    split = {"member_top": ["mel", "nv"], "share": 0.5, "disagree": True, "member_probability": [0.7, 0.2]}
    monkeypatch.setattr(predictor, "agreement", lambda *a, **k: split)
    res = CliRunner().invoke(app, ["predict", image, "--model", str(ensemble)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "networks disagree: mel, nv" in res.output, res.output


def test_a_swapped_or_missing_member_is_refused(ensemble: Path, tmp_path: Path) -> None:
    swapped = tmp_path / "swapped"
    shutil.copytree(ensemble, swapped)
    shutil.rmtree(swapped / "members" / "m1")
    shutil.copytree(ensemble / "members" / "m0", swapped / "members" / "m1")
    with pytest.raises(ModelError, match="members/m1: not the network"):
        Predictor(swapped)
    shutil.rmtree(swapped / "members" / "m1")
    with pytest.raises(ModelError, match="member members/m1 of the ensemble .* is missing"):
        Predictor(swapped)
    meta = json.loads((ensemble / "model.json").read_text())
    meta["members"][1]["path"] = "../elsewhere"
    (swapped / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"members\[1\].path"):
        Predictor(swapped)


def test_a_stopped_ensemble_resumes_at_the_member_it_stopped(ensemble: Path, colour_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(ensemble, run)
    kept = (run / "members" / "m0" / "model.safetensors").stat().st_mtime_ns
    for name in ("model.json", "model.safetensors"):  # member 1 never finished
        (run / "members" / "m1" / name).unlink()
    (run / "model.json").unlink()
    cfg = load_config(run / "config.yaml", split_file=str(run / "split.csv"))
    train_ensemble(cfg, prepare_data(cfg, colour_data), run, resume=True)
    assert (run / "members" / "m0" / "model.safetensors").stat().st_mtime_ns == kept  # not retrained
    assert (run / "members" / "m1" / "model.safetensors").is_file()
    meta = json.loads((run / "model.json").read_text())
    assert meta["resumed"] is True
    before = pd.read_csv(ensemble / "split.csv")
    assert (pd.read_csv(run / "split.csv")["fold"] == before["fold"]).all()  # the same folds
    with pytest.raises(FileExistsError):
        train_ensemble(cfg, prepare_data(cfg, colour_data), run)  # never overwritten silently


def test_cli_trains_mixed_size_members_and_evaluates_them(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.cli import app

    run = tmp_path / "mixed"
    env = {"DERMACLASS_CACHE": str(tmp_path / "cache")}
    args = [
        "train",
        str(colour_data),
        "--out",
        str(run),
        "--recipe",
        "baseline",
        "--arch",
        "test_resnet",
        "--no-pretrained",
        "--image-size",
        "32,24",
        "--batch-size",
        "8",
        "--head-epochs",
        "0",
        "--epochs",
        "1",
        "--lr",
        "1e-2",
        "--colour-constancy",
        "none",
        "--threads",
        "1",
        "--members",
        "2",
        "--member-archs",
        "@32x24,@40x30",
    ]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "member m1: test_resnet at 40x30" in result.output and "out-of-fold balanced accuracy" in result.output
    pred = Predictor(run)
    assert pred.input_sizes == [(32, 24), (40, 30)] and pred.input_size == (40, 30)
    image = pred.preprocess(colour_data / "nv" / "1.png")
    both = pred.preprocess_all(colour_data / "nv" / "1.png")
    # A caller with images at one size gets each member's own size by resizing.
    assert pred.logits([image]).shape == (1, 3) and pred.logits({s: [v] for s, v in both.items()}).shape == (1, 3)
    with pytest.raises(ValueError, match="no images at 32x24"):
        pred.logits({(40, 30): [image]})
    report = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(run),
            str(colour_data),
            "--out",
            str(report),
            "--split",
            "all",
            "--n-boot",
            "10",
            "--no-thumbnails",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    rep = json.loads((report / "report.json").read_text())
    assert rep["model"]["networks"] == 2 and len(rep["model"]["weights_sha256"]) == 64
    # The melanoma point's trade-off on the out-of-fold predictions it was fitted on and on this split.
    mel = rep["operating_points"]["mel"]
    assert mel["fitted_curve"]["sensitivity"][-1] == 1 and mel["curve"]["specificity"][0] == 1
    assert (report / "tradeoff.png").is_file() and "the trade-off" in (report / "report.html").read_text()


def test_retrain_continues_each_member_and_compares_with_the_parent(
    tiny_ensemble: Path, colour_data: Path, tmp_path: Path, monkeypatch
) -> None:
    from dermaclass.retrain import retrain

    monkeypatch.setenv("DERMACLASS_CACHE", str(tmp_path / "cache"))
    done = retrain(tiny_ensemble, [colour_data], tmp_path / "new", n_boot=10)
    meta = json.loads((tmp_path / "new" / "model.json").read_text())
    assert meta["arch"] == "ensemble" and len(meta["members"]) == 2
    assert meta["parent"]["bundle"] == str(tiny_ensemble) and len(meta["parent"]["weights_sha256"]) == 64
    for k in (0, 1):  # member k started from the parent's member k
        member = json.loads((tmp_path / "new" / "members" / f"m{k}" / "model.json").read_text())
        assert member["parent"]["bundle"] == str(tiny_ensemble / "members" / f"m{k}")
    # The parent's test split is the yardstick: the new split keeps it.
    old, new = (pd.read_csv(p / "split.csv") for p in (tiny_ensemble, tmp_path / "new"))
    assert set(new.loc[new["split"] == "test", "image"]) == set(old.loc[old["split"] == "test", "image"])
    assert "balanced_accuracy" in done.comparison["overall"]


def test_report_compare_puts_an_ensemble_beside_one_network(
    tiny_ensemble: Path, tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    from dermaclass.cli import app

    env = {"DERMACLASS_CACHE": str(tmp_path / "cache")}
    for name, bundle in (("one", tiny_bundle), ("ens", tiny_ensemble)):
        result = CliRunner().invoke(
            app,
            [
                "evaluate",
                str(bundle),
                str(colour_data),
                "--out",
                str(tmp_path / name),
                "--split-file",
                str(tiny_bundle / "split.csv"),
                "--n-boot",
                "10",
                "--no-thumbnails",
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app,
        [
            "report",
            "compare",
            str(tmp_path / "one"),
            str(tmp_path / "ens"),
            "--out",
            str(tmp_path / "cmp"),
            "--n-boot",
            "10",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["new"]["model"]["networks"] == 2 and cmp["old"]["model"]["networks"] == 1


def test_the_model_card_describes_the_ensemble(tiny_ensemble: Path) -> None:
    from dermaclass.report import model_card_markdown

    card = model_card_markdown(models.read_bundle_meta(tiny_ensemble), None, name="ens")
    assert "a deep ensemble of 2 networks" in card and "`members/m1` test_resnet 32x24 (seed 43, fold 1" in card
    assert "out-of-fold predictions of 2 members" in card and "members' margins" in card
    # its thresholds' figures are out-of-fold ones, and its time is the members' together
    assert "validation sensitivity" not in card and "(out-of-fold sensitivity" in card
    assert "for the 2 networks together (" in card and "full-data epochs" not in card
    assert "An ensemble retrains every member" in card


def test_a_student_is_refused_a_teacher_that_trained_on_its_valid_images(
    tiny_ensemble: Path, colour_data: Path, tmp_path: Path
) -> None:
    # tiny_ensemble's pool is train + valid: each valid image trained the other member
    cfg = _cfg(tmp_path, distill_from=str(tiny_ensemble), split_file=str(tiny_ensemble / "split.csv"))
    n_valid = int((pd.read_csv(tiny_ensemble / "split.csv")["split"] == "valid").sum())
    with pytest.raises(
        TrainingError, match=rf"trained on {n_valid} of this run's valid images.*--ensemble-calibration valid"
    ):
        prepare_data(cfg, colour_data)


def test_a_student_distils_the_ensembles_out_of_fold_predictions(
    tiny_ensemble_heldout: Path, colour_data: Path, tmp_path: Path
) -> None:
    import torch

    from dermaclass.train import build_learner, stage_dataloaders, train
    from dermaclass.train.callbacks import Distill

    cfg = _cfg(tmp_path, distill_from=str(tiny_ensemble_heldout), split_file=str(tiny_ensemble_heldout / "split.csv"))
    data = prepare_data(cfg, colour_data)
    oof = pd.read_csv(tiny_ensemble_heldout / "out_of_fold.csv")
    assert np.isfinite(data.soft_targets).all(axis=1).sum() == len(oof)  # every pool image: the train split
    train_rows = data.items["split"].to_numpy() == "train"
    assert np.isnan(data.soft_targets[~train_rows]).all() and np.allclose(data.soft_targets[train_rows].sum(axis=1), 1)
    learn = build_learner(cfg, data, tmp_path / "l", dls=stage_dataloaders(cfg, data, data.train_rows, 8))
    assert any(isinstance(cb, Distill) for cb in learn.cbs)
    batch = learn.dls.one_batch()
    assert len(batch) == 3 and batch[1].dtype in (torch.int64, torch.int32)  # the rows ride along as a second input
    # The callback takes the rows off the batch and adds alpha * T^2 * KL(teacher || student).
    fake = type("L", (), {})()
    fake.xb, fake.training = (torch.zeros(2, 3, 24, 32), torch.tensor([0, 1])), True
    soft = torch.tensor([[0.7, 0.2, 0.1], [float("nan")] * 3])
    cb = Distill(soft, alpha=0.5, temperature=2.0)
    cb.learn = fake
    cb.before_batch()
    assert len(fake.xb) == 1 and cb.rows.tolist() == [0, 1]
    fake.pred, fake.loss_grad = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor(1.0)
    cb.after_loss()
    logp = torch.log_softmax(fake.pred[:1] / 2, dim=1)
    kl = float((soft[:1] * (soft[:1].log() - logp)).sum()) * 4 * 0.5  # the item without a teacher adds nothing
    assert abs(float(fake.loss) - (0.5 * 1.0 + 0.5 * kl)) < 1e-5
    result = train(cfg, data, tmp_path / "student")
    meta = json.loads((tmp_path / "student" / "model.json").read_text())
    assert meta["config"]["distill_from"] == str(tiny_ensemble_heldout) and result.metrics["balanced_accuracy"] >= 0
    with pytest.raises(ConfigError, match="--distill-from trains one student"):
        train_ensemble(cfg.replace(members=2), data, tmp_path / "x")


@pytest.mark.parametrize("combine_by", ["calibrated", "probabilities"])
def test_valid_calibration_holds_the_valid_split_out_of_every_member(
    colour_data: Path, tmp_path: Path, combine_by: str
) -> None:
    # calibrated then combined (fitted on each member's valid logits), or combined then calibrated:
    # either way the valid figures below are that rule's, served
    cfg = _cfg(tmp_path, members=2, ensemble_calibration="valid", ensemble_combine=combine_by)
    data = prepare_data(cfg, colour_data)
    run = tmp_path / "run"
    train_ensemble(cfg, data, run)
    split = pd.read_csv(run / "split.csv")
    valid = set(split.loc[split["split"] == "valid", "image"])
    assert valid == set(data.items.loc[data.items["split"] == "valid", "image"])  # the run's own valid split
    assert (split.loc[split["split"] != "train", "fold"] == -1).all()
    for k in (0, 1):  # no member trains or picks its checkpoint on it
        member = pd.read_csv(run / "members" / f"m{k}" / "split.csv")
        assert valid <= set(member.loc[member["split"] == "test", "image"])
    meta = json.loads((run / "model.json").read_text())
    rule = models.COMBINE_RULES[combine_by]
    fitted_on = 2 * len(valid) if combine_by == "calibrated" else len(valid)  # each member's logits, or the mean's
    assert meta["calibration"]["n"] == fitted_on and "held out from all 2 members" in meta["calibration"]["fitted_on"]
    assert meta["ensemble"]["combine"] == rule
    # The valid figures are the served ensemble's: the Predictor reproduces them.
    pred = Predictor(run)
    images = [data.images[i] for i in data.valid_rows]
    y = [pred.classes.index(c) for c in data.items["label"].iloc[data.valid_rows]]
    from dermaclass.evaluate import classification_metrics

    ba = classification_metrics(np.array(y), pred.probabilities(images), pred.classes)["balanced_accuracy"]
    assert abs(ba - meta["metrics_valid"]["balanced_accuracy"]) < 1e-6
    members = [Predictor(run / "members" / f"m{k}") for k in (0, 1)]
    served = combine([m.logits(images) for m in members], rule, temperature=pred.temperature, offsets=pred.offsets)
    assert pred.combine_rule == rule and np.allclose(pred.logits(images), served, atol=1e-5)
    if combine_by == "calibrated":  # each member calibrated by the ensemble's calibration, then averaged
        mean = np.mean([pred.calibrated(m.logits(images)) for m in members], axis=0)
        assert np.allclose(pred.probabilities(images), mean, atol=1e-5)


def test_a_killed_ensemble_resumes_at_the_member_and_epoch_where_it_stopped(colour_data: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    args = train_command(colour_data, run, "--n-cycles", "2", "--colour-constancy", "none", "--members", "2")
    env = {**os.environ, "DERMACLASS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = run / "members" / "m1" / "progress.json"
    deadline = time.time() + 180
    try:  # kill it inside the second member, after a few of its epochs
        while time.time() < deadline and proc.poll() is None:
            if progress.is_file() and json.loads(progress.read_text())["history_rows"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (run / "members" / "m0" / "model.safetensors").stat().st_mtime_ns
    done_before = json.loads(progress.read_text())["history_rows"]
    again = subprocess.run(args, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never started over silently
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "members" / "m0" / "model.safetensors").stat().st_mtime_ns == first  # the finished member kept
    history = pd.read_csv(run / "members" / "m1" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, len(history) + 1)) and done_before < len(history)
    member = json.loads((run / "members" / "m1" / "model.json").read_text())
    assert member["resumed"] is True and json.loads((run / "model.json").read_text())["arch"] == "ensemble"


def test_calibrate_refits_an_ensemble_on_its_folds_with_fewer_tta_views(
    ensemble: Path, colour_data: Path, tmp_path: Path
) -> None:
    """``dermaclass calibrate ENSEMBLE DATA --tta flips2 --force``: every member is refitted on its
    held-out fold and the ensemble on their out-of-fold predictions, all with the image and its
    mirror; the weights stay; data that misses the pool is refused with the bundle untouched."""
    from dermaclass.cli import app

    bundle = tmp_path / "ens"
    shutil.copytree(ensemble, bundle)
    before = json.loads((bundle / "model.json").read_text())
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", str(bundle), str(colour_data), "--tta", "flips2"])
    assert res.exit_code == 2 and "already calibrated" in " ".join(res.output.split()), res.output
    split_text = (bundle / "split.csv").read_text()
    pool = pd.read_csv(bundle / "split.csv").query("split != 'test'")
    # a pool image without its fold: which member held it out is unknown, so nothing is refitted
    (bundle / "split.csv").write_text(split_text.replace(f"{pool['image'].iloc[0]},", "x.png,", 1))
    res = runner.invoke(app, ["calibrate", str(bundle), str(colour_data), "--tta", "flips2", "--force"])
    assert res.exit_code == 5 and "have no fold" in " ".join(res.output.split()), res.output
    assert json.loads((bundle / "model.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no half-done copy left
    (bundle / "split.csv").write_text(split_text)

    res = runner.invoke(app, ["calibrate", str(bundle), str(colour_data), "--tta", "flips2", "--force"])
    assert res.exit_code == 0, res.output
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["tta"] == "flips2" and meta["config"]["tta"] == "flips2"
    assert meta["calibration"]["n"] == len(pool) and meta["calibration"]["refitted"]["by"] == "dermaclass calibrate"
    assert [m["weights_sha256"] for m in meta["members"]] == [m["weights_sha256"] for m in before["members"]]
    oof = pd.read_csv(bundle / "out_of_fold.csv").set_index("image")
    pred = Predictor(bundle)
    assert pred.tta_mode == "flips2" and pred.predict(colour_data / "mel" / "0.png")["tta"] == "flips2"
    for k in (0, 1):
        member = Predictor(bundle / "members" / f"m{k}")
        assert member.tta_mode == "flips2" and member.meta.calibration["refitted"]["by"] == "dermaclass calibrate"
        # the out-of-fold logits are member k's, with the image and its mirror, on its own fold
        held = pool[pool["fold"] == k]["image"].head(3).tolist()
        images = [member.preprocess(colour_data / i) for i in held]
        mirrors = [np.ascontiguousarray(im[:, ::-1]) for im in images]
        mirror = (member.logits(images, tta=False) + member.logits(mirrors, tta=False)) / 2
        assert np.allclose(oof.loc[held].filter(like="logit_").to_numpy(), mirror, atol=1e-4)

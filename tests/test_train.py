"""Every recipe end to end on tiny generated images, composed from fastai calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import train_command
from typer.testing import CliRunner

from dermaclass import models, schedules
from dermaclass.config import load_config
from dermaclass.data.loaders import class_weights, make_dataloaders
from dermaclass.errors import ConfigError
from dermaclass.train import TrainingError, build_learner, prepare_data, train

TINY = dict(
    image_size="32,24",
    batch_size=8,
    arch="test_resnet",
    pretrained=False,
    head_epochs=1,
    epochs=1,
    n_cycles=1,
    cycle_len=1,
    cycle_mult=2,
    stage_fractions="0.5,1.0",
    lr_find_iters=30,
    colour_constancy="none",
)  # the generated classes differ only in colour


def _cfg(tmp_path: Path, **kw):
    return load_config(**{**TINY, "cache_dir": str(tmp_path / "cache"), **kw})


@pytest.mark.parametrize("recipe", ["baseline", "sgdr", "stepwise"])
def test_recipe_end_to_end(recipe: str, colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, recipe=recipe, lr=1e-3)
    data = prepare_data(cfg, colour_data)
    out = tmp_path / "run"
    result = train(cfg, data, out)
    for name in ("config.yaml", "split.csv", "history.csv", "curves.png", "model.safetensors", "model.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["bkl", "mel", "nv"] and meta["class_names"]["mel"] == "melanoma"
    assert meta["recipe"] == recipe and meta["input_size"] == [32, 24]
    assert meta["metrics_valid"]["balanced_accuracy"] == result.metrics["balanced_accuracy"]
    assert meta["calibration"]["method"] == "temperature" and meta["calibration"]["temperature"] > 0
    mel = meta["operating_points"]["mel"]
    assert mel["target_sensitivity"] == 0.9 and mel["valid_sensitivity"] >= 0.9
    refer = meta["calibration"]["refer"]
    assert refer["ood"]["method"] == "mahalanobis" and 0 <= refer["valid_referred"] <= 1
    history = pd.read_csv(out / "history.csv")
    expected_epochs = {"baseline": 2, "sgdr": 2, "stepwise": 3}[recipe]
    assert len(history) == expected_epochs
    assert history["balanced_accuracy_score"].notna().all()
    model, _ = models.load_bundle(out)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 24, 32)).shape == (2, 3)
    with pytest.raises(FileExistsError):
        train(cfg, data, out)  # a bundle is never overwritten silently
    split = pd.read_csv(out / "split.csv")
    assert (split.groupby("group")["split"].nunique() == 1).all()


def test_stepwise_stages_follow_the_plan(colour_data: Path, tmp_path: Path) -> None:
    # batch 6: about 42 training images give every stage two full batches (no small-data shrink)
    cfg = _cfg(tmp_path, recipe="stepwise", lr=1e-3, stage_fractions="0.4,0.7,1.0", lr_rule="eq9", batch_size=6)
    data = prepare_data(cfg, colour_data)
    result = train(cfg, data, tmp_path / "run")
    assert [s["batch_size"] for s in result.stages] == [6, 12, 6]
    assert [s["lr"] for s in result.stages] == pytest.approx([1e-3, 1e-3 / 30, 1e-3])
    n_train = len(data.train_rows)
    assert result.stages[-1]["images"] == n_train and result.stages[0]["images"] < result.stages[1]["images"]
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["stage"].tolist() == [1, 1, 2, 3] and history["phase"].tolist() == ["head", "sgdr", "sgdr", "sgdr"]
    # seed 001's cost measure: epochs x images actually trained
    assert result.images_seen == sum(s["epochs"] * s["images"] for s in result.stages)


def test_no_weight_sharing_restarts_each_stage(colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, recipe="stepwise", lr=1e-3, weight_sharing=False)
    result = train(cfg, prepare_data(cfg, colour_data), tmp_path / "run")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["phase"].tolist() == ["head", "sgdr", "head", "sgdr"]
    assert [s["head_epochs"] for s in result.stages] == [1, 1]


def test_range_tests_record_all_suggestions_and_plots(colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, recipe="stepwise", warm_epoch=True, lr_rule="constant").replace(lr=None)
    result = train(cfg, prepare_data(cfg, colour_data), tmp_path / "run")
    assert [t["name"] for t in result.range_tests] == ["stage1", "stage2"]
    for t in result.range_tests:
        assert set(t["suggestions"]) == {"valley", "slide", "minimum", "steep"}
        assert (tmp_path / "run" / t["plot"]).is_file()
        assert t["chosen"] > 0
    phases = pd.read_csv(tmp_path / "run" / "history.csv")["phase"].tolist()
    assert phases.count("warm") == 2  # seed 002: one warm epoch before each range test


def test_fit_sgdr_follows_the_sgdr_schedule(colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    data = prepare_data(cfg, colour_data)
    from dermaclass.train import stage_dataloaders

    learn = build_learner(cfg, data, tmp_path, dls=stage_dataloaders(cfg, data, data.train_rows, 8))
    learn.fit_sgdr(2, 1, lr_max=1e-3, cycle_mult=2)
    lrs = np.array(learn.recorder.lrs)
    n = len(lrs)
    assert n == len(learn.dls.train) * schedules.sgdr_epochs(2, 1, 2)
    # SGDR as the paper defines it (seed 003): cosine from lr_max to 0 in each cycle, a warm
    # restart, the second cycle twice as long (1 + 2 epochs)
    epochs = np.arange(n) / n * 3
    frac = np.where(epochs < 1, epochs, (epochs - 1) / 2)
    expected = 1e-3 * (1 + np.cos(np.pi * frac)) / 2
    np.testing.assert_allclose(lrs, expected, rtol=1e-4, atol=1e-9)


def test_pinned_vocab_keeps_the_head_when_a_class_is_missing(colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    data = prepare_data(cfg, colour_data)
    rows = data.train_rows[data.items["label"].to_numpy()[data.train_rows] != "nv"]
    dls = make_dataloaders(
        data.table(rows), data.images, data.vocab, batch_size=4, normalization=models.normalization("test_resnet")
    )
    assert list(dls.vocab) == ["bkl", "mel", "nv"] and dls.c == 3
    xb, yb = dls.one_batch()
    assert xb.shape[1:] == (3, 24, 32) and xb.dtype == torch.float32


def test_class_weights() -> None:
    w = class_weights(["a"] * 90 + ["b"] * 10, ["a", "b", "c"], power=1.0)
    assert w[1] / w[0] == pytest.approx(9.0) and w[2] == w[1]
    s = class_weights(["a"] * 90 + ["b"] * 10, ["a", "b"], power=0.5)
    assert s[1] / s[0] == pytest.approx(3.0)


@pytest.mark.parametrize("imbalance", ["none", "weights", "sampler", "focal"])
def test_imbalance_options_train(imbalance: str, colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, recipe="sgdr", lr=1e-3, imbalance=imbalance, head_epochs=0, augment="augmix")
    data = prepare_data(cfg, colour_data)
    result = train(cfg, data, tmp_path / "run")
    assert 0 <= result.metrics["balanced_accuracy"] <= 1
    # What each option does to an imbalanced subset (every nv, two of each other class):
    # the loss weighs or focuses, or the sampler evens the class mix the network sees.
    from dermaclass.train import loss_for, stage_dataloaders

    labels = data.items["label"].to_numpy()
    train_rows = data.train_rows
    rows = np.concatenate(
        [train_rows[labels[train_rows] == "nv"], *[train_rows[labels[train_rows] == c][:2] for c in ("bkl", "mel")]]
    )
    loss = loss_for(cfg, pd.Series(labels[rows]), data.vocab)
    kind = type(loss).__name__
    weight = getattr(getattr(loss, "func", None), "weight", None)
    assert (weight is not None) == (imbalance == "weights") and (kind == "FocalLossFlat") == (imbalance == "focal")
    if weight is not None:
        assert weight[data.vocab.index("bkl")] > weight[data.vocab.index("nv")]
    torch.manual_seed(0)
    dl = stage_dataloaders(cfg, data, rows, batch_size=4).train
    seen = np.concatenate([y.numpy() for _ in range(5) for _, y in dl])
    nv_share = float(np.mean(seen == data.vocab.index("nv")))
    natural = float(np.mean(labels[rows] == "nv"))
    if imbalance == "sampler":
        assert nv_share < natural - 0.15, (nv_share, natural)  # about 1/3 instead of most
    else:
        assert abs(nv_share - natural) < 0.1, (nv_share, natural)


def test_empty_valid_split_is_a_clear_error(colour_data: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="valid split is empty"):
        prepare_data(_cfg(tmp_path, split_fractions="1.0,0.0,0.0"), colour_data)


def test_cli_train_prints_the_plan(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.cli import app

    args = [
        "train",
        str(colour_data),
        "--out",
        str(tmp_path / "run"),
        "--lr",
        "0.001",
        "--arch",
        "test_resnet",
        "--no-pretrained",
        "--image-size",
        "32,24",
        "--batch-size",
        "8",
        "--n-cycles",
        "1",
        "--stage-fractions",
        "0.5,1.0",
    ]
    result = CliRunner().invoke(app, args, env={"DERMACLASS_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    assert "stepwise plan" in result.output and "valid balanced accuracy" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already there" in again.output


# ---- retraining on new clinic data ------------------------------------------------------------
def _new_class_folder(root: Path, label: str = "bcc", n: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / label).mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 60, (24, 32, 3)).astype(np.uint8)
        arr[..., :2] += 150  # yellow: unlike the three colour classes
        Image.fromarray(arr).save(root / label / f"new{i}.png")
    return root


def test_several_sources_merge_with_prefixed_ids(colour_data: Path, tmp_path: Path) -> None:
    extra = _new_class_folder(tmp_path / "batch2")
    data = prepare_data(_cfg(tmp_path), [colour_data, extra])
    assert data.vocab == ["bcc", "bkl", "mel", "nv"] and len(data.items) == 72
    new = data.items[data.items["label"] == "bcc"]
    assert new["image"].str.startswith("batch2/").all() and new["group"].str.startswith("batch2:").all()
    assert data.sources == [str(colour_data.resolve()), str(extra.resolve())]


def test_model_from_bundle_grows_the_head(tiny_bundle: Path) -> None:
    parent, meta = models.load_bundle(tiny_bundle)
    grown, info = models.model_from_bundle(tiny_bundle, ["bcc", "bkl", "mel", "nv"])
    assert info["added"] == ["bcc"]
    linear = [m for m in parent[1].modules() if isinstance(m, torch.nn.Linear)][-1]
    grown_linear = [m for m in grown[1].modules() if isinstance(m, torch.nn.Linear)][-1]
    assert grown_linear.weight.shape[0] == 4
    assert torch.equal(grown_linear.weight[1:], linear.weight)  # bkl, mel, nv moved one row down
    assert linear.bias is None or torch.equal(grown_linear.bias[1:], linear.bias)
    body_old, body_new = parent[0].state_dict(), grown[0].state_dict()
    assert all(torch.equal(body_old[k], body_new[k]) for k in body_old)
    with pytest.raises(models.ModelError, match="drops"):
        models.model_from_bundle(tiny_bundle, ["bkl", "mel"])


def test_retrain_from_bundle_keeps_the_old_split_and_adds_a_class(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    from dermaclass.train import inherit_bundle

    extra = _new_class_folder(tmp_path / "batch2")
    cfg = inherit_bundle(
        _cfg(
            tmp_path,
            recipe="baseline",
            lr=1e-3,
            init_bundle=str(tiny_bundle),
            split_file=str(tiny_bundle / "split.csv"),
        )
    )
    data = prepare_data(cfg, [colour_data, extra])
    assert data.split_reuse["kept"] == 60 and data.split_reuse["assigned"] == 12
    old = pd.read_csv(tiny_bundle / "split.csv").set_index("image")["split"]
    merged = data.items.set_index("image")["split"]
    assert (merged[old.index] == old).all()  # no old test image moved into training
    out = tmp_path / "run"
    train(cfg, data, out)
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["bcc", "bkl", "mel", "nv"]
    assert meta["parent"]["classes_added"] == ["bcc"] and len(meta["parent"]["weights_sha256"]) == 64


def test_conflicting_class_names_are_refused(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"mel": "melasma", "nv": "melanocytic nevus", "bkl": "benign keratosis"}))
    cfg = _cfg(tmp_path, init_bundle=str(tiny_bundle), class_names=str(names))
    with pytest.raises(TrainingError, match="'mel' is 'melanoma' in the bundle but 'melasma'"):
        prepare_data(cfg, colour_data)


def test_retrain_compares_on_the_parent_test_split(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.retrain import retrain

    extra = _new_class_folder(tmp_path / "batch2")
    out = tmp_path / "v2"
    seen = []
    done = retrain(
        tiny_bundle,
        [colour_data, extra],
        out,
        n_boot=50,
        on_prepared=lambda cfg, prepared: seen.append(prepared.split_reuse),
    )
    assert seen and seen[0]["assigned"] == 12 and done.split_reuse == seen[0]
    assert done.new_classes == ["bcc"] and done.cfg.init_bundle == str(tiny_bundle)
    for f in (
        "model.json",
        "report/report.html",
        "compare/compare.html",
        "compare/parent/report.json",
        "compare/new/report.json",
    ):
        assert (out / f).is_file(), f
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert cmp["same_test_set"] and cmp["classes_added"] == ["bcc"]
    parent_test = pd.read_csv(tiny_bundle / "split.csv").query("split == 'test'")
    assert cmp["new"]["data"]["n"] == len(parent_test)
    assert done.sensitivity_drops == cmp["sensitivity_drops"]


def test_cli_retrain_exits_6_and_says_so_on_a_sensitivity_drop(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dermaclass import retrain as retraining
    from dermaclass.cli import app

    comparison = {
        "overall": {"balanced_accuracy": {"old": 0.8, "new": 0.7, "delta": -0.1}},
        "new": {"data": {"n": 30}},
        "sensitivity_drops": ["mel"],
    }
    fake = retraining.Retrained(
        result=None,
        cfg=None,
        split_file=tiny_bundle / "split.csv",
        split_reuse={},
        new_classes=[],
        comparison=comparison,
        compare_dir=tmp_path / "compare",
    )
    monkeypatch.setattr(retraining, "retrain", lambda *a, **k: fake)
    res = CliRunner().invoke(app, ["retrain", str(tiny_bundle), str(tmp_path), "--out", str(tmp_path / "v2")])
    text = " ".join(res.output.split())
    assert res.exit_code == 6 and "SENSITIVITY DROP in mel" in text and "0.8000 -> 0.7000" in text


# ---- resume ------------------------------------------------------------------------------------
def test_killed_run_resumes_to_completion(colour_data: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    args = train_command(colour_data, run, "--n-cycles", "3")
    env = {**os.environ, "DERMACLASS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = run / "progress.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if progress.is_file() and json.loads(progress.read_text())["history_rows"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)  # no clean-up: as a power loss would leave it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads(progress.read_text())
    assert not (run / "model.json").exists()
    done_before = state["history_rows"]
    # A second start without --resume refuses to overwrite the interrupted run and says how to continue.
    again = subprocess.run(args, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    meta = json.loads((run / "model.json").read_text())
    assert meta["resumed"] is True
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 + 7 + 7 and history["epoch"].tolist() == list(range(1, 16))  # nothing lost, nothing twice
    assert history["stage"].tolist() == [1] * 8 + [2] * 7
    assert done_before < len(history)
    assert meta["training"]["images_seen"] == sum(s["images"] * s["epochs"] for s in meta["stages"])
    assert not list((run / "checkpoints").glob("weights-*"))


# ---- data-parallel -------------------------------------------------------------------------------
def test_two_process_data_parallel_run(colour_data: Path, tmp_path: Path) -> None:
    """fastai's distrib_ctx over two CPU processes (gloo), launched as users launch multi-GPU runs."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "dermaclass",
        "train",
        str(colour_data),
        "--out",
        str(run),
        "--recipe",
        "sgdr",
        "--image-size",
        "32,24",
        "--batch-size",
        "8",
        "--arch",
        "test_resnet",
        "--no-pretrained",
        "--head-epochs",
        "1",
        "--n-cycles",
        "1",
        "--threads",
        "1",
        "--lr-find",
        "--colour-constancy",
        "none",
    ]
    env = {**os.environ, "DERMACLASS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    meta = json.loads((run / "model.json").read_text())
    assert meta["processes"] == 2
    split = pd.read_csv(run / "split.csv")
    assert meta["metrics_valid"]["n"] == int((split["split"] == "valid").sum())  # gathered from both ranks, once
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 + 1  # one writer: head epoch + one SGDR epoch, not doubled
    assert len(meta["range_tests"]) == 1 and meta["range_tests"][0]["chosen"] > 0  # rank 0's LR, broadcast
    assert res.stdout.count("valid balanced accuracy") == 1  # rank 0 reports


def test_label_smoothing_reaches_the_loss(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.train import loss_for

    labels = pd.Series(["bkl", "mel", "nv"])
    logits, target = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    plain = loss_for(_cfg(tmp_path), labels, ["bkl", "mel", "nv"])(logits, target)
    smooth = loss_for(_cfg(tmp_path, label_smoothing=0.1), labels, ["bkl", "mel", "nv"])(logits, target)
    # a confident correct prediction costs more when the target is smoothed: 0.1 of the mass is spread
    assert float(smooth) > float(plain) + 0.1
    with pytest.raises(ConfigError, match="focal"):  # refused when the config is built, before any work
        _cfg(tmp_path, label_smoothing=0.1, imbalance="focal")


def test_keep_last_skips_the_best_checkpoint(colour_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, recipe="sgdr", lr=1e-3, head_epochs=0, keep="last")
    train(cfg, prepare_data(cfg, colour_data), tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["kept_weights"] == "last"
    bundle = load_file(str(tmp_path / "run" / "model.safetensors"))
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best.safetensors"))
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    if history["balanced_accuracy_score"].idxmax() != len(history) - 1:  # the best epoch was not the last
        assert any(not torch.equal(bundle[k], best[k]) for k in bundle)


def test_colour_constancy_is_applied_in_training_and_recorded(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.data.images import shades_of_gray

    cfg = _cfg(tmp_path, recipe="baseline", lr=1e-3, head_epochs=0, colour_constancy="shades-of-gray", augment="none")
    data = prepare_data(cfg, colour_data)
    from dermaclass.train import stage_dataloaders

    dls = stage_dataloaders(cfg, data, data.train_rows, 4)
    x = dls.valid.decode((dls.valid.one_batch()[0],))[0][0]  # first valid image, denormalised to 0..255
    row = data.valid_rows[0]
    expected = shades_of_gray(np.asarray(data.images[row]))
    assert np.abs(x.permute(1, 2, 0).numpy().round() - expected).max() <= 1
    train(cfg, data, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["preprocessing"]["colour_constancy"] == "shades-of-gray"


def test_progressive_resizing_trains_each_stage_at_its_size(colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, recipe="stepwise", lr=1e-3, stage_fractions="0.5,1.0", stage_sizes="24x18,32x24")
    data = prepare_data(cfg, colour_data)
    assert set(data.images_at) == {(24, 18), (32, 24)}
    assert data.images_of((24, 18))[0].shape == (18, 24, 3) and data.images_of(None)[0].shape == (24, 32, 3)
    result = train(cfg, data, tmp_path / "run")
    assert [tuple(s["size"]) for s in result.stages] == [(24, 18), (32, 24)]
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["input_size"] == [32, 24]
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    final = history[history["stage"].astype(str) == "2"]["balanced_accuracy_score"].max()
    # the kept checkpoint is the best epoch at the final size, not one of the smaller stage
    assert meta["training"]["best_valid_balanced_accuracy"] == pytest.approx(final)


def test_bad_stage_sizes_fail_before_decoding(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.errors import ConfigError

    with pytest.raises(ConfigError, match="must equal the image size"):
        prepare_data(_cfg(tmp_path, recipe="stepwise", stage_sizes="24x18,40x30"), colour_data)
    with pytest.raises(ConfigError, match="stepwise"):
        prepare_data(_cfg(tmp_path, recipe="sgdr", stage_sizes="24x18,32x24"), colour_data)
    assert not (tmp_path / "cache").exists()


def test_weight_ema_is_bundled_and_checkpointed(colour_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from dermaclass.train.callbacks import WeightEMA

    cfg = _cfg(tmp_path, recipe="sgdr", lr=1e-3, head_epochs=0, ema_decay=0.9)
    data = prepare_data(cfg, colour_data)
    train(cfg, data, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["kept_weights"] == "ema 0.9"
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    steps = progress["ema_steps"]
    assert progress["ema"].startswith("ema-") and steps >= len(data.train_rows) // cfg.batch_size
    bundle = load_file(str(tmp_path / "run" / "model.safetensors"))
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best.safetensors"))
    assert any(not torch.equal(bundle[k].float(), best[k].float()) for k in bundle if bundle[k].is_floating_point())
    # the average round-trips through a checkpoint (what --resume loads)
    learn = build_learner(cfg, data, tmp_path / "run2", dls=data_loaders(cfg, data))
    cb = learn.weight_ema
    assert isinstance(cb, WeightEMA) and cb.state() == {}
    cb.load(bundle_state := {k: v.float() if v.is_floating_point() else v for k, v in bundle.items()}, steps)
    assert cb.steps == steps and all(torch.equal(cb.state()[k], bundle_state[k]) for k in bundle_state)
    assert cb.apply() and all(torch.equal(learn.model.state_dict()[k], bundle_state[k]) for k in bundle_state)
    with pytest.raises(ConfigError, match=r"ema_decay=1.5: must be in \[0, 1\)"):  # refused before any work
        _cfg(tmp_path, ema_decay=1.5)


def test_head_norm_floor_bounds_the_head_before_every_validation_and_in_the_bundle(
    colour_data: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, recipe="sgdr", lr=1e-3, head_epochs=0, head_norm_floor=0.5)
    data = prepare_data(cfg, colour_data)
    learn = build_learner(cfg, data, tmp_path / "probe", dls=data_loaders(cfg, data))
    norms = [m for m in learn.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    body = [m for m in learn.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and body
    for m in [*norms, *body]:
        m.running_var.fill_(1e-12)  # units that were never on
    learn.validate()
    assert all(bool((m.running_var >= 0.5).all()) for m in norms)  # the head's floored
    assert all(bool((m.running_var == 1e-12).all()) for m in body)  # the backbone's left alone
    train(cfg, data, tmp_path / "run")
    bundle = load_file(str(tmp_path / "run" / "model.safetensors"))
    head_vars = [v for k, v in bundle.items() if k.startswith("1.") and k.endswith("running_var")]
    assert head_vars and all(float(v.float().min()) >= 0.5 for v in head_vars)
    with pytest.raises(ConfigError, match="head_norm_floor"):
        _cfg(tmp_path, head_norm_floor=-1)


def test_cycle_average_is_bundled_and_checkpointed(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.train.callbacks import CycleAverage

    # SGDR cycles of 1 and 2 epochs: the cycle ends are epochs 0 and 2 (not 1)
    cfg = _cfg(tmp_path, recipe="sgdr", lr=1e-3, head_epochs=0, n_cycles=2, average_cycles=2)
    data = prepare_data(cfg, colour_data)
    train(cfg, data, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["kept_weights"] == "average of the last 2 cycle ends"
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["avg"].startswith("avg-") and progress["avg_steps"] == 2  # in every checkpoint: resumable

    learn = build_learner(cfg, data, tmp_path / "run2", dls=data_loaders(cfg, data))
    cb = learn.cycle_average
    assert isinstance(cb, CycleAverage) and cb.state() == {}
    learn.unfreeze()
    learn.fit_sgdr(2, 1, lr_max=1e-2)
    assert cb.steps == 2 and len(cb.snapshots) == 2
    now = {k: v.clone() for k, v in learn.model.state_dict().items()}
    assert all(torch.equal(cb.snapshots[1][k], now[k]) for k in now)  # the last epoch is a cycle end
    first = cb.snapshots[0]
    weights = [k for k in now if k.endswith(".weight")]
    # the snapshots round-trip through a checkpoint (what --resume loads)
    state = cb.state()
    cb.snapshots, cb.steps = [], 0
    cb.load(state, 2)
    assert cb.steps == 2 and all(torch.equal(cb.state()[k], state[k]) for k in state)
    assert cb.apply(learn.dls.train) == 2
    after = learn.model.state_dict()
    for k in weights:  # the weights are the mean of the two cycle ends ...
        assert torch.allclose(after[k], (first[k] + now[k]) / 2, atol=1e-6)
    means = [k for k in after if k.endswith("running_mean")]  # ... batch-norm statistics are recomputed
    assert means and any(not torch.allclose(after[k], (first[k] + now[k]) / 2) for k in means)
    with pytest.raises(ConfigError, match="choose one"):  # refused when the config is built
        cfg.replace(ema_decay=0.9)
    with pytest.raises(ConfigError, match="at least 2"):
        cfg.replace(average_cycles=1)


def data_loaders(cfg, data):
    from dermaclass.train import stage_dataloaders

    return stage_dataloaders(cfg, data, data.train_rows, cfg.batch_size)


def test_bfloat16_autocast_trains_and_keeps_float32_weights(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.train.callbacks import CPUAutocast

    cfg = _cfg(tmp_path, recipe="baseline", lr=1e-3, head_epochs=0, precision="bfloat16")
    data = prepare_data(cfg, colour_data)
    learn = build_learner(cfg, data, tmp_path / "l", dls=data_loaders(cfg, data))
    assert any(isinstance(cb, CPUAutocast) for cb in learn.cbs)
    seen = []
    learn.model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert torch.bfloat16 in seen  # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert torch.is_autocast_enabled("cpu") is False  # nothing left switched on


def test_flip_tta_is_recorded_and_calibrated_on_the_flipped_logits(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    """The bundle serves flip TTA by default, and its temperature was fitted on the very logits the
    Predictor computes with it (fastai's FlipInput views == the Predictor's numpy flips)."""
    from dermaclass.evaluate.calibration import calibrate
    from dermaclass.serving.predictor import Predictor

    meta = json.loads((tiny_bundle / "model.json").read_text())
    assert meta["tta"] == "flips4"
    cfg = load_config(
        tiny_bundle / "config.yaml", split_file=str(tiny_bundle / "split.csv"), cache_dir=str(tmp_path / "cache")
    )
    data = prepare_data(cfg, colour_data)
    images = [data.images[int(r)] for r in data.valid_rows]
    labels = data.items["label"].map({c: i for i, c in enumerate(data.vocab)}).to_numpy()[data.valid_rows]
    pred = Predictor(tiny_bundle)
    assert pred.tta and pred.predict(colour_data / "mel" / "0.png")["tta"] == "flips4"
    assert pred.predict(colour_data / "mel" / "0.png", tta=False)["tta"] is None
    flipped = pred.logits(images)
    assert np.allclose(flipped, pred.logits(images, tta=True)) and not np.allclose(
        flipped, pred.logits(images, tta=False)
    )
    # calibrate() on these logits reproduces the bundle's temperature (fitted, or T = 1 when refused)
    # and prior shift (the train split's class frequencies)
    train_labels = data.items["label"].astype(str).to_numpy()[data.train_rows]
    calibration, _, _ = calibrate(
        flipped,
        labels,
        data.vocab,
        prior=[float(np.mean(train_labels == c)) for c in data.vocab],
        **cfg.calibration_settings(),
    )
    assert calibration["temperature"] == pytest.approx(meta["calibration"]["temperature"], rel=1e-3)
    assert calibration["offsets"] == pytest.approx(meta["calibration"]["offsets"], rel=1e-3, abs=1e-6)


def test_cli_lr_and_lr_find_exclude_each_other(colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.cli import app

    res = CliRunner().invoke(
        app, ["train", str(colour_data), "--out", str(tmp_path / "run"), "--lr", "1e-3", "--lr-find"]
    )
    assert res.exit_code == 2 and "--lr-find" in res.output


def test_small_data_shrinks_the_batch_or_stops_with_exit_5(colour_data: Path, tmp_path: Path) -> None:
    from PIL import Image

    from dermaclass.train import fit_batch_size

    # 60 images (about 42 for training): stepwise at 20 % has 8 images, so batch 32 becomes 4.
    cfg = _cfg(tmp_path, recipe="stepwise", batch_size=32, stage_fractions="0.2,0.4,0.6,0.8,1.0", lr=1e-3)
    data = prepare_data(cfg, colour_data)
    assert fit_batch_size(cfg, len(data.train_rows)).batch_size == 4
    train(cfg, data, tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.yaml").batch_size == 4  # the run records what it used
    # 5 images per class: no batch size works; exit 5 with the number of images needed.
    few = tmp_path / "few"
    for c, label in enumerate(("bkl", "mel", "nv")):
        (few / label).mkdir(parents=True)
        for i in range(5):
            arr = np.full((24, 32, 3), 40, np.uint8)
            arr[..., c] = 200 - i
            Image.fromarray(arr).save(few / label / f"{i}.png")
    small = prepare_data(cfg, few)
    with pytest.raises(TrainingError, match=r"too few .*at least \d+ in the training split") as info:
        train(cfg, small, tmp_path / "run2")
    assert info.value.exit_code == 5 and not (tmp_path / "run2" / "model.json").exists()


def test_a_non_finite_loss_stops_training_loudly() -> None:
    from fastai.test_utils import synth_learner

    from dermaclass.train.callbacks import NonFiniteLoss, StopOnNaN

    learn = synth_learner(cbs=StopOnNaN())
    learn.loss_func = lambda pred, y: (pred - y).pow(2).mean() * float("nan")
    with pytest.raises(NonFiniteLoss, match="became nan") as info:
        learn.fit(1)
    assert info.value.exit_code == 5
    learn.lr_finder = object()  # during a range test a blown-up loss is expected, not an error
    learn.cbs.filter(lambda cb: isinstance(cb, StopOnNaN))[0].after_batch()


def test_a_run_folder_says_whether_it_can_be_resumed(tmp_path: Path) -> None:
    from dermaclass.train import check_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(FileExistsError, match="nothing to resume; start it again"):
        check_run_dir(run, force=False)
    (run / "progress.json").write_text("{}")
    with pytest.raises(FileExistsError, match="continue it with --resume"):
        check_run_dir(run, force=False)


def test_a_temperature_that_worsens_ece_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dermaclass.evaluate import calibration as calibrating

    labels = np.repeat([0, 1, 2], 30)
    logits = np.eye(3)[labels] * 8.0  # confident and right: T = 1 is already calibrated
    monkeypatch.setattr(calibrating, "fit_temperature", lambda z, y: 20.0)  # as if NLL had chosen a flat T
    calibration, _, probs = calibrating.calibrate(
        logits, labels, ["bkl", "mel", "nv"], **_cfg(tmp_path, prior_sensitivity=0).calibration_settings()
    )
    assert calibration["temperature"] == 1.0 and "refused" in calibration
    assert calibration["ece_after"] == calibration["ece_before"] and probs.max(1).min() > 0.99


def test_the_prior_shift_moves_the_decision_towards_the_train_prior(tmp_path: Path) -> None:
    from dermaclass.evaluate.calibration import calibrate
    from dermaclass.evaluate.metrics import softmax

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [30, 30, 90])  # nv (index 2) is common in the data...
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[labels]
    logits[:, 2] -= 1.0  # ...but the network, trained on balanced batches, decides against it
    vocab, prior = ["bkl", "mel", "nv"], [0.1, 0.1, 0.8]
    cal, points, probs = calibrate(
        logits, labels, vocab, prior=prior, **_cfg(tmp_path, prior_sensitivity=0.8).calibration_settings()
    )
    shift = cal["prior_shift"]
    assert shift["class"] == "nv" and 0 < shift["tau"] <= 1 and shift["reached"]
    assert shift["valid_sensitivity_before"] < 0.8 <= shift["valid_sensitivity"]
    assert (probs.argmax(1)[labels == 2] == 2).mean() == shift["valid_sensitivity"]
    # what the bundle stores reproduces what it serves, and the melanoma threshold is set on it
    assert np.allclose(probs, softmax(logits + cal["offsets"], cal["temperature"]))
    mel = probs[labels == 1, 1]
    assert np.mean(mel >= points["mel"]["threshold"]) == points["mel"]["valid_sensitivity"] >= 0.9
    off, _, plain = calibrate(
        logits, labels, vocab, prior=prior, **_cfg(tmp_path, prior_sensitivity=0).calibration_settings()
    )  # 0 = off
    assert "offsets" not in off and "prior_shift" not in off and (plain.argmax(1) == logits.argmax(1)).all()


def test_force_over_a_finished_run_never_leaves_the_old_model_beside_a_new_split(
    colour_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dermaclass import train as training

    cfg = _cfg(tmp_path, recipe="baseline", lr=1e-3, head_epochs=0)
    data = prepare_data(cfg, colour_data)
    run = tmp_path / "run"
    train(cfg, data, run)
    old_weights = (run / "model.safetensors").read_bytes()

    def killed(run_):  # noqa: ANN001 - the recipe dies halfway, as under kill -9
        raise RuntimeError("killed")

    monkeypatch.setitem(training.RECIPES, "baseline", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg.replace(seed=7), data, run, force=True)
    assert not (run / "model.json").exists() and not (run / "model.safetensors").exists()
    assert (run / "replaced" / "model.safetensors").read_bytes() == old_weights  # nothing lost
    monkeypatch.undo()
    train(cfg.replace(seed=7), data, run, force=True)
    assert (run / "model.json").is_file() and not (run / "replaced").exists()


def test_sam_steps_with_the_gradient_at_the_perturbed_weights() -> None:
    from types import SimpleNamespace

    from dermaclass.train.callbacks import SAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    loss_func = torch.nn.CrossEntropyLoss()
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_func(model(x), y).backward()
    g = [p.grad.detach().clone() for p in model.parameters()]
    running = model[1].running_mean.clone()
    # what SAM's second gradient must be: the plain gradient at w + rho * g / ||g||
    rho = 0.5
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    probe = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p, w, gi in zip(probe.parameters(), w0, g):
            p.copy_(w + rho * gi / norm)
    loss_func(probe(x), y).backward()
    cb = SAM(rho)
    cb.learn = SimpleNamespace(model=model, loss_func=loss_func, xb=(x,), yb=(y,))
    cb.before_step()
    for p, w, q in zip(model.parameters(), w0, probe.parameters()):
        assert torch.equal(p.detach(), w)  # the weights are back where they were
        assert torch.allclose(p.grad, q.grad, atol=1e-6)  # and hold the perturbed point's gradient
    assert torch.equal(model[1].running_mean, running)  # the second pass left the BN statistics alone
    assert model[1].momentum == 0.1
    with pytest.raises(ValueError, match="rho"):
        SAM(0.0)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixing_and_sam_train_and_are_recorded(mix: str, colour_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, recipe="sgdr", lr=1e-3, head_epochs=0, mix=mix, sam_rho=0.05)
    data = prepare_data(cfg, colour_data)
    learn = build_learner(cfg, data, tmp_path / "probe", dls=data_loaders(cfg, data))
    assert hasattr(learn, "sam") and hasattr(learn, "mix_up" if mix == "mixup" else "cut_mix")
    train(cfg, data, tmp_path / "run")
    resolved = load_config(tmp_path / "run" / "config.yaml")
    assert (resolved.mix, resolved.sam_rho) == (mix, 0.05)
    from dermaclass.models import read_bundle_meta
    from dermaclass.report import model_card_markdown

    card = model_card_markdown(read_bundle_meta(tmp_path / "run"), None, name="run")
    assert f"mixing `{mix}`, SAM (rho 0.05)" in card
    with pytest.raises(ConfigError, match="logit-adjusted"):
        _cfg(tmp_path, mix=mix, imbalance="logit-adjusted")
    with pytest.raises(ConfigError, match="sam_rho"):
        _cfg(tmp_path, sam_rho=-1)


def test_histo_weight_samples_confirmed_images_more(manifest_dataset: Path, colour_data: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(manifest_dataset / "metadata.csv")
    meta["dx_type"] = np.where(meta["dx"] == "mel", "histo", "follow_up")  # every melanoma confirmed
    meta.to_csv(manifest_dataset / "metadata.csv", index=False)
    from dermaclass.train import stage_dataloaders

    shares = {}
    for weight in (1.0, 5.0):
        cfg = _cfg(tmp_path, recipe="sgdr", imbalance="none", histo_weight=weight)
        data = prepare_data(cfg, manifest_dataset)
        assert (data.item_weights is None) == (weight == 1.0)
        torch.manual_seed(0)
        dl = stage_dataloaders(cfg, data, data.train_rows, batch_size=4).train
        seen = np.concatenate([y.numpy() for _ in range(10) for _, y in dl])
        shares[weight] = float(np.mean(seen == data.vocab.index("mel")))
    labels = data.items["label"].to_numpy()[data.train_rows]
    natural = float(np.mean(labels == "mel"))
    expected = 5 * natural / (5 * natural + 1 - natural)  # each melanoma drawn 5 times as often
    assert abs(shares[1.0] - natural) < 0.1 and abs(shares[5.0] - expected) < 0.1, (shares, natural, expected)
    with pytest.raises(TrainingError, match="dx_type"):  # a folder dataset has no dx_type column
        prepare_data(_cfg(tmp_path, histo_weight=2.0), colour_data)
    with pytest.raises(ConfigError, match="histo_weight"):
        _cfg(tmp_path, histo_weight=0)


def test_the_bundle_records_the_machine_its_minutes_were_measured_on(tiny_bundle: Path) -> None:
    """Training minutes are read beside the CPU and platform: the same "2 cores" changed speed
    from one day to the next here."""
    import platform

    machine = json.loads((tiny_bundle / "model.json").read_text())["machine"]
    assert machine["cpus"] >= 1 and machine["torch_threads"] >= 1
    assert machine["platform"] == platform.platform() and "cpu" in machine

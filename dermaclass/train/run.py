"""One training run end to end: the run folder (never overwritten silently; an interrupted
run resumes), the recipe, calibration on the validation split, the out-of-distribution
score, and the bundle (safetensors weights + JSON metadata, never a pickle).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.distributed import distrib_barrier
from fastai.torch_core import num_distrib, rank_distrib, set_seed

import dermaclass
from dermaclass import models
from dermaclass.config import Config
from dermaclass.fileio import atomic_path, write_json
from dermaclass.serving.backends import ONNX_FILE, OPENVINO_FILE, OPENVINO_INT8_FILE
from dermaclass.serving.refit import calibrate_bundle
from dermaclass.train.callbacks import MONITOR, flip_logits
from dermaclass.train.data import TrainData, parent_record
from dermaclass.train.distributed import parallel
from dermaclass.train.recipes import RECIPES, Run, build_learner, fit_batch_size, stage_dataloaders
from dermaclass.train.resume import PROGRESS, Resume

log = logging.getLogger(__name__)


# ---- the run ---------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    stages: list[dict]
    seconds: float
    images_seen: int
    range_tests: list[dict]


REPLACED = "replaced"  # a finished run that --force is replacing waits here until the new bundle exists
RUN_FILES = (
    models.BUNDLE_META,
    models.BUNDLE_WEIGHTS,
    ONNX_FILE,
    OPENVINO_FILE,
    OPENVINO_FILE.replace(".xml", ".bin"),
    OPENVINO_INT8_FILE,
    OPENVINO_INT8_FILE.replace(".xml", ".bin"),
    "ood.safetensors",
    "config.yaml",
    "split.csv",
    "history.csv",
    "summary.json",
    PROGRESS,
)


def set_aside_finished_run(run_dir: Path) -> None:
    """Before ``--force`` retrains over a finished run, move its bundle, config and split into
    ``replaced/``: a run killed halfway then leaves no old model beside a new split (evaluate
    would score the old model on a test split holding its own training images), and nothing is
    lost. ``replaced/`` is removed once the new bundle is written."""
    if not (run_dir / models.BUNDLE_META).exists() and not (run_dir / models.BUNDLE_WEIGHTS).exists():
        return
    keep = run_dir / REPLACED
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    for name in RUN_FILES:  # the metadata first: from then on the folder holds no usable old bundle
        if (run_dir / name).exists():
            os.replace(run_dir / name, keep / name)
    log.warning("%s: the finished run there is kept in %s until the new bundle is written", run_dir, keep)


def check_run_dir(run_dir: Path, *, force: bool) -> None:
    """Refuse to write into a folder that holds a bundle or another run, unless ``force``."""
    if force or not run_dir.exists():
        return
    if (run_dir / models.BUNDLE_META).exists() or (run_dir / models.BUNDLE_WEIGHTS).exists():
        raise FileExistsError(f"{run_dir}: a model bundle is already there")
    if (run_dir / PROGRESS).is_file() or (run_dir / "members").is_dir():
        raise FileExistsError(f"{run_dir}: holds an interrupted run; continue it with --resume")
    if (run_dir / "config.yaml").is_file():
        raise FileExistsError(
            f"{run_dir}: holds a run that stopped before its first epoch ended, so there is "
            "nothing to resume; start it again"
        )
    if any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: not empty, and not a run folder")


def train(
    cfg: Config,
    data: TrainData,
    run_dir: str | Path,
    *,
    force: bool = False,
    data_card: str | None = None,
    resume: bool = False,
    on_start: Callable[[Config, int], None] | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Run ``cfg.recipe`` on prepared data and write the run folder and the model bundle.
    ``callbacks``: fastai Callbacks added to the run's own (``train.callbacks.ReportScore`` for a
    hyper-parameter search).

    ``resume``: continue the interrupted run in ``run_dir`` (same config and split) from its
    last completed epoch. ``on_start(config, n_train)`` is called with the configuration the
    run trains with (its batch size fitted to the training split) before training starts,
    e.g. to print the plan.
    """
    run_dir = Path(run_dir)
    distributed, main = num_distrib() > 1, rank_distrib() == 0
    progress = Resume.read(run_dir) if resume else None
    # Here only: the batch size this training split can fill, before the config is saved with
    # the run (the same on resume, whose saved config was fitted already).
    cfg = fit_batch_size(cfg, len(data.train_rows))
    if on_start is not None and main:
        on_start(cfg, len(data.train_rows))
    if not resume and main:
        check_run_dir(run_dir, force=force)
    run_dir.mkdir(parents=True, exist_ok=True)
    models.set_threads(cfg.threads)
    set_seed(cfg.seed, reproducible=True)
    commit = code_commit()  # of the code that trains, read before a long run
    if not resume and main:
        set_aside_finished_run(run_dir)
        cfg.save(run_dir / "config.yaml")
        with atomic_path(run_dir / "split.csv") as tmp:
            data.split.to_csv(tmp, index=False)

    # stepwise swaps learn.dls at every stage; the others train on these.
    learn = build_learner(
        cfg, data, run_dir, dls=stage_dataloaders(cfg, data, data.train_rows, cfg.batch_size), extra_cbs=callbacks
    )
    run = Run(learn, data, cfg, run_dir, resume=progress)
    run.resumer = Resume(run_dir, position=run.position, saved=progress, write=main)
    run.resumer.restore_records(learn, run)
    learn.add_cb(run.resumer)
    # Data-parallel (accelerate launch ...): fastai's DistributedTrainer wraps every fit of the recipe.
    with parallel(learn):
        stages = RECIPES[cfg.recipe](run)
    seconds = run.seconds
    if distributed:
        distrib_barrier()  # rank 0 has written the best weights
    learn.remove_cb(run.resumer)  # no more checkpoints: what follows is not training
    ema = getattr(learn, "weight_ema", None)
    average = getattr(learn, "cycle_average", None)
    if ema is not None and ema.apply():
        log.info("the bundle keeps the weight average (EMA decay %g, %d steps)", cfg.ema_decay, ema.steps)
    elif average is not None and (n := average.apply(learn.dls.train)):
        log.info("the bundle keeps the average of the last %d cycle ends (batch norm recomputed)", n)
    elif cfg.keep == "best":
        learn.best_model.restore()
    with parallel(learn):  # every rank predicts its share; fastai gathers the whole validation split
        # Calibration and thresholds are fitted on the logits the bundle will serve: with the
        # bundle's test-time augmentation when it has one.
        if (mode := models.TTA_OF_SETTING[cfg.tta]) is not None:
            logits, targets = flip_logits(learn, learn.dls.valid, mode=mode)
        else:
            logits, targets = learn.get_preds(dl=learn.dls.valid, act=lambda x: x)
    if not main:
        return TrainResult(run_dir, {}, stages, seconds, run.images_seen, run.range_test_records())
    labels = data.items["label"].astype(str).to_numpy()
    _plot_curves(run_dir)
    meta = bundle_meta(
        cfg,
        data,
        stages=stages,
        run=run,
        seconds=seconds,
        data_card=data_card,
        resumed=progress is not None,
        git_commit=commit,
    )
    models.save_bundle(learn.model, meta, run_dir, force=force or resume)
    # Calibration, operating points and the referral rule: the same sequence `dermaclass
    # calibrate` runs, on the valid logits computed above.
    metrics = calibrate_bundle(
        run_dir,
        logits=logits.numpy(),
        labels=[data.vocab[int(i)] for i in targets],
        valid_labels=labels[data.valid_rows],
        train_labels=labels[data.train_rows],
        train_images=[data.images[i] for i in data.train_rows],
        valid_images=[data.images[i] for i in data.valid_rows],
        cfg=cfg,
        ood_method=cfg.ood,
        ood_keep=cfg.ood_keep,
    )
    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)  # the new bundle is complete: the old one can go
    run.resumer.clean()  # resume files are not needed once the bundle exists
    log.info("bundle written to %s: valid balanced accuracy %.4f", run_dir, metrics["balanced_accuracy"])
    return TrainResult(run_dir, metrics, stages, seconds, run.images_seen, run.range_test_records())


def bundle_meta(
    cfg: Config,
    data: TrainData,
    *,
    stages: list[dict],
    run: Run,
    seconds: float,
    data_card: str | None,
    resumed: bool,
    git_commit: str | None,
) -> models.BundleMeta:
    """The JSON half of the bundle: everything needed to rebuild, use and judge the model
    (calibration, operating points and valid metrics are added by ``serving.refit.calibrate_bundle``)."""
    return models.BundleMeta(
        arch=cfg.arch,
        classes=tuple(data.vocab),
        class_names=data.names,
        input_size=tuple(cfg.image_size),
        normalization=models.normalization(cfg.arch),
        preprocessing={
            "decode": "RGB (EXIF-upright; gray/RGBA/CMYK/16-bit converted)",
            "resize": "cover (width, height) keeping aspect ratio, bilinear, centre crop",
            "colour_constancy": cfg.colour_constancy,
            "scale": "uint8 / 255, then (x - mean) / std",
        },
        kept_weights=(
            f"ema {cfg.ema_decay:g}"
            if cfg.ema_decay
            else f"average of the last {cfg.average_cycles} cycle ends"
            if cfg.average_cycles
            else cfg.keep
        ),
        tta=models.TTA_OF_SETTING[cfg.tta],  # what the Predictor does by default
        head={"kind": "fastai", "ps": 0.5},
        recipe=cfg.recipe,
        stages=stages,
        range_tests=run.range_test_records(),
        training={
            "seconds": round(seconds, 1),
            "images_seen": run.images_seen,
            "epochs_equivalent": round(run.images_seen / max(1, len(data.train_rows)), 2),
            "best_valid_balanced_accuracy": run.learn.best_model.best,
        },
        **provenance(cfg, data, data_card=data_card, git_commit=git_commit),
        resumed=resumed,
        processes=max(1, num_distrib()),
    )


def machine_record() -> dict[str, Any]:
    """What the bundle's training minutes were measured on. The same "2 cores" have differed
    from day to day here by 2x and more (another CPU, no bfloat16), so a time is read with its
    platform and CPU beside it."""
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "platform": platform.platform(),
    }


def provenance(cfg: Config, data: TrainData, *, data_card: str | None, git_commit: str | None) -> dict[str, Any]:
    """The BundleMeta fields that say where a bundle came from: config, data, parent, code, machine, time."""
    return dict(
        config=cfg.to_dict(),
        data={
            "sources": data.sources,
            "split_counts": data.items["split"].value_counts().to_dict(),
            "split_reuse": data.split_reuse,
            "split_file": "split.csv",
            "data_card": data_card,
        },
        parent=parent_record(cfg, data.vocab),
        package_version=dermaclass.__version__,
        machine=machine_record(),
        git_commit=git_commit,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        disclaimer=dermaclass.DISCLAIMER,
    )


def code_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _plot_curves(run_dir: Path) -> None:
    """Training curves (losses and validation balanced accuracy per epoch, stage boundaries marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "history.csv"
    if not path.is_file():
        return
    h = pd.read_csv(path)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(h["epoch"], h["train_loss"], label="train loss")
    a1.plot(h["epoch"], h["valid_loss"], label="valid loss")
    if MONITOR in h:
        a2.plot(h["epoch"], h[MONITOR], label="valid balanced accuracy", color="C2")
    if "f1_score" in h:
        a2.plot(h["epoch"], h["f1_score"], label="valid macro-F1", color="C3")
    for ax in (a1, a2):
        for e in h.loc[h["stage"].astype(str).ne(h["stage"].astype(str).shift()), "epoch"].iloc[1:]:
            ax.axvline(e - 0.5, color="grey", lw=0.7, ls=":")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    a1.set_title("loss")
    a2.set_title("validation (dotted lines: stage boundaries)")
    fig.tight_layout()
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_summary(result: TrainResult) -> Path:
    """A small JSON summary beside the bundle (what the CLI prints)."""
    return write_json(
        result.run_dir / "summary.json",
        {
            "metrics_valid": {k: result.metrics[k] for k in ("balanced_accuracy", "macro_f1", "accuracy")},
            "seconds": round(result.seconds, 1),
            "images_seen": result.images_seen,
            "stages": result.stages,
            "range_tests": result.range_tests,
        },
    )

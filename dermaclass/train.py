"""Training recipes composed from fastai: baseline, SGDR (seed 003), stepwise (seed 001).

Every recipe is a short composition of fastai calls on one ``Learner``:

- ``baseline``: ``fine_tune`` (a frozen head fit, unfreeze, ``fit_one_cycle``);
- ``sgdr`` (Mishra et al., MVA 2019, seed 003): LR range test (``lr_find``), a coarse fit of
  the head with the body frozen, then ``unfreeze`` and ``fit_sgdr`` with cycle-length
  multiplication and differential LRs ``slice(lr / ratio, lr)`` over three layer groups;
- ``stepwise`` (Prasad et al., seed 001): nested class-stratified subsets (20..100 %) trained
  in turn, each an ``sgdr`` stage, swapping ``learn.dls`` (as fastbook does for progressive
  resizing) with the batch size of Table I and the LR rule of Eq. 9 (``schedules``).

Seed 002's variant of the range test (one warm epoch at a small LR first) is an option.
Side behaviour (history, best checkpoint, early stopping, log lines) lives in Callbacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import EarlyStoppingCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, FocalLossFlat
from fastai.metrics import BalancedAccuracy, F1Score
from fastai.distributed import distrib_barrier
from fastai.torch_core import num_distrib, rank_distrib, set_seed

import dermaclass
from dermaclass import models, schedules
from dermaclass.callbacks import (
    MONITOR, PROGRESS, BestModel, Checkpoint, CPUAutocast, EpochLine, History, StopOnNaN, WeightEMA, flip_logits,
)
from dermaclass.losses import LogitAdjustedLoss
from dermaclass.lr_find import RangeTest, range_test
from dermaclass.config import Config
from dermaclass.data import DecodeCache, assign_split, make_split, read_split, validate_sources
from dermaclass.data.augment import train_pipeline
from dermaclass.data.cache import CachedImages
from dermaclass.data.labels import full_name
from dermaclass.data.splits import MIN_PER_CLASS, thin_classes
from dermaclass.data.loaders import class_weights, make_dataloaders
from dermaclass.errors import DermaclassError
from dermaclass.evaluate import (
    classification_metrics, expected_calibration_error, fit_temperature, operating_point, softmax,
)
from dermaclass.fileio import atomic_path, write_json

log = logging.getLogger(__name__)



class TrainingError(DermaclassError):
    """Training cannot run on this data (an empty split, mismatched classes)."""

    exit_code = 5


# ---- data --------------------------------------------------------------------------------
@dataclass
class TrainData:
    """Everything a recipe needs from the data, prepared once per run."""

    items: pd.DataFrame  # usable items with a ``split`` column, aligned with ``images``
    images: CachedImages  # at cfg.image_size
    vocab: list[str]
    names: dict[str, str]
    split: pd.DataFrame
    sources: list[str]
    split_reuse: dict[str, int] = field(default_factory=dict)  # kept/followed/assigned/dropped with --split-file
    images_at: dict[tuple[int, int], CachedImages] = field(default_factory=dict)  # progressive resizing: per size

    def images_of(self, size: tuple[int, int] | None) -> CachedImages:
        return self.images if size is None else self.images_at.get(tuple(size), self.images)

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(self.items["split"].to_numpy() == "train")

    @property
    def valid_rows(self) -> np.ndarray:
        return np.flatnonzero(self.items["split"].to_numpy() == "valid")

    def table(self, train_rows: np.ndarray) -> pd.DataFrame:
        """The (row, label, is_valid) table fastai reads, for a training subset + the full valid split."""
        rows = np.concatenate([train_rows, self.valid_rows])
        return pd.DataFrame(
            {"row": rows, "label": self.items["label"].to_numpy()[rows], "is_valid": np.r_[
                np.zeros(len(train_rows), bool), np.ones(len(self.valid_rows), bool)]}
        )


def prepare_data(cfg: Config, data: str | Path | Sequence[str | Path], *, progress=None) -> TrainData:
    """Load and validate one or more sources (skipping bad files), split by lesion/patient, fill the decode cache.

    With ``cfg.init_bundle`` the vocabulary is the union of the bundle's classes and the
    data's, so a class the new data lacks keeps its place (and weights) in the head.
    """
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise TrainingError("no data source given")
    sizes = planned_sizes(cfg)  # a bad --stage-sizes fails before any decoding
    items, validations = validate_sources(cfg, paths, progress=progress)
    skipped = sum(p.action == "skipped" for v in validations for p in v.problems)
    if skipped:
        log.warning("%d files skipped by validation (run `dermaclass data validate` for the list)", skipped)
    counts: dict[str, int] = {}
    if cfg.split_file:
        split, counts = assign_split(items, read_split(cfg.split_file), fractions=cfg.split_fractions, seed=cfg.seed)
    else:
        split = make_split(items, fractions=cfg.split_fractions, seed=cfg.seed)
    items = items.assign(split=split["split"].to_numpy())
    class_names: dict[str, str] = {}
    for v in validations:
        class_names.update({k: n for k, n in v.dataset.class_names.items() if k not in class_names})
    vocab = sorted(items["label"].unique().tolist())
    if cfg.init_bundle:
        parent = models.read_bundle_meta(cfg.init_bundle)
        check_class_names(parent, class_names, source=str(cfg.init_bundle))
        for c, n in (parent.get("class_names") or {}).items():
            class_names.setdefault(c, n)
        vocab = sorted(set(vocab) | set(parent["classes"]))
    for part, thin in thin_classes(items).items():
        log.warning("%s has fewer than %d images of %s: %s", part, MIN_PER_CLASS,
                    ", ".join(f"{c} ({n})" for c, n in thin.items()),
                    "the model can hardly learn them" if part == "train" else "their figures there are too noisy to judge")
    for part in ("train", "valid"):
        if not (items["split"] == part).any():
            raise TrainingError(f"{', '.join(map(str, paths))}: the {part} split is empty; add images or change --split-fractions")
    images = DecodeCache(cfg.cache_dir, cfg.image_size).ensure(
        items["path"].tolist(), items["hash"].tolist(), workers=cfg.workers or None
    )
    images_at = {tuple(cfg.image_size): images}
    for size in dict.fromkeys(sizes):
        if size not in images_at:  # progressive resizing: each stage size decoded once, cached on disk
            images_at[size] = DecodeCache(cfg.cache_dir, size).ensure(
                items["path"].tolist(), items["hash"].tolist(), workers=cfg.workers or None)
    return TrainData(
        items=items.reset_index(drop=True),
        images=images,
        vocab=vocab,
        names={c: full_name(c, class_names) for c in vocab},
        split=split,
        sources=[str(v.dataset.root) for v in validations],
        split_reuse=counts,
        images_at=images_at,
    )


def planned_sizes(cfg: Config) -> list[tuple[int, int]]:
    """The input size of every stepwise stage (progressive resizing), checked; [] for other recipes."""
    from dermaclass.errors import ConfigError

    if cfg.recipe != "stepwise":
        if cfg.stage_sizes:
            raise ConfigError(f"--stage-sizes applies to the stepwise recipe, not {cfg.recipe}")
        return []
    try:
        return schedules.stage_sizes(cfg.stage_sizes, len(schedules.check_fractions(cfg.stage_fractions)), cfg.image_size)
    except ValueError as exc:
        raise ConfigError(f"stage sizes: {exc}") from None


def inherit_bundle(cfg: Config) -> Config:
    """With ``--from BUNDLE``: the bundle's architecture and input size (its weights need them)."""
    if not cfg.init_bundle:
        return cfg
    meta = models.read_bundle_meta(cfg.init_bundle)
    size = (int(meta["input_size"][0]), int(meta["input_size"][1]))
    if cfg.arch != meta["arch"] or tuple(cfg.image_size) != size:
        log.info("continuing %s: architecture %s, input %dx%d", cfg.init_bundle, meta["arch"], *size)
    return cfg.replace(arch=meta["arch"], image_size=size, pretrained=False)


def parent_record(cfg: Config, vocab: list[str]) -> dict[str, Any] | None:
    """What the bundle records about the bundle it continued (None when trained from ImageNet)."""
    if not cfg.init_bundle:
        return None
    import hashlib

    meta = models.read_bundle_meta(cfg.init_bundle)
    weights = Path(cfg.init_bundle) / models.BUNDLE_WEIGHTS
    return {"bundle": str(cfg.init_bundle), "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "created": meta.get("created"), "classes": meta["classes"],
            "classes_added": [c for c in vocab if c not in meta["classes"]], "sources": (meta.get("data") or {}).get("sources")}


def check_class_names(parent: dict[str, Any], names: dict[str, str], *, source: str) -> None:
    """Refuse to continue a bundle whose class codes mean something else in the new data."""
    theirs = parent.get("class_names") or {}
    clash = [c for c, n in names.items() if c in theirs and theirs[c].strip().lower() != n.strip().lower()]
    if clash:
        listed = "; ".join(f"{c!r} is {theirs[c]!r} in the bundle but {names[c]!r} in the data" for c in clash)
        raise TrainingError(f"{source}: class codes conflict: {listed}. Rename the new class or relabel.")


# ---- learner and LR range test ---------------------------------------------------------
def loss_for(cfg: Config, train_labels: pd.Series, vocab: list[str]):
    """The loss for the imbalance option (weighted CE, focal, logit-adjusted, or plain CE with a balanced sampler)."""
    smoothing = {"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}
    if cfg.imbalance in ("weights", "sqrt-weights"):
        w = class_weights(train_labels, vocab, power=1.0 if cfg.imbalance == "weights" else 0.5)
        return CrossEntropyLossFlat(weight=torch.tensor(w, dtype=torch.float32), **smoothing)
    if cfg.imbalance == "logit-adjusted":
        counts = train_labels.value_counts()
        return LogitAdjustedLoss([int(counts.get(c, 0)) for c in vocab], tau=1.0, label_smoothing=cfg.label_smoothing)
    if cfg.imbalance == "focal":
        if cfg.label_smoothing:
            raise TrainingError("label smoothing is not available with --imbalance focal; choose one")
        return FocalLossFlat(gamma=2.0)
    return CrossEntropyLossFlat(**smoothing)


def build_learner(cfg: Config, data: TrainData, run_dir: Path, *, dls) -> Learner:
    """A fastai Learner on our timm model with a 3-group splitter, balanced-accuracy metrics and callbacks."""
    from fastai.callback.channelslast import ChannelsLast

    if cfg.init_bundle:
        try:
            model, _ = models.model_from_bundle(cfg.init_bundle, data.vocab)
        except models.ModelError as exc:
            raise TrainingError(str(exc)) from None
    else:
        model = models.build_model(cfg.arch, len(data.vocab), pretrained=cfg.pretrained, weights=cfg.weights)
    cbs = [ChannelsLast(), StopOnNaN(), History(run_dir / "history.csv"),
           BestModel(run_dir / "checkpoints" / "best.safetensors")]
    if not sys.stderr.isatty():
        cbs.append(EpochLine())
    if cfg.precision == "bfloat16":
        if torch.cuda.is_available():
            from fastai.callback.fp16 import MixedPrecision

            cbs.append(MixedPrecision(amp_mode="bf16"))
        else:
            cbs.append(CPUAutocast())
    if cfg.ema_decay:
        if not 0 < cfg.ema_decay < 1:
            raise TrainingError(f"--ema-decay must be in (0, 1) or 0 for off, not {cfg.ema_decay}")
        cbs.append(WeightEMA(cfg.ema_decay))
    if cfg.early_stop_patience > 0:
        cbs.append(EarlyStoppingCallback(monitor=MONITOR, comp=np.greater, patience=cfg.early_stop_patience))
    learn = Learner(
        dls, model, loss_func=loss_for(cfg, data.items["label"].iloc[data.train_rows], data.vocab),
        splitter=models.splitter, metrics=[BalancedAccuracy(), F1Score(average="macro")], path=run_dir,
        model_dir="checkpoints", wd=cfg.wd, cbs=cbs,
    )
    if not sys.stderr.isatty():
        learn.remove_cb(ProgressCallback)  # fastai's bars are \r updates: noise in a CI log
        learn.logger = lambda *_: None  # EpochLine logs instead of Recorder's raw print
    if cfg.pretrained or cfg.weights or cfg.init_bundle:
        learn.freeze()
    return learn


# ---- recipes ---------------------------------------------------------------------------
@dataclass
class Run:
    """The state of a run that the recipes share: learner, data, config, records, resume point.

    Every fit call of a recipe is a named *step* (``"2/sgdr"``: stage 2, its SGDR phase).
    ``Checkpoint`` records after each epoch which step and how many of its epochs are done;
    on ``--resume`` the recipe runs again from the top, completed steps are skipped, range
    tests return their recorded LRs, and the interrupted step continues at its next epoch
    (fastai's ``start_epoch``) with the saved weights, optimizer state and RNG state.
    """

    learn: Learner
    data: TrainData
    cfg: Config
    run_dir: Path
    range_tests: list[RangeTest] = field(default_factory=list)
    step_images: dict[str, int] = field(default_factory=dict)  # images processed per completed step
    resume: dict[str, Any] | None = None  # the progress.json of an interrupted run
    done_steps: list[str] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)
    step_name: str = ""
    prior_range_tests: list[dict] = field(default_factory=list)  # from before an interruption
    seconds_before: float = 0.0  # training time before an interruption
    t0: float = field(default_factory=time.perf_counter)

    def range_test_records(self) -> list[dict]:
        return self.prior_range_tests + [t.to_dict() for t in self.range_tests]

    @property
    def images_seen(self) -> int:
        """Seed 001's cost measure: images processed by training steps (epochs x images)."""
        return sum(self.step_images.values())

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def set_phase(self, stage: str, phase: str) -> None:
        hist = self.learn.history if hasattr(self.learn, "history") else None
        if hist is not None:
            hist.stage, hist.phase = stage, phase

    def base_lr(self, name: str) -> float:
        if self.cfg.lr is not None:
            return self.cfg.lr
        if self.resume and name in self.resume.get("lrs", {}):
            self.lrs[name] = self.resume["lrs"][name]
            return self.lrs[name]
        hist = self.learn.history if hasattr(self.learn, "history") else None
        if hist is not None:
            hist.phase = "warm"  # seed 002's warm epoch, when configured, is real training
        if num_distrib() > 1:
            # Data-parallel: rank 0 alone runs the range test on its unwrapped model (a range test
            # stops at a divergence that ranks would reach at different steps), the others wait for
            # its LR. The next fit re-syncs the weights from rank 0 when DDP wraps the model.
            chosen: list[Any] = [None]
            if rank_distrib() == 0:
                with self.learn.removed_cbs(self.learn.distributed_trainer), _single_process():
                    test = range_test(self.learn, self.cfg, self.run_dir, name)
                chosen = [test]
            torch.distributed.broadcast_object_list(chosen, src=0)
            test = chosen[0]
        else:
            test = range_test(self.learn, self.cfg, self.run_dir, name)
        self.range_tests.append(test)
        self.lrs[name] = test.chosen
        return test.chosen

    def stage_started(self, stage: int) -> bool:
        """Whether the interrupted run being resumed had begun this stage (its records stand)."""
        if self.resume is None:
            return False
        prefix = f"{stage}/"
        return self.resume.get("step", "").startswith(prefix) or any(
            d.startswith(prefix) for d in self.resume.get("done_steps", []))

    def step(self, name: str, n_epoch: int, n_train: int, fit) -> None:  # noqa: ANN001 - fit(start_epoch)
        """Run one fit call of the recipe, or skip / continue it when resuming."""
        start = 0
        if self.resume is not None:
            if name in self.resume["done_steps"]:
                self.step_images[name] = self.resume["step_images"][name]
                self.done_steps.append(name)
                return
            start = self.resume["epoch_in_step"] if self.resume["step"] == name else 0
            self._restore(opt=start > 0)
        self.step_name = name
        if n_epoch > start:
            fit(start)
        self.step_images[name] = n_epoch * n_train
        self.done_steps.append(name)

    def _restore(self, *, opt: bool) -> None:
        """Load the checkpoint of the interrupted run (once, at the first step not completed)."""
        import random

        from safetensors.torch import load_file

        state, self.resume = self.resume, None
        ckpt = self.run_dir / "checkpoints"
        self.learn.model.load_state_dict(load_file(str(ckpt / state["weights"])))
        if opt:
            if self.learn.opt is None:
                self.learn.create_opt()
            from fastcore.foundation import L

            sd = torch.load(ckpt / state["optimizer"], weights_only=True)
            self.learn.opt.load_state_dict({"state": sd["state"], "hypers": L(sd["hypers"])})
        ema = getattr(self.learn, "weight_ema", None)
        if ema is not None and state.get("ema") and (ckpt / state["ema"]).is_file():
            ema.load(load_file(str(ckpt / state["ema"])), int(state.get("ema_steps", 0)))
        rng = state.get("rng") or {}
        if rng:
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
            np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        log.info("resumed at step %s, epoch %d", state["step"], state["epoch_in_step"])

    def progress(self) -> dict[str, Any]:
        """What Checkpoint writes to progress.json (with the epoch count it adds)."""
        import random

        py = random.getstate()
        np_state = np.random.get_state()
        return {
            "recipe": self.cfg.recipe, "step": self.step_name,
            "done_steps": list(self.done_steps), "lrs": dict(self.lrs),
            "range_tests": self.range_test_records(),
            "step_images": dict(self.step_images),  # completed steps only
            "seconds": round(self.seconds, 1),
            "history_rows": len(self.learn.history.rows),
            "best": self.learn.best_model.best if math.isfinite(self.learn.best_model.best) else None,
            "rng": {"python": [py[0], list(py[1]), py[2]],
                    "numpy": [np_state[0], np_state[1].tolist(), *[int(v) if isinstance(v, (int, np.integer)) else float(v)
                                                                   for v in np_state[2:]]],
                    "torch": torch.get_rng_state().tolist()},
        }


def _sgdr_stage(run: Run, *, stage: str, lr: float, head_epochs: int, n_train: int) -> None:
    """Seed 003: a coarse head-only fit, then SGDR + cycle-length multiplication + differential LRs."""
    cfg, learn = run.cfg, run.learn
    if head_epochs:
        run.set_phase(stage, "head")
        learn.freeze()
        run.step(f"{stage}/head", head_epochs, n_train, lambda s: learn.fit_one_cycle(head_epochs, lr, start_epoch=s))
    run.set_phase(stage, "sgdr")
    learn.unfreeze()
    n = schedules.sgdr_epochs(cfg.n_cycles, cfg.cycle_len, cfg.cycle_mult)
    run.step(f"{stage}/sgdr", n, n_train, lambda s: learn.fit_sgdr(
        cfg.n_cycles, cfg.cycle_len, lr_max=slice(lr / cfg.lr_ratio, lr), cycle_mult=cfg.cycle_mult, start_epoch=s))


def recipe_baseline(run: Run) -> list[dict]:
    """fastai ``fine_tune``, spelt out as its two ``fit_one_cycle`` calls so that each can resume:
    a frozen head fit at the base LR, then unfreeze and one-cycle at half of it with
    discriminative LRs (fastai's defaults: pct_start 0.99 then 0.3, div 5)."""
    cfg, n, learn = run.cfg, len(run.data.train_rows), run.learn
    lr = run.base_lr("baseline")
    run.set_phase("1", "head")
    learn.freeze()
    if cfg.head_epochs:
        run.step("1/head", cfg.head_epochs, n, lambda s: learn.fit_one_cycle(
            cfg.head_epochs, slice(lr), pct_start=0.99, start_epoch=s))
    run.set_phase("1", "fine_tune")
    learn.unfreeze()
    half = lr / 2
    run.step("1/fine_tune", cfg.epochs, n, lambda s: learn.fit_one_cycle(
        cfg.epochs, slice(half / cfg.lr_ratio, half), pct_start=0.3, div=5.0, start_epoch=s))
    return [{"stage": 1, "fraction": 1.0, "images": n, "batch_size": cfg.batch_size, "lr": lr,
             "epochs": cfg.head_epochs + cfg.epochs}]


def recipe_sgdr(run: Run) -> list[dict]:
    """Seed 003 on the whole training split."""
    cfg, n = run.cfg, len(run.data.train_rows)
    lr = run.base_lr("sgdr")
    _sgdr_stage(run, stage="1", lr=lr, head_epochs=cfg.head_epochs, n_train=n)
    return [{"stage": 1, "fraction": 1.0, "images": n, "batch_size": cfg.batch_size, "lr": lr,
             "epochs": cfg.head_epochs + schedules.sgdr_epochs(cfg.n_cycles, cfg.cycle_len, cfg.cycle_mult)}]


def fit_batch_size(cfg: Config, n_train: int) -> Config:
    """The config with a batch size this training split can fill (small clinic datasets), or a
    TrainingError (exit 5) that says how many images are needed.

    Every stage must get ``schedules.MIN_BATCHES`` full batches per epoch: with fewer, fastai's
    range test divides by zero and training runs on nothing (a NaN loss, an untrained bundle).
    """
    fractions = cfg.stage_fractions if cfg.recipe == "stepwise" else None
    b = schedules.largest_batch_size(n_train=n_train, batch_size=cfg.batch_size, fractions=fractions)
    if b >= cfg.batch_size:
        return cfg
    smallest = f"its smallest stage ({cfg.stage_fractions[0]:.0%} of them)" if fractions else "it"
    if b < schedules.MIN_BATCH_SIZE:
        need = schedules.images_needed(batch_size=schedules.MIN_BATCH_SIZE, fractions=fractions)
        raise TrainingError(
            f"{n_train} training images are too few for the {cfg.recipe} recipe: {smallest} needs "
            f"{schedules.MIN_BATCHES} batches of at least {schedules.MIN_BATCH_SIZE} images. Add images (at least "
            f"{need} in the training split, i.e. about {math.ceil(need / 0.7)} in all with the default 70 % split)"
            + (" or use --recipe baseline" if fractions else ""))
    log.warning("batch size %d -> %d: %d training images give %s fewer than %d full batches of %d",
                cfg.batch_size, b, n_train, smallest, schedules.MIN_BATCHES, cfg.batch_size)
    return cfg.replace(batch_size=b)


def plan_for(cfg: Config, n_train: int) -> list[schedules.Stage]:
    """The stepwise stage plan for this config (a pure function, printed before training)."""
    return schedules.stage_plan(
        n_train=n_train, fractions=cfg.stage_fractions, batch_size=cfg.batch_size, lr=cfg.lr, lr_rule=cfg.lr_rule,
        head_epochs=cfg.head_epochs, n_cycles=cfg.n_cycles, cycle_len=cfg.cycle_len, cycle_mult=cfg.cycle_mult,
        weight_sharing=cfg.weight_sharing, sizes=planned_sizes(cfg) if cfg.stage_sizes else None,
    )


def recipe_stepwise(run: Run) -> list[dict]:
    """Seed 001: nested subsets in turn, swapping ``learn.dls``; each stage an SGDR stage."""
    cfg, data, learn = run.cfg, run.data, run.learn
    train_rows = data.train_rows
    plan = plan_for(cfg, len(train_rows))
    subsets = schedules.nested_subsets(data.items["label"].to_numpy()[train_rows], cfg.stage_fractions, seed=cfg.seed)
    initial = models.freeze_state(learn.model) if not cfg.weight_sharing else None
    lr1 = None
    done = []
    size = None
    for stage, subset in zip(plan, subsets):
        rows = train_rows[subset]
        learn.dls = stage_dataloaders(cfg, data, rows, stage.batch_size, size=stage.size)
        if stage.size != size and size is not None and not run.stage_started(stage.stage):
            # Progressive resizing: the best checkpoint is chosen among epochs at the final size only
            # (validation figures at a smaller size are not comparable, and the bundle is used at the last).
            learn.best_model.reset()
        size = stage.size
        if initial is not None:
            learn.model.load_state_dict(initial)
            learn.opt = None
        if cfg.pretrained or cfg.weights or cfg.init_bundle:
            learn.freeze()  # the range test before a head fit measures the head alone
        if stage.range_test:
            base = run.base_lr(f"stage{stage.stage}") if stage.head_epochs else _unfrozen_lr(run, stage.stage)
        else:
            base = cfg.lr if cfg.lr is not None else lr1
        if lr1 is None:
            lr1 = base
        lr = base * stage.lr_factor
        log.info("stage %d/%d: %d images, batch %d, lr %.2e", stage.stage, len(plan), len(rows), stage.batch_size, lr)
        _sgdr_stage(run, stage=str(stage.stage), lr=lr, head_epochs=stage.head_epochs, n_train=len(rows))
        done.append({**stage.to_dict(), "images": int(len(rows)), "base_lr": base, "lr": lr})
    return done


def _unfrozen_lr(run: Run, stage: int) -> float:
    run.learn.unfreeze()
    return run.base_lr(f"stage{stage}")


def stage_dataloaders(cfg: Config, data: TrainData, rows: np.ndarray, batch_size: int,
                      size: tuple[int, int] | None = None):
    """DataLoaders for a training subset (rows of ``data.items``) and the full validation split,
    at ``size`` (progressive resizing; default: the run's image size)."""
    return make_dataloaders(
        data.table(rows), data.images_of(size), data.vocab, batch_size=batch_size,
        normalization=models.normalization(cfg.arch),
        augment=train_pipeline(cfg.augment, tuple(size or cfg.image_size)), balanced_sampler=cfg.imbalance == "sampler",
        colour_constancy=cfg.colour_constancy,
    )


RECIPES = {"baseline": recipe_baseline, "sgdr": recipe_sgdr, "stepwise": recipe_stepwise}


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
RUN_FILES = (models.BUNDLE_META, models.BUNDLE_WEIGHTS, "model.onnx", "config.yaml", "split.csv", "history.csv",
             "summary.json", PROGRESS)


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
    if (run_dir / PROGRESS).is_file():
        raise FileExistsError(f"{run_dir}: holds an interrupted run; continue it with --resume")
    if (run_dir / "config.yaml").is_file():
        raise FileExistsError(f"{run_dir}: holds a run that stopped before its first epoch ended, so there is "
                              "nothing to resume; start it again")
    if any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: not empty, and not a run folder")


@contextlib.contextmanager
def _single_process():
    """fastai reads WORLD_SIZE to decide whether to sync (lr_find's save/load call a barrier):
    while rank 0 runs a range test alone, it must see a world of one."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def _gloo_broadcast(self, t, rank):  # noqa: ANN001 - fastai's DistributedDL._broadcast signature
    """fastai's DistributedDL._broadcast moves the index tensor to CUDA because NCCL needs it;
    gloo (CPU data-parallel) needs it on the CPU. Same contract otherwise."""
    t = torch.LongTensor(t)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()


def read_progress(run_dir: Path) -> dict[str, Any]:
    """The progress.json of an interrupted run, checked."""
    path = run_dir / PROGRESS
    if (run_dir / models.BUNDLE_META).exists():
        raise TrainingError(f"{run_dir}: this run already finished (its bundle is there); nothing to resume")
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no {PROGRESS} (the run stopped before its first epoch ended); start it again")
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TrainingError(f"{path}: unreadable ({exc})") from None
    if not (run_dir / "checkpoints" / progress.get("weights", "?")).is_file():
        raise TrainingError(f"{path}: its checkpoint {progress.get('weights')} is missing")
    return progress


def train(cfg: Config, data: TrainData, run_dir: str | Path, *, force: bool = False, data_card: str | None = None,
          resume: bool = False) -> TrainResult:
    """Run ``cfg.recipe`` on prepared data and write the run folder and the model bundle.

    ``resume``: continue the interrupted run in ``run_dir`` (same config and split) from its
    last completed epoch.
    """
    run_dir = Path(run_dir)
    distributed, main = num_distrib() > 1, rank_distrib() == 0
    progress = read_progress(run_dir) if resume else None
    if not resume:
        cfg = fit_batch_size(cfg, len(data.train_rows))  # before the config is saved with the run
    if not resume and main:
        check_run_dir(run_dir, force=force)
    run_dir.mkdir(parents=True, exist_ok=True)
    models.set_threads(cfg.threads)
    set_seed(cfg.seed, reproducible=True)
    commit = _git_commit()  # of the code that trains, read before a long run
    if not resume and main:
        set_aside_finished_run(run_dir)
        cfg.save(run_dir / "config.yaml")
        with atomic_path(run_dir / "split.csv") as tmp:
            data.split.to_csv(tmp, index=False)

    # stepwise swaps learn.dls at every stage; the others train on these.
    learn = build_learner(cfg, data, run_dir, dls=stage_dataloaders(cfg, data, data.train_rows, cfg.batch_size))
    run = Run(learn, data, cfg, run_dir, resume=progress)
    if progress is not None:
        history = pd.read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else pd.DataFrame()
        learn.history.rows = history.head(progress["history_rows"]).to_dict("records")
        learn.best_model.best = progress["best"] if progress.get("best") is not None else -math.inf
        run.prior_range_tests, run.seconds_before = progress.get("range_tests", []), progress.get("seconds", 0.0)
    if main:
        learn.add_cb(Checkpoint(run_dir / "checkpoints", run.progress))
    # Data-parallel (accelerate launch ...): fastai's DistributedTrainer wraps every fit of the
    # recipe; on CPU the gloo backend, and no SyncBatchNorm (it needs CUDA).
    cuda = torch.cuda.is_available()
    if distributed and not cuda:
        from fastai.distributed import DistributedDL

        DistributedDL._broadcast = _gloo_broadcast
    def parallel():  # noqa: ANN202
        return learn.distrib_ctx(sync_bn=cuda, cpu=not cuda) if distributed else contextlib.nullcontext()

    with parallel():
        stages = RECIPES[cfg.recipe](run)
    seconds = run.seconds
    if distributed:
        distrib_barrier()  # rank 0 has written the best weights
    if main:
        learn.remove_cb(learn.checkpoint)
    ema = getattr(learn, "weight_ema", None)
    if ema is not None and ema.apply():
        log.info("the bundle keeps the weight average (EMA decay %g, %d steps)", cfg.ema_decay, ema.steps)
    elif cfg.keep == "best":
        learn.best_model.restore()
    with parallel():  # every rank predicts its share; fastai gathers the whole validation split
        # Calibration and thresholds are fitted on the logits the bundle will serve: with the
        # bundle's test-time augmentation when it has one.
        if cfg.tta == "flips":
            logits, targets = flip_logits(learn, learn.dls.valid)
        else:
            logits, targets = learn.get_preds(dl=learn.dls.valid, act=lambda x: x)
    if not main:
        return TrainResult(run_dir, {}, stages, seconds, run.images_seen, run.range_test_records())
    calibration, points, probs = calibrate(cfg, logits.numpy(), targets.numpy(), data.vocab)
    metrics = classification_metrics(targets.numpy(), probs, data.vocab)
    _plot_curves(run_dir)
    meta = bundle_meta(cfg, data, metrics, stages, run, seconds, data_card)
    meta.update(calibration=calibration, operating_points=points, resumed=progress is not None, git_commit=commit,
                processes=max(1, num_distrib()))
    models.save_bundle(learn.model, meta, run_dir, force=force or resume)
    # The out-of-distribution score reads the saved bundle exactly as the app will.
    from dermaclass.inference import fit_ood

    labels = data.items["label"].astype(str).to_numpy()
    fit_ood(run_dir, train_images=[data.images[i] for i in data.train_rows], train_labels=labels[data.train_rows],
            valid_images=[data.images[i] for i in data.valid_rows], valid_labels=labels[data.valid_rows],
            method=cfg.ood, keep=cfg.ood_keep, force=True)  # the bundle was just written
    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)  # the new bundle is complete: the old one can go
    for f in (run_dir / "checkpoints").glob("*-*"):
        if f.name.startswith(("weights-", "opt-", "ema-")):
            f.unlink(missing_ok=True)  # resume files are not needed once the bundle exists
    log.info("bundle written to %s: valid balanced accuracy %.4f", run_dir, metrics["balanced_accuracy"])
    return TrainResult(run_dir, metrics, stages, seconds, run.images_seen, run.range_test_records())


def calibrate(cfg: Config, logits: np.ndarray, labels: np.ndarray, vocab: list[str]) -> tuple[dict, dict, np.ndarray]:
    """Temperature scaling, operating points and the referral rule, fitted on the validation split.

    Returns the bundle's ``calibration`` and ``operating_points`` entries and the calibrated
    validation probabilities. Every later prediction divides the logits by this temperature.
    The referral rule (``calibration.refer``) is fitted on the saved bundle by
    ``inference.fit_ood``, since its score reads the bundle's features as the app does.
    """
    t = fit_temperature(logits, labels)
    raw, probs = softmax(logits), softmax(logits, t)
    before, after = expected_calibration_error(labels, raw), expected_calibration_error(labels, probs)
    refused = before is not None and after is not None and after > before
    if refused:  # NLL and ECE can disagree on a small validation split: never ship a worse calibration
        log.warning("temperature %.3f would make validation ECE worse (%.4f -> %.4f); keeping T = 1", t, before, after)
        t, probs, after = 1.0, raw, before
    calibration = {"method": "temperature", "temperature": t, "fitted_on": "valid", "n": int(len(labels)),
                   "ece_before": before, "ece_after": after,
                   **({"refused": "the fitted temperature made validation ECE worse; T = 1 kept"} if refused else {})}
    log.info("temperature %.3f: valid ECE %.4f -> %.4f", t, calibration["ece_before"] or 0, calibration["ece_after"] or 0)
    points = {}
    for cls in cfg.operating_classes:
        if cls not in vocab:
            log.warning("operating class %r is not among the classes %s; no threshold for it", cls, vocab)
            continue
        op = operating_point(labels, probs, vocab.index(cls), target_sensitivity=cfg.target_sensitivity)
        points[cls] = {"threshold": op["threshold"], "target_sensitivity": cfg.target_sensitivity,
                       "valid_sensitivity": op["sensitivity"], "valid_specificity": op["specificity"]}
        if op["threshold"] is not None:
            log.info("operating point %s: P >= %.4f gives valid sensitivity %.3f, specificity %.3f",
                     cls, op["threshold"], op["sensitivity"], op["specificity"])
    return calibration, points, probs


def bundle_meta(cfg: Config, data: TrainData, metrics: dict, stages: list[dict], run: Run, seconds: float,
                data_card: str | None) -> dict[str, Any]:
    """The JSON half of the bundle: everything needed to rebuild, use and judge the model."""
    return {
        "arch": cfg.arch,
        "classes": data.vocab,
        "class_names": data.names,
        "input_size": list(cfg.image_size),
        "normalization": models.normalization(cfg.arch),
        "preprocessing": {"decode": "RGB (EXIF-upright; gray/RGBA/CMYK/16-bit converted)",
                          "resize": "cover (width, height) keeping aspect ratio, bilinear, centre crop",
                          "colour_constancy": cfg.colour_constancy,
                          "scale": "uint8 / 255, then (x - mean) / std"},
        "kept_weights": f"ema {cfg.ema_decay:g}" if cfg.ema_decay else cfg.keep,
        "tta": "flips4" if cfg.tta == "flips" else None,  # what the Predictor does by default
        "head": {"kind": "fastai", "ps": 0.5},
        "metrics_valid": metrics,
        "recipe": cfg.recipe,
        "stages": stages,
        "range_tests": run.range_test_records(),
        "training": {"seconds": round(seconds, 1), "images_seen": run.images_seen,
                     "epochs_equivalent": round(run.images_seen / max(1, len(data.train_rows)), 2),
                     "best_valid_balanced_accuracy": run.learn.best_model.best},
        "config": cfg.to_dict(),
        "data": {"sources": data.sources, "split_counts": data.items["split"].value_counts().to_dict(),
                 "split_reuse": data.split_reuse,
                 "split_file": "split.csv", "data_card": data_card},
        "parent": parent_record(cfg, data.vocab),
        "package_version": dermaclass.__version__,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "git_commit": None,  # set by train() from the commit read before training
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": dermaclass.DISCLAIMER,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5, check=True)
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
    return write_json(result.run_dir / "summary.json", {
        "metrics_valid": {k: result.metrics[k] for k in ("balanced_accuracy", "macro_f1", "accuracy")},
        "seconds": round(result.seconds, 1), "images_seen": result.images_seen, "stages": result.stages,
        "range_tests": result.range_tests,
    })


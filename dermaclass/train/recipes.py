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

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import EarlyStoppingCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, FocalLossFlat
from fastai.metrics import BalancedAccuracy, F1Score

from dermaclass import models, schedules
from dermaclass.config import Config
from dermaclass.data.augment import train_pipeline
from dermaclass.data.loaders import class_weights, make_dataloaders
from dermaclass.train.callbacks import (
    MONITOR,
    SAM,
    BestModel,
    CPUAutocast,
    CycleAverage,
    Distill,
    EpochLine,
    HeadNormFloor,
    History,
    StopOnNaN,
    WeightEMA,
)
from dermaclass.train.data import TrainData, TrainingError, planned_sizes
from dermaclass.train.distributed import on_rank0
from dermaclass.train.losses import LogitAdjustedLoss
from dermaclass.train.lr_find import RangeTest, range_test

log = logging.getLogger(__name__)


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
    if cfg.imbalance == "focal":  # no label smoothing: Config refuses the pair
        return FocalLossFlat(gamma=2.0)
    return CrossEntropyLossFlat(**smoothing)


def build_learner(cfg: Config, data: TrainData, run_dir: Path, *, dls, extra_cbs: Sequence[Callback] = ()) -> Learner:
    """A fastai Learner on our timm model with a 3-group splitter, balanced-accuracy metrics and
    callbacks (the run's own, then ``extra_cbs`` from the caller, e.g. a search's pruning report)."""
    from fastai.callback.channelslast import ChannelsLast

    if cfg.init_bundle:
        try:
            model, _ = models.model_from_bundle(cfg.init_bundle, data.vocab)
        except models.ModelError as exc:
            raise TrainingError(str(exc)) from None
    else:
        model = models.build_model(cfg.arch, len(data.vocab), pretrained=cfg.pretrained, weights=cfg.weights)
    cbs = [
        ChannelsLast(),
        StopOnNaN(),
        History(run_dir / "history.csv"),
        BestModel(run_dir / "checkpoints" / "best.safetensors"),
    ]
    if not sys.stderr.isatty():
        cbs.append(EpochLine())
    if cfg.precision == "bfloat16":
        if torch.cuda.is_available():
            from fastai.callback.fp16 import MixedPrecision

            cbs.append(MixedPrecision(amp_mode="bf16"))
        else:
            cbs.append(CPUAutocast())
    # The combinations that cannot run (EMA with cycle averages, mixing with the logit-adjusted
    # loss, distillation with mixing or SAM) were refused when the Config was built.
    if cfg.head_norm_floor:
        cbs.append(HeadNormFloor(cfg.head_norm_floor))
    if cfg.ema_decay:
        cbs.append(WeightEMA(cfg.ema_decay))
    if cfg.average_cycles:
        cbs.append(CycleAverage(cfg.average_cycles))
    loss_func = loss_for(cfg, data.items["label"].iloc[data.train_rows], data.vocab)
    if cfg.mix != "none":
        from fastai.callback.mixup import CutMix, MixUp

        mixer = MixUp if cfg.mix == "mixup" else CutMix
        cbs.append(mixer() if cfg.mix_alpha is None else mixer(cfg.mix_alpha))
    if cfg.sam_rho:
        cbs.append(SAM(cfg.sam_rho))
    if data.soft_targets is not None:
        cbs.append(
            Distill(torch.from_numpy(data.soft_targets), alpha=cfg.distill_alpha, temperature=cfg.distill_temperature)
        )
    if cfg.early_stop_patience > 0:
        cbs.append(EarlyStoppingCallback(monitor=MONITOR, comp=np.greater, patience=cfg.early_stop_patience))
    cbs.extend(extra_cbs)
    learn = Learner(
        dls,
        model,
        loss_func=loss_func,
        splitter=models.splitter,
        metrics=[BalancedAccuracy(), F1Score(average="macro")],
        path=run_dir,
        model_dir="checkpoints",
        wd=cfg.wd,
        cbs=cbs,
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
    ``Resume`` records after each epoch which step and how many of its epochs are done;
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
    resumer: Any = None  # train.resume.Resume: restores the interrupted run's weights and state
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

    def lr_or_range_test(self, name: str) -> float:
        """The fixed LR, or one picked by a range test (fastai ``lr_find``), which trains: with
        ``warm_epoch`` a whole epoch at a small LR first (seed 002), then the test's own batches
        (fastai restores the weights afterwards). On resume, the LR the interrupted run chose."""
        if self.cfg.lr is not None:
            return self.cfg.lr
        if self.resume and name in self.resume.get("lrs", {}):
            self.lrs[name] = self.resume["lrs"][name]
            return self.lrs[name]
        hist = self.learn.history if hasattr(self.learn, "history") else None
        if hist is not None:
            hist.phase = "warm"  # seed 002's warm epoch, when configured, is real training
        # Data-parallel: rank 0 alone runs the range test, the others wait for its LR.
        test = on_rank0(
            self.learn, lambda: range_test(self.learn, self.run_dir, name, **self.cfg.range_test_settings())
        )
        self.range_tests.append(test)
        self.lrs[name] = test.chosen
        return test.chosen

    def stage_started(self, stage: int) -> bool:
        """Whether the interrupted run being resumed had begun this stage (its records stand)."""
        if self.resume is None:
            return False
        prefix = f"{stage}/"
        return self.resume.get("step", "").startswith(prefix) or any(
            d.startswith(prefix) for d in self.resume.get("done_steps", [])
        )

    def step(self, name: str, n_epoch: int, n_train: int, fit) -> None:  # noqa: ANN001 - fit(start_epoch)
        """Run one fit call of the recipe, or skip / continue it when resuming."""
        start = 0
        if self.resume is not None:
            if name in self.resume["done_steps"]:
                self.step_images[name] = self.resume["step_images"][name]
                self.done_steps.append(name)
                return
            start = self.resume["epoch_in_step"] if self.resume["step"] == name else 0
            self.resume = None  # from here on the run goes on as a fresh one would
            if self.resumer is not None:
                self.resumer.restore(self.learn, opt=start > 0)
        self.step_name = name
        if n_epoch > start:
            fit(start)
        self.step_images[name] = n_epoch * n_train
        self.done_steps.append(name)

    def position(self) -> dict[str, Any]:
        """Where the recipe is (what ``Resume`` writes to progress.json, with the RNG states and
        the epoch count it adds)."""
        return {
            "recipe": self.cfg.recipe,
            "step": self.step_name,
            "done_steps": list(self.done_steps),
            "lrs": dict(self.lrs),
            "range_tests": self.range_test_records(),
            "step_images": dict(self.step_images),  # completed steps only
            "seconds": round(self.seconds, 1),
            "history_rows": len(self.learn.history.rows),
            "best": self.learn.best_model.best if math.isfinite(self.learn.best_model.best) else None,
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
    run.step(
        f"{stage}/sgdr",
        n,
        n_train,
        lambda s: learn.fit_sgdr(
            cfg.n_cycles, cfg.cycle_len, lr_max=slice(lr / cfg.lr_ratio, lr), cycle_mult=cfg.cycle_mult, start_epoch=s
        ),
    )


def recipe_baseline(run: Run) -> list[dict]:
    """fastai ``fine_tune``, spelt out as its two ``fit_one_cycle`` calls so that each can resume:
    a frozen head fit at the base LR, then unfreeze and one-cycle at half of it with
    discriminative LRs (fastai's defaults: pct_start 0.99 then 0.3, div 5)."""
    cfg, n, learn = run.cfg, len(run.data.train_rows), run.learn
    lr = run.lr_or_range_test("baseline")
    run.set_phase("1", "head")
    learn.freeze()
    if cfg.head_epochs:
        run.step(
            "1/head",
            cfg.head_epochs,
            n,
            lambda s: learn.fit_one_cycle(cfg.head_epochs, slice(lr), pct_start=0.99, start_epoch=s),
        )
    run.set_phase("1", "fine_tune")
    learn.unfreeze()
    half = lr / 2
    run.step(
        "1/fine_tune",
        cfg.epochs,
        n,
        lambda s: learn.fit_one_cycle(
            cfg.epochs, slice(half / cfg.lr_ratio, half), pct_start=0.3, div=5.0, start_epoch=s
        ),
    )
    return [
        {
            "stage": 1,
            "fraction": 1.0,
            "images": n,
            "batch_size": cfg.batch_size,
            "lr": lr,
            "epochs": cfg.head_epochs + cfg.epochs,
        }
    ]


def recipe_sgdr(run: Run) -> list[dict]:
    """Seed 003 on the whole training split."""
    cfg, n = run.cfg, len(run.data.train_rows)
    lr = run.lr_or_range_test("sgdr")
    _sgdr_stage(run, stage="1", lr=lr, head_epochs=cfg.head_epochs, n_train=n)
    return [
        {
            "stage": 1,
            "fraction": 1.0,
            "images": n,
            "batch_size": cfg.batch_size,
            "lr": lr,
            "epochs": cfg.head_epochs + schedules.sgdr_epochs(cfg.n_cycles, cfg.cycle_len, cfg.cycle_mult),
        }
    ]


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
            + (" or use --recipe baseline" if fractions else "")
        )
    log.warning(
        "batch size %d -> %d: %d training images give %s fewer than %d full batches of %d",
        cfg.batch_size,
        b,
        n_train,
        smallest,
        schedules.MIN_BATCHES,
        cfg.batch_size,
    )
    return cfg.replace(batch_size=b)


def plan_for(cfg: Config, n_train: int) -> list[schedules.Stage]:
    """The stepwise stage plan for this config (a pure function, printed before training)."""
    return schedules.stage_plan(
        n_train=n_train,
        fractions=cfg.stage_fractions,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_rule=cfg.lr_rule,
        head_epochs=cfg.head_epochs,
        n_cycles=cfg.n_cycles,
        cycle_len=cfg.cycle_len,
        cycle_mult=cfg.cycle_mult,
        weight_sharing=cfg.weight_sharing,
        sizes=planned_sizes(cfg) if cfg.stage_sizes else None,
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
            base = (
                run.lr_or_range_test(f"stage{stage.stage}")
                if stage.head_epochs
                else _unfreeze_then_lr(run, stage.stage)
            )
        else:
            base = cfg.lr if cfg.lr is not None else lr1
        if lr1 is None:
            lr1 = base
        lr = base * stage.lr_factor
        log.info("stage %d/%d: %d images, batch %d, lr %.2e", stage.stage, len(plan), len(rows), stage.batch_size, lr)
        _sgdr_stage(run, stage=str(stage.stage), lr=lr, head_epochs=stage.head_epochs, n_train=len(rows))
        done.append({**stage.to_dict(), "images": int(len(rows)), "base_lr": base, "lr": lr})
    return done


def _unfreeze_then_lr(run: Run, stage: int) -> float:
    """Unfreeze the whole network, then its LR (a range test of the unfrozen net when asked)."""
    run.learn.unfreeze()
    return run.lr_or_range_test(f"stage{stage}")


def stage_dataloaders(
    cfg: Config, data: TrainData, rows: np.ndarray, batch_size: int, size: tuple[int, int] | None = None
):
    """DataLoaders for a training subset (rows of ``data.items``) and the full validation split,
    at ``size`` (progressive resizing; default: the run's image size)."""
    return make_dataloaders(
        data.table(rows),
        data.images_of(size),
        data.vocab,
        batch_size=batch_size,
        normalization=models.normalization(cfg.arch),
        augment=train_pipeline(cfg.augment, tuple(size or cfg.image_size)),
        balanced_sampler=cfg.imbalance == "sampler",
        colour_constancy=cfg.colour_constancy,
        rows_input=data.soft_targets is not None,
    )


RECIPES = {"baseline": recipe_baseline, "sgdr": recipe_sgdr, "stepwise": recipe_stepwise}

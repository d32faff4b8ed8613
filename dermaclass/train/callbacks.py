"""fastai Callbacks for the side behaviour of a training run.

- ``History``: one row per epoch (stage, phase, losses, metrics, LR, seconds) in
  ``history.csv``, rewritten atomically after every epoch;
- ``EpochLine``: a plain log line per epoch where fastai's progress bars would be noise (CI);
- ``BestModel``: the weights with the best validation balanced accuracy over the whole run
  (all stepwise stages), kept as safetensors, restored at the end;
- ``WeightEMA``: an exponential moving average of the weights (timm's ``ModelEmaV3``);
- ``CycleAverage``: the average of the weights at the last SGDR cycle ends (SWA on seed
  003's warm restarts), batch-norm statistics recomputed (``torch.optim.swa_utils.update_bn``);
- ``SAM``: sharpness-aware minimisation (seed 002), a second gradient at the perturbed weights;
- ``StopOnNaN``: a non-finite training loss stops the run at once with exit 5 (no bundle is
  written from a diverged model), as fastai's ``TerminateOnNaNCallback`` but loud;
- ``HeadNormFloor``: a floor on the head's batch-norm running variances, so a unit that was
  almost never on in training cannot blow up the logits of an image that turns it on;
- ``FlipInput``: flips every input batch, for test-time augmentation through ``get_preds``
  (``flip_logits`` averages the four flips, as the Predictor does at inference);
They react to real training epochs only, never to a range test or ``get_preds``. The
checkpoints of ``--resume`` are ``train.resume.Resume``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.torch_core import rank_distrib

from dermaclass.errors import NonFiniteLoss
from dermaclass.fileio import atomic_path

log = logging.getLogger(__name__)

MONITOR = "balanced_accuracy_score"  # fastai's name for BalancedAccuracy()


class EpochCallback(Callback):
    """Reacts to the end of real training epochs only: not range tests, not ``get_preds``
    (fastai's Learner fires before_fit/after_epoch around get_preds too, but never before_train)."""

    def before_train(self) -> None:
        self.trained = getattr(self.learn, "lr_finder", None) is None

    def after_epoch(self) -> None:
        if getattr(self, "trained", False):
            self.trained = False
            self.epoch_done()

    def epoch_done(self) -> None:
        raise NotImplementedError


class History(EpochCallback):
    """One row per epoch (stage, phase, losses, metrics, LR, seconds) in ``history.csv``, atomically.

    Not fastai's ``CSVLogger``: it appends to an open file (a crash can leave half a row), knows
    nothing of the recipe's stage and phase, and restarts its file at every ``fit`` unless
    ``append=True``, while a stepwise run makes a dozen fits and ``--resume`` must keep the rows written before.
    """

    order = Recorder.order + 1

    def __init__(self, path: Path) -> None:
        self.path, self.rows, self.stage, self.phase = Path(path), [], "", ""

    def before_epoch(self) -> None:
        self.t0 = time.perf_counter()

    def epoch_done(self) -> None:
        rec = self.learn.recorder
        values = dict(zip(rec.metric_names[1:-1], rec.log[1:-1]))
        row = {
            "stage": self.stage,
            "phase": self.phase,
            "epoch": len(self.rows) + 1,
            "stage_epoch": self.epoch + 1,
            "lr": float(self.opt.hypers[-1]["lr"]),
            **{k: as_float(v) for k, v in values.items()},
            "seconds": round(time.perf_counter() - self.t0, 2),
        }
        self.rows.append(row)
        if rank_distrib() == 0:  # data-parallel runs: one writer
            with atomic_path(self.path) as tmp:
                pd.DataFrame(self.rows).to_csv(tmp, index=False)


class EpochLine(EpochCallback):
    """A plain log line per epoch, for logs that are not a terminal (CI)."""

    order = Recorder.order + 2

    def epoch_done(self) -> None:
        rec = self.learn.recorder
        parts = [f"{n}={_fmt(v)}" for n, v in zip(rec.metric_names[1:], rec.log[1:])]
        hist = getattr(self.learn, "history", None)  # which stage and phase: "epoch 1/1" alone was ambiguous
        where = f"stage {hist.stage} {hist.phase} " if hist is not None and hist.stage != "" else ""
        log.info("%sepoch %d/%d %s", where, self.epoch + 1, self.n_epoch, " ".join(parts))


class ReportScore(EpochCallback):
    """Hand each training epoch's validation balanced accuracy to ``report(step, score)``, the
    step counting epochs over the whole run (every stage): a hyper-parameter search's pruner
    reads it (``dermaclass tune``), and may raise from ``report`` to stop the run."""

    order = Recorder.order + 2

    def __init__(self, report: Callable[[int, float], None]) -> None:
        self.report, self.step = report, 0

    def epoch_done(self) -> None:
        names = self.learn.recorder.metric_names[1:-1]
        score = as_float(self.learn.recorder.log[1:-1][names.index(MONITOR)])
        self.step += 1
        if score is not None:
            self.report(self.step, score)


class BestModel(EpochCallback):
    """Keep the weights with the best validation balanced accuracy over the whole run (all stages).

    Not fastai's ``SaveModelCallback``: it pickles with ``torch.save`` (this tool never writes a
    pickle a stranger could hand over: safetensors here), resets its best at every ``fit`` call
    unless ``reset_on_fit=False`` (a stepwise run's later stages would forget the earlier best), and cannot be told to
    forget the best when a new input size starts (``reset``).
    """

    order = Recorder.order + 3

    def __init__(self, path: Path) -> None:
        self.path, self.best = Path(path), -math.inf

    def epoch_done(self) -> None:
        names = self.learn.recorder.metric_names[1:-1]
        score = as_float(self.learn.recorder.log[1:-1][names.index(MONITOR)])
        if score is not None and score > self.best:
            from safetensors.torch import save_file

            self.best = score
            if rank_distrib() != 0:
                return  # data-parallel runs: every rank tracks the score, rank 0 writes
            state = {k: v.detach().contiguous() for k, v in unwrap(self.learn.model).state_dict().items()}
            with atomic_path(self.path) as tmp:
                save_file(state, str(tmp))

    def reset(self) -> None:
        """Forget the best so far (the next epoch becomes the best): a new input size starts."""
        self.best = -math.inf

    def restore(self) -> None:
        if self.path.is_file():
            from safetensors.torch import load_file

            self.learn.model.load_state_dict(load_file(str(self.path)))


class WeightEMA(Callback):
    """An exponential moving average of the weights (timm's ``ModelEmaV3``), updated after every
    training batch of every fit of the recipe (never in a range test or ``get_preds``).

    A free ensemble: across SGDR's warm restarts the average spans several cycle ends, as
    snapshot ensembles do, at the cost of one copy of the weights. With ``warmup``, the decay
    grows from 0 with the step count (timm's warmup), so a short run is not dominated by the
    ImageNet starting point. ``apply`` copies the average into the learner's model at the end.
    """

    order = Recorder.order + 5

    def __init__(self, decay: float, *, warmup: bool = True) -> None:
        self.decay, self.warmup, self.ema, self.steps = decay, warmup, None, 0

    def after_batch(self) -> None:
        if not self.training or getattr(self.learn, "lr_finder", None) is not None:
            return
        from timm.utils import ModelEmaV3

        model = unwrap(self.learn.model)
        if self.ema is None:
            self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=self.warmup, warmup_power=3 / 4)
        self.steps += 1
        self.ema.update(model, step=self.steps)

    def state(self) -> dict[str, Any]:
        """The averaged tensors (for the resume checkpoint); empty before the first update."""
        if self.ema is None:
            return {}
        return {k: v.detach().contiguous() for k, v in self.ema.module.state_dict().items()}

    def load(self, state: dict[str, Any], steps: int) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(unwrap(self.learn.model), decay=self.decay, use_warmup=self.warmup, warmup_power=3 / 4)
        self.ema.module.load_state_dict(state)
        self.steps = steps

    def apply(self) -> bool:
        """Put the averaged weights into the model; False when there were no training steps."""
        if self.ema is None:
            return False
        unwrap(self.learn.model).load_state_dict(self.ema.module.state_dict())
        return True


class CycleAverage(EpochCallback):
    """The average of the weights at the ends of the last ``last`` annealing cycles of the run.

    Snapshot ensembles (Huang et al. 2017) average the *predictions* of SGDR's cycle ends; SWA
    (Izmailov et al. 2018) shows that averaging the *weights* of such points finds a wider
    optimum at no cost at inference (one network, not ``last``). The cycle ends are read from
    the fit's own LR schedule (``schedules.cycle_end_epochs``: the epochs a warm restart follows,
    and the last epoch of every fit), so in the stepwise recipe they are the ends of each stage's
    SGDR cycles. ``apply`` puts the average into the model and recomputes the batch-norm
    statistics on the training loader, since averaged weights do not match averaged statistics.
    """

    order = Recorder.order + 3  # before Resume's checkpoint (+4), which saves the snapshots

    def __init__(self, last: int) -> None:  # at least 2: Config checks average_cycles
        self.last, self.snapshots, self.steps = last, [], 0

    def epoch_done(self) -> None:
        from dermaclass.schedules import cycle_end_epochs

        sched = getattr(getattr(self.learn, "param_scheduler", None), "scheds", {}).get("lr")
        ends = cycle_end_epochs(sched, self.n_epoch) if sched is not None else [self.n_epoch - 1]
        if self.epoch not in ends:
            return
        state = {k: v.detach().clone() for k, v in unwrap(self.learn.model).state_dict().items()}
        self.snapshots = [*self.snapshots, state][-self.last :]
        self.steps += 1
        log.info("cycle end %d kept for the weight average (%d of %d)", self.steps, len(self.snapshots), self.last)

    def state(self) -> dict[str, Any]:
        """The snapshots as one flat tensor dict (for the resume checkpoint)."""
        return {f"{i}.{k}": v.contiguous() for i, snap in enumerate(self.snapshots) for k, v in snap.items()}

    def load(self, state: dict[str, Any], steps: int) -> None:
        snaps: dict[int, dict[str, Any]] = {}
        for key, v in state.items():
            i, name = key.split(".", 1)
            snaps.setdefault(int(i), {})[name] = v
        self.snapshots, self.steps = [snaps[i] for i in sorted(snaps)], steps

    def apply(self, loader: Any) -> int:
        """Put the average of the kept snapshots into the model and recompute its batch-norm
        statistics over ``loader``; the number of snapshots averaged (0: none were taken)."""
        if not self.snapshots:
            return 0
        model = unwrap(self.learn.model)
        last = self.snapshots[-1]
        average = {
            k: torch.stack([s[k] for s in self.snapshots]).mean(0) if v.is_floating_point() else v
            for k, v in last.items()
        }
        model.load_state_dict(average)
        if len(self.snapshots) > 1:
            from torch.optim.swa_utils import update_bn

            update_bn(loader, model)
        return len(self.snapshots)


class CPUAutocast(Callback):
    """bfloat16 autocast of the forward pass and loss on the CPU (fastai's ``MixedPrecision``
    enters CUDA's autocast only). bfloat16 has float32's range, so no loss scaling is needed;
    the weights, gradients and optimizer stay float32. Worth it only on CPUs with native
    bfloat16 instructions (AVX-512 BF16 or AMX): ``bench_precision.py`` measures it."""

    order = 10

    def before_batch(self) -> None:
        import torch

        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self.autocast.__enter__()

    def after_pred(self) -> None:
        self.learn.pred = self.pred.float()

    def after_loss(self) -> None:
        self.autocast.__exit__(None, None, None)

    def after_cancel_batch(self) -> None:
        if getattr(self, "autocast", None) is not None:
            self.autocast.__exit__(None, None, None)


class SAM(Callback):
    """Sharpness-aware minimisation (Foret et al., ICLR 2021), seed 002's optimizer.

    After fastai's backward pass, the weights move to the worst point within ``rho`` along the
    gradient (``w + rho * g / ||g||``); the batch's loss is computed and back-propagated again
    there, the weights are put back, and the optimizer steps with that second gradient. It wraps
    any optimizer (fastai's Adam here), as Foret et al.'s reference does. The second pass leaves
    the batch-norm running statistics alone, so they see every batch once. Range tests are left
    alone: they measure the loss against the LR, not the optimizer.
    """

    order = 20  # before_step: after the gradient exists, before any other step-time callback

    def __init__(self, rho: float = 0.05) -> None:
        if not rho > 0:
            raise ValueError(f"SAM's rho must be positive, not {rho}")
        self.rho = float(rho)

    def before_step(self) -> None:
        if getattr(self.learn, "lr_finder", None) is not None:
            return
        model = self.learn.model
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            scale = self.rho / (norm + 1e-12)
            saved = [p.detach().clone() for p in params]  # restored exactly (w + e - e is not w in floats)
            for p in params:
                p.add_(p.grad * scale)
                p.grad.zero_()
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        try:
            for m in norms:
                m.momentum = 0.0  # running = (1 - 0) * running: unchanged by the second pass
            self.learn.loss_func(model(*self.learn.xb), *self.learn.yb).backward()
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)


class StopOnNaN(Callback):
    """Raise ``NonFiniteLoss`` on the first non-finite training loss (fastai's TerminateOnNaNCallback
    only cancels the fit quietly, after which an untrained bundle would be written with exit 0).
    Range tests are left alone: their loss is meant to blow up at the high end."""

    order = 9  # fastai's TerminateOnNaNCallback order

    def after_batch(self) -> None:
        if not self.training or hasattr(self.learn, "lr_finder"):
            return
        loss = self.learn.loss
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLoss(
                f"the training loss became {float(loss.detach().float().mean())} at epoch "
                f"{self.epoch + 1}, batch {self.iter + 1}: training diverged and no bundle was written. "
                "Lower --lr, or check the data (e.g. too few images for the batch size)"
            )


class HeadNormFloor(Callback):
    """A floor on the running variance of the head's batch norms (every ``BatchNorm1d``: the
    backbone's are 2-d), applied before every validation, so checkpoint choice, calibration
    (its logits come through ``get_preds``, which validates) and the saved weights all see it.

    Why: a head unit that was almost never on in training keeps a running variance near zero
    (1e-8 to 1e-45 measured), so its gain is up to weight / sqrt(eps); an image that turns it
    on gets logits of 1e5 (a short-budget member's held-out NLL was 436). In eval mode the
    running variance is used nowhere else, and training normalises by the batch's own, so the
    floor changes no gradient: only units whose variance is below it, on images that turn them
    on. benchmarks/bench_head_bn.py replays it on trained bundles.
    """

    order = 95  # after every callback that swaps weights in, so the floor is the last word

    def __init__(self, floor: float) -> None:
        self.floor = floor

    def before_validate(self) -> None:
        floor_head_norms(unwrap(self.learn.model), self.floor)


def floor_head_norms(model: torch.nn.Module, floor: float) -> torch.nn.Module:
    """Floor the running variance of every ``BatchNorm1d`` in ``model`` (the head's; the
    backbone's are 2-d) at ``floor``, in place; returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d) and m.running_var is not None:
                m.running_var.clamp_(min=floor)
    return model


class Distill(Callback):
    """Knowledge distillation (Hinton et al. 2015) from soft targets fixed before training: the
    training loss becomes (1 - alpha) * the run's loss + alpha * T^2 * KL(teacher || student),
    both softened by the temperature T.

    The soft targets are a table over the run's items (rows with NaN: no teacher answer, the
    plain loss alone). The DataLoaders carry each item's row as a second input
    (``make_dataloaders(rows_input=True)``); this callback takes it off before the model sees
    the batch, on training and validation batches alike.
    """

    order = -5  # before every callback that reads or changes xb

    def __init__(self, soft: torch.Tensor, *, alpha: float, temperature: float) -> None:
        self.soft, self.alpha, self.temperature = soft.float(), float(alpha), float(temperature)
        self.rows: torch.Tensor | None = None

    def before_batch(self) -> None:
        if len(self.learn.xb) == 2:
            self.rows = self.learn.xb[1].long()
            self.learn.xb = self.learn.xb[:1]

    def after_loss(self) -> None:
        if not self.training or self.rows is None or not self.alpha:
            return
        soft = self.soft[self.rows]
        known = torch.isfinite(soft).all(dim=1)
        if not bool(known.any()):
            return
        t = self.temperature
        logp = torch.nn.functional.log_softmax(self.learn.pred[known].float() / t, dim=1)
        kl = torch.nn.functional.kl_div(logp, soft[known], reduction="batchmean") * t * t * known.float().mean()
        self.learn.loss_grad = (1 - self.alpha) * self.learn.loss_grad + self.alpha * kl
        self.learn.loss = self.learn.loss_grad.clone()


class FlipInput(Callback):
    """Flip each batch's images along ``dims`` (2 = vertical, 3 = horizontal) before the model
    sees them: one view of flip test-time augmentation, for ``Learner.get_preds(cbs=...)``."""

    order = 1  # after the batch transforms (normalisation commutes with a flip)

    def __init__(self, dims: tuple[int, ...]) -> None:
        self.dims = tuple(dims)

    def before_batch(self) -> None:
        if self.dims:
            self.learn.xb = (self.xb[0].flip(self.dims), *self.xb[1:])


#: the flipped dims of each view of a bundle's test-time augmentation, in the Predictor's order
#: (serving.predictor.TTA_VIEWS): identity, horizontal, vertical, both
FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {"flips2": ((), (3,)), "flips4": ((), (3,), (2,), (2, 3))}


def flip_logits(learn: Any, dl: Any, *, mode: str = "flips4") -> tuple[Any, Any]:
    """Logits averaged over the views of the bundle's ``tta`` mode (the image and its mirror, or
    its three flips), and the targets, for every item of ``dl``."""
    views, targets = [], None
    for dims in FLIPS[mode]:
        logits, targets = learn.get_preds(dl=dl, act=lambda x: x, cbs=[FlipInput(dims)])
        views.append(logits)
    return sum(views) / len(views), targets


def unwrap(model: Any) -> Any:
    """The network inside a DistributedDataParallel wrapper (data-parallel runs), else itself."""
    return getattr(model, "module", model)


def plain(obj: Any) -> Any:
    """fastai containers (``L``) as lists, so that ``torch.load(weights_only=True)`` can read them back."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "L":
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()  # numpy scalars (hyper-parameters from the LR schedule)
    return obj


def as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)

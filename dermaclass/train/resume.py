"""``--resume``: an interrupted training run continues from its last completed epoch.

The whole mechanism is one fastai Callback, ``Resume``, with its state:

- after every real training epoch (rank 0 of a data-parallel run) it writes a checkpoint:
  the weights (safetensors), the optimizer state (tensors and numbers only, so it loads with
  ``weights_only=True``), the weight average when there is one, then ``progress.json``
  (atomically) with the recipe's position (``Run.position``: which step, which steps are
  done, their LRs and images) and the RNG states, pointing to those files; only then are
  the older files removed. A crash at any point leaves one consistent checkpoint.
- on ``--resume`` (``Resume.read`` checks the folder), the recipe runs again from the top:
  ``restore_records`` puts back the history rows, the best score, the range tests and the
  time spent; completed steps are skipped (``Run.step``); at the first step not completed
  ``restore`` loads the weights, the optimizer state (when that step was under way), the
  weight average and the RNG states, and fastai's ``start_epoch`` continues the step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.learner import Recorder

from dermaclass import models
from dermaclass.fileio import atomic_path, write_json
from dermaclass.train.callbacks import EpochCallback, plain, unwrap
from dermaclass.train.data import TrainingError

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
CHECKPOINTS = "checkpoints"
#: Callbacks holding a weight average, by learner attribute, and the key of their checkpoint file.
AVERAGES = {"weight_ema": "ema", "cycle_average": "avg"}
PREFIXES = ("weights-", "opt-", *(f"{key}-" for key in AVERAGES.values()))


def _rng_state() -> dict[str, Any]:
    py, np_state = random.getstate(), np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *[int(v) if isinstance(v, (int, np.integer)) else float(v) for v in np_state[2:]],
        ],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


class Resume(EpochCallback):
    """Checkpoints after every epoch, and the restore of an interrupted run (``saved``)."""

    order = Recorder.order + 4

    def __init__(
        self,
        run_dir: str | Path,
        *,
        position: Callable[[], dict[str, Any]],
        saved: dict[str, Any] | None = None,
        write: bool = True,
    ) -> None:
        self.run_dir, self.position, self.saved, self.write = Path(run_dir), position, saved, write
        self.folder = self.run_dir / CHECKPOINTS
        self.count = 0

    # ---- reading -------------------------------------------------------------------------
    @staticmethod
    def read(run_dir: str | Path) -> dict[str, Any]:
        """The progress.json of an interrupted run in ``run_dir``, checked."""
        run_dir = Path(run_dir)
        path = run_dir / PROGRESS
        if (run_dir / models.BUNDLE_META).exists():
            raise TrainingError(f"{run_dir}: this run already finished (its bundle is there); nothing to resume")
        if not path.is_file():
            raise TrainingError(
                f"{run_dir}: no {PROGRESS} (the run stopped before its first epoch ended); start it again"
            )
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise TrainingError(f"{path}: unreadable ({exc})") from None
        if not (run_dir / CHECKPOINTS / str(progress.get("weights", "?"))).is_file():
            raise TrainingError(f"{path}: its checkpoint {progress.get('weights')} is missing")
        return progress

    def restore_records(self, learn: Any, run: Any) -> None:
        """The records of the interrupted run: history rows, best score, range tests, time spent."""
        import pandas as pd

        if self.saved is None:
            return
        history = self.run_dir / "history.csv"
        rows = pd.read_csv(history) if history.is_file() else pd.DataFrame()
        learn.history.rows = rows.head(self.saved["history_rows"]).to_dict("records")
        learn.best_model.best = self.saved["best"] if self.saved.get("best") is not None else -math.inf
        run.prior_range_tests = self.saved.get("range_tests", [])
        run.seconds_before = self.saved.get("seconds", 0.0)

    def restore(self, learn: Any, *, opt: bool) -> None:
        """Weights, optimizer state (``opt``: the step was under way), weight average and RNG
        states of the interrupted run, once, at its first step not completed."""
        from fastcore.foundation import L
        from safetensors.torch import load_file

        state, self.saved = self.saved, None
        if state is None:
            return
        learn.model.load_state_dict(load_file(str(self.folder / state["weights"])))
        if opt:
            if learn.opt is None:
                learn.create_opt()
            sd = torch.load(self.folder / state["optimizer"], weights_only=True)
            learn.opt.load_state_dict({"state": sd["state"], "hypers": L(sd["hypers"])})
        for attr, key in AVERAGES.items():
            cb = getattr(learn, attr, None)
            if cb is not None and state.get(key) and (self.folder / state[key]).is_file():
                cb.load(load_file(str(self.folder / state[key])), int(state.get(f"{key}_steps", 0)))
        if state.get("rng"):
            _set_rng_state(state["rng"])
        log.info("resumed at step %s, epoch %d", state["step"], state["epoch_in_step"])

    # ---- writing -------------------------------------------------------------------------
    def epoch_done(self) -> None:
        from safetensors.torch import save_file

        if not self.write:  # other data-parallel ranks: rank 0 writes
            return
        self.count += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tag = f"{self.count:04d}-{time.time_ns()}"
        weights, opt = self.folder / f"weights-{tag}.safetensors", self.folder / f"opt-{tag}.pt"
        state = {k: v.detach().contiguous() for k, v in unwrap(self.learn.model).state_dict().items()}
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp))
        with atomic_path(opt) as tmp:
            torch.save(
                plain(self.learn.opt.state_dict()), tmp
            )  # tensors and numbers only: loads with weights_only=True
        extra: dict[str, Any] = {}
        for attr, key in AVERAGES.items():  # a weight average resumes too
            cb = getattr(self.learn, attr, None)
            if cb is not None and (tensors := cb.state()):
                avg_file = self.folder / f"{key}-{tag}.safetensors"
                with atomic_path(avg_file) as tmp:
                    save_file(tensors, str(tmp))
                extra |= {key: avg_file.name, f"{key}_steps": cb.steps}
        write_json(
            self.run_dir / PROGRESS,
            {
                **self.position(),
                "rng": _rng_state(),
                "epoch_in_step": self.epoch + 1,
                "weights": weights.name,
                "optimizer": opt.name,
                **extra,
            },
        )
        keep = {weights.name, opt.name, *(extra.get(key) for key in AVERAGES.values())}
        for old in self.folder.glob("*-*"):
            if old.name not in keep and old.suffix in (".safetensors", ".pt") and old.name.startswith(PREFIXES):
                old.unlink(missing_ok=True)

    def clean(self) -> None:
        """Remove the resume files once the bundle exists (they are not needed any more)."""
        for f in self.folder.glob("*-*"):
            if f.name.startswith(PREFIXES):
                f.unlink(missing_ok=True)

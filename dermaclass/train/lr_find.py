"""LR range tests (Smith 2017, as fastai's ``lr_find``), with seed 002's warm-epoch variant.

Seed 003 starts every fit from a range test; seed 002 (the OpenVINO training-extensions
paper) found fastai's suggestion too high for ImageNet-pretrained weights and first
fine-tunes one epoch at a small LR, then runs the range test. Both are here: all four
fastai suggestions (valley, slide, minimum, steep) are recorded, one is chosen, the plot
is saved, and a curve that diverges or is flat falls back to a safe LR with a message.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.learner import Learner

from dermaclass.fileio import atomic_path
from dermaclass.train.callbacks import as_float

log = logging.getLogger(__name__)

SAFE_LR = 1e-3  # the fallback when a range test diverges or gives nothing usable
SUGGESTIONS = {"minimum": minimum, "steep": steep, "valley": valley, "slide": slide}


@dataclass
class RangeTest:
    """What one LR range test found: all four fastai suggestions and the one used."""

    name: str
    suggestions: dict[str, float | None]
    chosen: float
    rule: str
    plot: str | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "suggestions": self.suggestions,
            "chosen": self.chosen,
            "rule": self.rule,
            "plot": self.plot,
            "note": self.note,
        }


def range_test(
    learn: Learner,
    run_dir: Path,
    name: str,
    *,
    iters: int,
    suggestion: str,
    warm_epoch: bool,
    warm_lr: float,
) -> RangeTest:
    """fastai ``lr_find`` over ``iters`` batches with all four suggestions, ``suggestion`` the
    one chosen; seed 002's warm epoch at ``warm_lr`` first when ``warm_epoch``. The settings
    are ``Config.range_test_settings()``.

    A diverged or NaN curve does not crash the run: the result says so and falls back to a
    safe LR (1e-3).
    """
    if warm_epoch:
        log.info("%s: warm epoch at lr %.1e before the range test (seed 002)", name, warm_lr)
        learn.fit(1, warm_lr)
    note = ""
    suggestions: dict[str, float | None] = {k: None for k in SUGGESTIONS}
    # no progress bars outside a terminal (they are \r updates: noise in a log)
    with learn.no_bar() if not sys.stderr.isatty() else contextlib.nullcontext():
        learn.lr_find(num_it=iters, show_plot=False, suggest_funcs=None)
    # fastai computes all suggestions in one go and fails as a whole when one cannot be
    # computed (a curve that diverges early leaves too few points); ask each separately,
    # on the same trimmed curve lr_find itself uses.
    n = iters
    lrs = torch.tensor(learn.recorder.lrs[n // 10 : -5])
    losses = torch.tensor([float(x) for x in learn.recorder.losses[n // 10 : -5]])
    nan = torch.nonzero(torch.isnan(losses)).flatten()
    if len(nan):
        lrs, losses = lrs[: int(nan[0])], losses[: int(nan[0])]
    failed = []
    for key, func in SUGGESTIONS.items():
        try:
            suggestions[key] = as_float(func(lrs, losses, n)[0])
        except Exception:  # noqa: BLE001 - any failure here just means "no suggestion"
            failed.append(key)
    if failed:
        note = f"no {'/'.join(failed)} suggestion: the loss curve has {len(losses)} usable points (diverged early?)"
    chosen = suggestions.get(suggestion)
    if chosen is None or not 1e-7 <= chosen <= 1.0:
        note = note or f"{suggestion} suggestion unusable ({chosen}); curve diverged or was flat"
        chosen = SAFE_LR
        log.warning("%s: %s; using the safe LR %.0e", name, note, chosen)
    plot = _save_lr_plot(learn, run_dir / f"lr_find_{name}.png", suggestions)
    log.info(
        "%s: range test %s -> %s %.2e",
        name,
        {k: f"{v:.1e}" if v else v for k, v in suggestions.items()},
        suggestion,
        chosen,
    )
    return RangeTest(name, suggestions, chosen, suggestion, plot, note)


def _save_lr_plot(learn: Learner, path: Path, suggestions: dict[str, float | None]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, losses = np.array(learn.recorder.lrs, float), np.array([float(x) for x in learn.recorder.losses])
    if len(lrs) == 0:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    for k, v in suggestions.items():
        if v:
            ax.axvline(
                v,
                ls="--",
                lw=0.8,
                color={"valley": "C1", "slide": "C2", "minimum": "C3", "steep": "C4"}[k],
                label=f"{k} {v:.1e}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(path.stem)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path.name

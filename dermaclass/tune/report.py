"""The report of a ``dermaclass tune`` study: ``trials.csv``, ``top.md`` (the best trials with
both validation scores and their settings) and Optuna's matplotlib plots (optimisation history,
parameter importances, parallel coordinates).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dermaclass.fileio import write_text

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna marks heartbeats and its matplotlib plots experimental, and warns on every use;
    and it logs "Using an existing study" at INFO on every resume, which the caller asked for."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="No artists with labels found")
            yield
    finally:
        optuna.logging.set_verbosity(level)


def score_cell(v: float | None) -> str:
    """A validation score as the study's tables show it ("-" where a trial did not record it)."""
    return "-" if v is None else f"{v:.4f}"


def top_trials(study: Any, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` best finished trials: number, validation balanced accuracy and macro-F1, minutes, settings."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    rows = sorted(done, key=lambda t: -t.value)[:n]
    return [{"trial": t.number, "valid_balanced_accuracy": t.value, "valid_raw_best": t.user_attrs.get("valid_raw_best"),
             "valid_macro_f1": t.user_attrs.get("valid_macro_f1"), "minutes": t.user_attrs.get("minutes"),
             "params": dict(t.params)} for t in rows]  # fmt: skip


def write_study_report(study: Any, out: Path) -> dict[str, Path]:
    """``trials.csv``, ``top.md`` and the plots Optuna can draw from the trials so far
    (optimisation history; parameter importances and parallel coordinates from 2 finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from dermaclass.fileio import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    frame = study.trials_dataframe()
    with atomic_path(out / "trials.csv") as tmp:
        frame.to_csv(tmp, index=False)
    written["trials"] = out / "trials.csv"
    lines = [
        "| trial | valid balanced accuracy (served) | best epoch, raw | valid macro-F1 | minutes | settings |",
        "|---:|---:|---:|---:|---:|---|",
    ]

    for r in top_trials(study):
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['trial']} | {r['valid_balanced_accuracy']:.4f} | {score_cell(r['valid_raw_best'])} | "
                     f"{score_cell(r['valid_macro_f1'])} | {r['minutes']} | {settings} |")  # fmt: skip
    written["top"] = write_text(out / "top.md", "\n".join(lines) + "\n")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots: dict[str, Callable[[], Any]] = {"history": lambda: ovm.plot_optimization_history(study)}
    if len(complete) >= 2:
        plots["importances"] = lambda: ovm.plot_param_importances(study)
        plots["parallel"] = lambda: ovm.plot_parallel_coordinate(study)
    for name, draw in plots.items():
        try:
            with quiet():
                ax = draw()
        except (ValueError, RuntimeError) as exc:  # e.g. importances when no parameter varied
            log.info("study report: no %s plot (%s)", name, exc)
            continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        with atomic_path(out / f"{name}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written[name] = out / f"{name}.png"
    return written

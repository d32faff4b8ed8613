"""``dermaclass tune``: seed 002's TPE search over the recipe (dermaclass.tune) from the shell."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dermaclass.cli.common import EXIT_CODES, DataOptions, Opt, app, data_options, friendly, out
from dermaclass.cli.training import TRAIN_FLAGS

#: Settings that are never searched, whatever the flags say: they define the run, not the recipe.
NOT_SEARCHED = {"seed", "split_file", "threads"}


@app.command("tune", epilog=EXIT_CODES)
@friendly
@data_options(*TRAIN_FLAGS)
def tune_cmd(
    data: Annotated[list[Path], typer.Argument(help="One or more datasets, as for train.")],
    out_dir: Annotated[Path, Opt("--out", help="Study folder: database, split, trials/, best.yaml, report/.")],
    trials: Annotated[int, Opt("--trials", help="Trials the study runs in all (over every --resume).")] = 40,
    budget: Annotated[str, Opt("--budget", help="short (about 6 min a trial on HAM10000) | full")] = "short",
    sampler: Annotated[str, Opt("--sampler", help="tpe (seed 002) | random")] = "tpe",
    pruner: Annotated[str, Opt("--pruner", help="hyperband | halving | median | none")] = "hyperband",
    storage: Annotated[
        str | None,
        Opt(
            "--storage",
            help="Study database URL [default: sqlite in --out]; a PostgreSQL URL lets several "
            "machines run trials of one study",
        ),
    ] = None,  # fmt: skip
    space: Annotated[Path | None, Opt("--space", help="YAML file of ranges that override the built-in space.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the study in --out.")] = False,
    force: Annotated[bool, Opt("--force", help="Start the study in --out over.")] = False,
    data_opts: DataOptions = None,
) -> None:
    """Search the training recipe with Optuna's TPE (seed 002), scored by validation balanced accuracy.

    Every trial is an ordinary training run on one split fixed for the study; hopeless trials are
    pruned; the best settings are written to best.yaml for `dermaclass train --config best.yaml`.
    A flag you give (e.g. --arch) is fixed, not searched.
    """
    import optuna

    from dermaclass import tune as tuning
    from dermaclass.tune.report import score_cell

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("dermaclass").setLevel(logging.WARNING)
    cfg = data_opts.config()
    fixed = [k for k in TRAIN_FLAGS if data_opts.get(k) is not None and k not in NOT_SEARCHED]
    overrides = tuning.load_space(space) if space else None
    resolved = tuning.resolve_space(budget=budget, overrides=overrides, fixed=fixed, source=str(space or "--space"))
    out.print(
        f"searching {', '.join(resolved)} with {sampler} ({budget} budget, {pruner} pruning)"
        + (f"; fixed: {', '.join(fixed)}" if fixed else ""),
        highlight=False,
    )
    started, ran = time.perf_counter(), [0]

    def progress(study: Any, trial: Any) -> None:
        ran[0] += 1
        done = tuning.counted(study)
        best = None
        try:
            best = study.best_trial
        except ValueError:  # no finished trial yet
            pass
        minutes = (time.perf_counter() - started) / 60
        eta = minutes / ran[0] * max(trials - done, 0)
        value = "" if trial.value is None else f" {trial.value:.4f}"
        reason = trial.user_attrs.get("error", "")
        out.print(
            f"trial {done}/{trials}: #{trial.number} {trial.state.name.lower()}{value}"
            + (f" ({escape(reason)})" if reason else "")
            + (f"; best {best.value:.4f} (#{best.number})" if best else "")
            + f"; {minutes:.1f} min, ETA {eta:.0f} min",
            highlight=False,
        )

    result = tuning.tune(
        cfg, data, out_dir, trials=trials, budget=budget, space=resolved, sampler=sampler, pruner=pruner,
        storage=storage, resume=resume, force=force, progress=progress,
    )  # fmt: skip
    table = Table("trial", "valid bal. acc. (served)", "best epoch (raw)", "valid macro-F1", "min", "settings",
                  title="best trials (validation)")  # fmt: skip

    for r in result.top[:5]:
        table.add_row(
            str(r["trial"]), score_cell(r["valid_balanced_accuracy"]), score_cell(r["valid_raw_best"]),
            score_cell(r["valid_macro_f1"]),
            str(r["minutes"]), escape(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in r["params"].items())),
        )  # fmt: skip
    out.print(table)
    out.print(
        f"{result.trials} trials: {result.complete} complete, {result.pruned} pruned, {result.failed} failed; "
        + (f"best: {result.best_yaml} (train with `dermaclass train DATA --config {result.best_yaml}`)"
           if result.best_yaml else "no trial finished, so no best.yaml")
        + f"; report: {out_dir / 'report'}",
        highlight=False,
    )  # fmt: skip

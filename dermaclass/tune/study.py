"""The study behind ``dermaclass tune`` (seed 002's TPE search): Optuna's sampler and pruner,
the RDB storage (SQLite by default, resumable after a kill; PostgreSQL for several machines),
and the objective: each trial an ordinary training run scored by validation balanced accuracy.

See the package docstring for the two scores (the pruner's raw per-epoch one, the trial's
served one) and the outputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from dermaclass.config import Config
from dermaclass.errors import ConfigError, DermaclassError, StudyError
from dermaclass.fileio import write_text
from dermaclass.tune.report import quiet, top_trials, write_study_report
from dermaclass.tune.space import Param, resolve_space, sample, trial_config

log = logging.getLogger(__name__)

STUDY_NAME = "dermaclass"
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
#: Study user attribute listing the trials a kill interrupted (failed, then run again).
INTERRUPTED = "interrupted_trials"
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "halving", "median", "none")


def make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        # multivariate: the settings interact (LR with batch, recipe with cycles); group: the
        # conditional parameters form separate subspaces.
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"--sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def make_pruner(name: str) -> Any:
    import optuna

    pruners = {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
        "none": lambda: optuna.pruners.NopPruner(),
    }
    if name not in pruners:
        raise ConfigError(f"--pruner {name!r}: choose one of {', '.join(PRUNERS)}")
    return pruners[name]()


def open_study(out_dir: Path, *, storage: str | None, sampler: Any, pruner: Any, resume: bool, force: bool) -> Any:
    """The study in ``storage`` (default: SQLite in ``out_dir``), created, or loaded with
    ``resume``; a locked or unreadable database is a ``StudyError`` that says so."""
    import optuna
    import sqlalchemy.exc

    url = storage or f"sqlite:///{out_dir / STUDY_DB}"
    local = storage is None
    if local and (out_dir / STUDY_DB).exists() and not (resume or force):
        raise FileExistsError(
            f"{out_dir / STUDY_DB}: a study is already there; --resume continues it, --force starts over"
        )
    if local and force and not resume:  # start over: a new study, and a new split if the data changed
        (out_dir / STUDY_DB).unlink(missing_ok=True)
        (out_dir / "split.csv").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Heartbeats fail a trial whose worker died (another machine, or a kill) after the grace
        # period; --resume fails a local study's running trials at once (one machine).
        with quiet():
            rdb = optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
            return optuna.create_study(
                storage=rdb, study_name=STUDY_NAME, direction="maximize", sampler=sampler, pruner=pruner,
                load_if_exists=resume or not local,
            )  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        raise StudyError(f"{url}: already holds a study; --resume continues it") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as exc:
        raise StudyError(f"{url}: cannot open the study database ({type(exc).__name__}: {exc}); is it a "
                         "dermaclass study, and not locked by another program?") from None  # fmt: skip


def recover_interrupted(study: Any) -> list[int]:
    """Fail the trials a kill left running, and queue their settings to run again (``--resume``
    on a study that one machine runs). Returns their numbers."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log.warning("trial %d was interrupted; it is run again", t.number)
    if stale:
        study.set_user_attr(INTERRUPTED, [*study.user_attrs.get(INTERRUPTED, []), *(t.number for t in stale)])
    return [t.number for t in stale]


def counted(study: Any) -> int:
    """Trials that count towards ``--trials``: finished, failed or pruned, but not interrupted."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    return sum(t.number not in interrupted for t in study.get_trials(deepcopy=False, states=done))


@dataclass
class TuneResult:
    out_dir: Path
    trials: int
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_params: dict[str, Any]
    best_yaml: Path | None
    report: dict[str, Path]
    top: list[dict[str, Any]]
    seconds: float


def tune(
    base: Config,
    data: Sequence[str | Path],
    out_dir: str | Path,
    *,
    trials: int,
    budget: str = "short",
    space: Mapping[str, Param] | None = None,
    sampler: str = "tpe",
    pruner: str = "hyperband",
    storage: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[Any, Any], None] | None = None,
) -> TuneResult:
    """Run (or continue) the study in ``out_dir`` until ``trials`` trials have ended.

    ``space``: ``resolve_space(...)``'s (default: ``SPACE`` at ``budget``). ``progress(study,
    trial)`` is called after every trial (the CLI's progress line).
    """
    import optuna

    from dermaclass.data import write_split
    from dermaclass.train import prepare_data, train
    from dermaclass.train.callbacks import ReportScore

    out_dir = Path(out_dir)
    space = dict(space if space is not None else resolve_space(budget=budget))
    if trials < 1:
        raise ConfigError(f"--trials {trials}: at least 1")
    study = open_study(out_dir, storage=storage, sampler=make_sampler(sampler, base.seed), pruner=make_pruner(pruner),
                       resume=resume, force=force)  # fmt: skip
    if resume and storage is None:
        recover_interrupted(study)
    # One lesion-grouped split for the whole study: the first invocation writes it.
    split = out_dir / "split.csv"
    if not split.is_file():
        write_split(prepare_data(base, list(data)).split, split)
    base = base.replace(split_file=str(split))
    write_text(out_dir / "tune.yaml", yaml.safe_dump({
        "budget": budget, "sampler": sampler, "pruner": pruner, "trials": trials, "storage": storage or "sqlite (local)",
        "space": {k: {f: v for f, v in asdict(p).items() if v not in (None, (), False)} for k, p in space.items()},
        "base": base.to_dict(),
    }, sort_keys=False))  # fmt: skip

    def objective(trial: Any) -> float:
        params = sample(trial, space, base)
        raw: list[float] = []  # the pruner's per-epoch scores
        run_dir = out_dir / TRIALS_DIR / f"{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir))
        try:
            cfg = trial_config(base, params)

            def report(step: int, score: float) -> None:
                raw.append(score)
                trial.report(score, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {step} (valid balanced accuracy {score:.4f})")

            result = train(cfg, prepare_data(cfg, list(data)), run_dir, force=True, callbacks=[ReportScore(report)])
        except DermaclassError as exc:  # recorded as failed, with its reason; the study goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        m = result.metrics
        trial.set_user_attr("valid_macro_f1", m.get("macro_f1"))
        trial.set_user_attr("minutes", round(result.seconds / 60, 2))
        if raw:
            trial.set_user_attr("valid_raw_best", max(raw))
        value = m.get("balanced_accuracy")
        if value is None or not math.isfinite(value):
            raise StudyError(f"trial {trial.number}: no finite validation balanced accuracy")
        return float(value)

    class Stop:
        """Stop a worker once the study holds ``trials`` counted trials (shared by workers)."""

        def __call__(self, study: Any, trial: Any) -> None:
            if progress is not None:
                progress(study, trial)
            if counted(study) >= trials:
                study.stop()

    started = time.perf_counter()
    if counted(study) < trials:
        import sqlalchemy.exc

        try:
            study.optimize(objective, catch=(DermaclassError,), callbacks=[Stop()], gc_after_trial=True)
        except sqlalchemy.exc.OperationalError as exc:
            raise StudyError(
                f"{out_dir}: the study database failed ({exc.orig}); is another program holding it?"
            ) from None
    return finish(study, base, out_dir, seconds=time.perf_counter() - started)


def finish(study: Any, base: Config, out_dir: Path, *, seconds: float = 0.0) -> TuneResult:
    """``best.yaml`` and the study report from the study as it stands."""
    import optuna

    states = optuna.trial.TrialState
    ended = study.get_trials(deepcopy=False)
    complete = [t for t in ended if t.state == states.COMPLETE]
    best_yaml, best_params, best_value = None, {}, None
    if complete:
        best = max(complete, key=lambda t: t.value)
        best_params, best_value = dict(best.params), float(best.value)
        best_yaml = trial_config(base, best_params).save(out_dir / "best.yaml")
    report = write_study_report(study, out_dir / "report")
    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    return TuneResult(
        out_dir=out_dir, trials=len(ended), complete=len(complete),
        pruned=sum(t.state == states.PRUNED for t in ended),
        failed=sum(t.state == states.FAIL and t.number not in interrupted for t in ended),
        best_value=best_value, best_params=best_params, best_yaml=best_yaml, report=report, top=top_trials(study),
        seconds=seconds,
    )  # fmt: skip

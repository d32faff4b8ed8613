"""``dermaclass tune``: seed 002's hyper-parameter search over the recipe, on a real study database.

Seed 002 (the OpenVINO training pipeline) chooses its hyper-parameters with a Tree-structured
Parzen Estimator (Bergstra et al. 2011). Here Optuna's ``TPESampler`` (multivariate, grouped
for the conditional parameters, seeded) searches the space declared once in ``SPACE``: every
key is a ``Config`` field, and every value it can take is checked by ``Config`` itself before
the first trial. A flag the user fixes on the command line is not searched.

Each trial is an ordinary training run (``train.train``) in its own folder under
``trials/``, on one lesion-grouped split fixed for the whole study, and is scored by its
**validation** balanced accuracy: never by the test split or an external set (those are for
reporting the best trials afterwards). Every epoch's validation balanced accuracy is reported
to the pruner (``train.callbacks.ReportScore``), which stops hopeless trials early
(Hyperband, Li et al. 2018, by default; successive halving or the median rule on request).

Two scores, on purpose. The pruner sees each epoch's *raw* score (the network's argmax, no
test-time augmentation): that is all there is mid-run, and a pruner only compares trials at
the same epoch, so one scale is enough for it. The trial's value, which TPE learns from and
``best.yaml`` is chosen by, is the *served* bundle's score: with its test-time augmentation,
temperature and prior shift (``serving.refit.calibrate_bundle``, as the app answers). The
prior shift holds nevus sensitivity at ``prior_sensitivity``, and a weak network pays for it
(a one-epoch trial went from 0.33 raw to 0.14 served, every image called nv): the study
should prefer what a clinic would be served. The best epoch's raw score is kept beside it
(user attribute ``valid_raw_best``; ``top.md``), and benchmarks/bench_tune.py measures how
far the two rank the trials differently.

The study lives in an RDB storage: SQLite in the study folder by default, so a killed study
continues with ``--resume`` (the trial that was running is failed as interrupted and run
again); a PostgreSQL URL lets several machines run trials of one study at once (Optuna's own
distributed mode; every worker runs ``dermaclass tune`` with the same ``--storage`` and
``--out``). A failed trial (a NaN loss, too little data) is recorded with its reason and the
study goes on.

Outputs: ``best.yaml`` (a whole configuration that ``dermaclass train --config best.yaml``
accepts unchanged), ``report/`` (optimisation history, parameter importances and parallel
coordinates through Optuna's matplotlib plots, ``trials.csv``, ``top.md``) and ``tune.yaml``
(the resolved search: space, sampler, pruner, budget, base configuration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dermaclass.config import Config, read_yaml
from dermaclass.errors import ConfigError, DermaclassError, StudyError
from dermaclass.fileio import write_text

log = logging.getLogger(__name__)

STUDY_NAME = "dermaclass"
STUDY_DB = "study.db"
TRIALS_DIR = "trials"
#: Study user attribute listing the trials a kill interrupted (failed, then run again).
INTERRUPTED = "interrupted_trials"


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (``log`` scale or not) or a set of choices,
    sampled only ``when`` other searched settings have one of the given values."""

    kind: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def values_to_check(self) -> list[Any]:
        """The values whose validity ``Config`` must confirm: the ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


#: The search space: Config fields, their ranges, and when each applies. What the lever screens
#: left open (docs/decisions.md) is searched; what they settled for good (e.g. MixUp, SAM) is not.
SPACE: dict[str, Param] = {
    "recipe": Param("choice", choices=("baseline", "sgdr", "stepwise")),
    "lr": Param("float", 1e-3, 5e-2, log=True),
    "lr_ratio": Param("float", 10.0, 1000.0, log=True),
    "wd": Param("float", 1e-4, 1e-1, log=True),
    "image_size": Param("choice", choices=("96x72", "128x96", "160x120", "192x144")),
    "head_epochs": Param("int", 0, 2),
    "n_cycles": Param("int", 1, 3, when=(("recipe", ("sgdr", "stepwise")),)),
    "epochs": Param("int", 2, 8, when=(("recipe", ("baseline",)),)),
    "lr_rule": Param("choice", choices=("linear", "constant"), when=(("recipe", ("stepwise",)),)),
    "augment": Param("choice", choices=("basic", "zoom")),
    "imbalance": Param("choice", choices=("sampler", "weights", "sqrt-weights")),
    "label_smoothing": Param("float", 0.0, 0.2),
    "colour_constancy": Param("choice", choices=("shades-of-gray", "none")),
}
#: The epoch settings each budget allows (``short``: about the lever screens' 6 minutes a trial
#: on HAM10000 and 2 cores; ``full``: the space as declared, up to the default's 40 minutes).
BUDGETS: dict[str, dict[str, tuple[int, int]]] = {
    "short": {"n_cycles": (1, 1), "epochs": (2, 3), "head_epochs": (0, 1)},
    "full": {},
}
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "halving", "median", "none")


# ---- the space -------------------------------------------------------------------------------
def _config_value(name: str, value: Any) -> Any:
    """A searched value as the Config field takes it (``image_size`` "128x96" -> (128, 96))."""
    if name in ("image_size",) and isinstance(value, str):
        from dermaclass import schedules

        return schedules.parse_size(value)
    return value


def check_space(space: Mapping[str, Param], *, source: str = "the search space") -> None:
    """Refuse, before any trial, a parameter that is not a Config field, an empty range, or a
    value Config would refuse."""
    fields = {f.name for f in dataclasses.fields(Config)}
    for name, p in space.items():
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            raise ConfigError(
                f"{source}: unknown parameter {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        if p.kind == "choice" and not p.choices:
            raise ConfigError(f"{source}: {name} has no choices")
        if p.kind != "choice" and (p.low is None or p.high is None or not p.low <= p.high):
            raise ConfigError(f"{source}: {name}: empty range [{p.low}, {p.high}]")
        if p.log and p.kind != "choice" and p.low <= 0:
            raise ConfigError(f"{source}: {name}: a log-scale range must be positive, not from {p.low}")
        for other, _ in p.when:
            if other not in fields:
                raise ConfigError(f"{source}: {name} applies depending on {other!r}, which is not a setting")
        for value in p.values_to_check():
            try:
                Config().replace(**{name: _config_value(name, value)})
            except ConfigError as exc:
                raise ConfigError(f"{source}: {name}={value!r} is not a valid setting ({exc})") from None


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """A ``--space`` YAML file: {parameter: {low, high, log, choices}}, read with clear errors."""
    data = read_yaml(path, file="search-space file", content="the search space")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected {{parameter: {{low, high, log, choices}}}}")
    return data


def resolve_space(
    *, budget: str = "short", overrides: Mapping[str, Mapping[str, Any]] | None = None,
    fixed: Iterable[str] = (), source: str = "--space",
) -> dict[str, Param]:  # fmt: skip
    """``SPACE`` narrowed by the ``budget``, changed by ``overrides`` (a ``--space`` file:
    a known parameter's range or choices, or a new parameter with its ``kind``), without the
    ``fixed`` settings; checked (``check_space``)."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    space = dict(SPACE)
    for name, (lo, hi) in BUDGETS[budget].items():
        space[name] = dataclasses.replace(space[name], low=lo, high=hi)
    allowed = {f.name for f in dataclasses.fields(Param)}
    for name, change in (overrides or {}).items():
        unknown = set(change) - allowed
        if unknown:
            raise ConfigError(f"{source}: {name}: unknown keys {sorted(unknown)}; use {sorted(allowed - {'when'})}")
        change = {k: tuple(v) if k == "choices" else v for k, v in change.items()}
        if name in space:
            space[name] = dataclasses.replace(space[name], **change)
        else:
            if "kind" not in change:
                change["kind"] = "choice" if "choices" in change else "float"
            space[name] = Param(**change)
    for name in fixed:  # a condition on a fixed setting reads the setting (``sample``)
        space.pop(name, None)
    check_space(space, source=source)
    return space


def sample(trial: Any, space: Mapping[str, Param], base: Config) -> dict[str, Any]:
    """One trial's settings (define-by-run: a conditional parameter only when it applies; a
    fixed setting it depends on is read from ``base``)."""
    chosen: dict[str, Any] = {}
    for name, p in space.items():
        if any(chosen.get(other, getattr(base, other)) not in values for other, values in p.when):
            continue
        if p.kind == "choice":
            chosen[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            chosen[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            chosen[name] = trial.suggest_float(name, float(p.low), float(p.high), log=p.log)
    return chosen


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """The configuration a trial trains with: ``base`` with the sampled settings."""
    return base.replace(**{k: _config_value(k, v) for k, v in params.items()})


# ---- the study -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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
        with _quiet():
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
        "space": {k: {f: v for f, v in dataclasses.asdict(p).items() if v not in (None, (), False)} for k, p in space.items()},
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

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for r in top_trials(study):
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['trial']} | {r['valid_balanced_accuracy']:.4f} | {cell(r['valid_raw_best'])} | "
                     f"{cell(r['valid_macro_f1'])} | {r['minutes']} | {settings} |")  # fmt: skip
    written["top"] = write_text(out / "top.md", "\n".join(lines) + "\n")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots: dict[str, Callable[[], Any]] = {"history": lambda: ovm.plot_optimization_history(study)}
    if len(complete) >= 2:
        plots["importances"] = lambda: ovm.plot_param_importances(study)
        plots["parallel"] = lambda: ovm.plot_parallel_coordinate(study)
    for name, draw in plots.items():
        try:
            with _quiet():
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

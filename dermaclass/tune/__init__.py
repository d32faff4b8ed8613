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

from dermaclass.tune.report import top_trials, write_study_report
from dermaclass.tune.space import BUDGETS, SPACE, Param, check_space, load_space, resolve_space, sample, trial_config
from dermaclass.tune.study import (
    INTERRUPTED,
    PRUNERS,
    SAMPLERS,
    STUDY_DB,
    STUDY_NAME,
    TRIALS_DIR,
    TuneResult,
    counted,
    finish,
    make_pruner,
    make_sampler,
    open_study,
    recover_interrupted,
    tune,
)

__all__ = [
    "BUDGETS", "INTERRUPTED", "PRUNERS", "SAMPLERS", "SPACE", "STUDY_DB", "STUDY_NAME", "TRIALS_DIR", "Param",
    "TuneResult", "check_space", "counted", "finish", "load_space", "make_pruner", "make_sampler", "open_study",
    "recover_interrupted", "resolve_space", "sample", "top_trials", "trial_config", "tune", "write_study_report",
]  # fmt: skip

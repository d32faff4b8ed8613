"""Training: fastai recipes (baseline; SGDR, seed 003; stepwise subsets, seed 001) and the run.

- ``data``: the run's data prepared once (sources, lesion-grouped split, decode cache, vocab);
- ``recipes``: the learner and the three recipes, short compositions of fastai calls;
- ``resume``: ``--resume`` as one fastai Callback (checkpoints after every epoch, and the restore);
- ``distributed``: the data-parallel pieces, scoped to the run;
- ``run``: one run end to end (folder, calibration, out-of-distribution score, bundle);
- ``ensemble``: ``--members K``, K cross-fitted runs and the ensemble bundle over them;
- ``ensemble_fit``: the folds, the members scored as the ensemble serves, and its calibration
  (at the end of training, and ``dermaclass calibrate`` on a finished ensemble);
- ``callbacks``: the fastai Callbacks of the side behaviour (EMA, cycle averages, SAM,
  distillation, NaN stops, CPU autocast, flip TTA predictions);
- ``lr_find``: LR range tests (fastai ``lr_find``; seed 002's warm-epoch variant);
- ``losses``: the logit-adjusted loss for the imbalanced classes.

The names below are the package's public surface.
"""

from dermaclass.train.data import (
    TrainData,
    TrainingError,
    check_class_names,
    inherit_bundle,
    parent_record,
    planned_sizes,
    prepare_data,
)
from dermaclass.train.ensemble import MEMBERS_DIR, check_ensemble, train_ensemble
from dermaclass.train.recipes import (
    RECIPES,
    Run,
    build_learner,
    fit_batch_size,
    loss_for,
    plan_for,
    recipe_baseline,
    recipe_sgdr,
    recipe_stepwise,
    stage_dataloaders,
)
from dermaclass.train.resume import Resume
from dermaclass.train.run import (
    REPLACED,
    RUN_FILES,
    TrainResult,
    bundle_meta,
    check_run_dir,
    set_aside_finished_run,
    train,
    write_summary,
)

__all__ = [
    "MEMBERS_DIR",
    "RECIPES",
    "REPLACED",
    "check_ensemble",
    "train_ensemble",
    "RUN_FILES",
    "Run",
    "TrainData",
    "TrainResult",
    "TrainingError",
    "build_learner",
    "bundle_meta",
    "check_class_names",
    "check_run_dir",
    "fit_batch_size",
    "inherit_bundle",
    "loss_for",
    "parent_record",
    "plan_for",
    "planned_sizes",
    "prepare_data",
    "Resume",
    "recipe_baseline",
    "recipe_sgdr",
    "recipe_stepwise",
    "set_aside_finished_run",
    "stage_dataloaders",
    "train",
    "write_summary",
]

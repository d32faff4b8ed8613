"""Deep ensembles, cross-fitted: ``dermaclass train --members K``.

Averaging the predictions of independently trained networks (Lakshminarayanan et al. 2017,
"Simple and scalable predictive uncertainty estimation using deep ensembles") was the most
robust method under dataset shift in Ovadia et al. 2019, and the ISIC 2018/2019 winners were
ensembles of networks at several input sizes (Gessert et al. 2019). Averaging weights (SWA,
cycle-end averages) did not help here (docs/decisions.md); averaging predictions is another
thing.

Cross-fitting: the train+valid pool of the split is cut into K lesion-grouped, stratified
folds (``data.splits.cross_folds``); member k trains on the other folds with the run's recipe
(each member is an ordinary run, ``train.run.train``, in ``members/mK``), picks its checkpoint
on fold k, and gets seed + k and the k-th of ``--member-archs``. The members' out-of-fold
logits cover the whole pool, so the ensemble's temperature, prior shift, operating points and
referral floor are fitted on K times as many images as one valid split holds. The test split
is the run's, untouched, and ``split.csv`` keeps the train/valid/test columns (valid: the
first fold) plus a ``fold`` column, so ``--split-file`` and retraining read it unchanged.

A caveat the figures must carry: an out-of-fold logit is one member's, while the ensemble
serves the mean of K; the mean is less extreme where members disagree, so a temperature and
prior shift fitted on single members need not fit the ensemble. ``--ensemble-calibration
valid`` is the alternative: the folds cut the train split only, the valid split is held out
from every member, and the calibration is fitted on the ensemble's own (served) logits there
(benchmarks/bench_ensemble.py measures both).

The bundle: ``model.json`` at the top lists the members (path, sha256, arch, input size,
seed, fold) and holds the ensemble's calibration; each member folder is a complete
one-network bundle. A killed run resumes at the member and epoch where it stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastai.torch_core import num_distrib

from dermaclass import models, schedules
from dermaclass.config import Config
from dermaclass.data.splits import FOLD_COLUMN, write_split
from dermaclass.train.data import TrainData, TrainingError
from dermaclass.train.ensemble_fit import OOF_FILE, fit_calibration, member_data, pool_folds
from dermaclass.train.resume import PROGRESS, Resume
from dermaclass.train.run import REPLACED, TrainResult, code_commit, provenance, train

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"


def check_ensemble(cfg: Config) -> list[schedules.Member]:
    """The member plan, refusing what cannot run: several processes (members train one after
    another in one process) or progressive resizing with members at different sizes."""
    plan = schedules.member_plan(
        cfg.members, arch=cfg.arch, image_size=cfg.image_size, seed=cfg.seed, member_archs=cfg.member_archs
    )
    if num_distrib() > 1:
        raise TrainingError(
            "an ensemble trains its members one after another in one process; launch it without "
            "accelerate (or train each member as its own data-parallel run)"
        )
    return plan  # the config-only refusals (--distill-from, --stage-sizes across sizes) are Config's


def set_aside_finished_ensemble(run_dir: Path) -> None:
    """``--force`` over an ensemble: its model.json and members wait in ``replaced/`` until the
    new ensemble is written (as ``train.run.set_aside_finished_run`` does for one network)."""
    members, meta = run_dir / MEMBERS_DIR, run_dir / models.BUNDLE_META
    if not members.exists() and not meta.exists():
        return
    keep = run_dir / REPLACED
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    for path in (
        meta,
        members,
        run_dir / "split.csv",
        run_dir / "config.yaml",
        run_dir / "summary.json",
        run_dir / OOF_FILE,
    ):
        if path.exists():
            os.replace(path, keep / path.name)
    log.warning("%s: the ensemble there is kept in %s until the new one is written", run_dir, keep)


def train_ensemble(
    cfg: Config,
    data: TrainData,
    run_dir: str | Path,
    *,
    force: bool = False,
    data_card: str | None = None,
    resume: bool = False,
    on_start: Callable[[Config, int], None] | None = None,
) -> TrainResult:
    """Train ``cfg.members`` cross-fitted networks and write the ensemble bundle in ``run_dir``.
    ``on_start`` is ``train``'s, for the first member that trains.

    ``resume``: finished members are kept, an interrupted one continues from its last epoch,
    the rest are trained.
    """
    from dermaclass.train.run import check_run_dir

    run_dir = Path(run_dir)
    plan = check_ensemble(cfg)
    saved = None
    if resume:
        if not (run_dir / "split.csv").is_file():
            raise TrainingError(f"{run_dir}: no split.csv, so no ensemble to resume there")
        saved = pd.read_csv(run_dir / "split.csv", dtype=str, keep_default_na=False)
    else:
        check_run_dir(run_dir, force=force)
        set_aside_finished_ensemble(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    holdout = cfg.ensemble_calibration == "valid"
    folds = pool_folds(data, cfg.members, seed=cfg.seed, saved=saved, holdout=holdout)
    commit = code_commit()
    split = data.split.assign(**{FOLD_COLUMN: folds})
    if not holdout:  # a one-network run reading this split file validates on the first fold
        split["split"] = np.where(folds < 0, "test", np.where(folds == 0, "valid", "train"))
    write_split(split, run_dir / "split.csv")
    started = time.perf_counter()
    records = []
    for member in plan:
        folder = run_dir / MEMBERS_DIR / member.name
        mdata = member_data(data, folds, member, cfg)
        mcfg = cfg.replace(
            arch=member.arch,
            image_size=member.image_size,
            seed=member.seed,
            members=1,
            member_archs=(),
            init_bundle=member_parent(cfg, member),
        )
        if (folder / models.BUNDLE_META).is_file() and (folder / models.BUNDLE_WEIGHTS).is_file():
            log.info("member %s: already trained (%s)", member.name, folder)
        else:
            again = _resumable(folder)
            log.info(
                "member %d of %d (%s at %dx%d, seed %d, valid fold %d)%s",
                member.index + 1,
                len(plan),
                member.arch,
                *member.image_size,
                member.seed,
                member.fold,
                ": resuming" if again else "",
            )
            train(mcfg, mdata, folder, force=True, data_card=data_card, resume=again, on_start=on_start)
            on_start = None  # the plan of the first member that trains
        records.append((member, folder, mdata))
    return _write_ensemble(
        cfg,
        data,
        run_dir,
        records,
        folds=folds,
        data_card=data_card,
        commit=commit,
        seconds=time.perf_counter() - started,
        resumed=resume,
    )


def member_parent(cfg: Config, member: schedules.Member) -> str | None:
    """The bundle member ``member`` continues (``--from``): the parent's member k (mod its K) when
    the parent is an ensemble, else the parent itself; None when trained from ImageNet."""
    if not cfg.init_bundle:
        return None
    parent = models.read_bundle_meta(cfg.init_bundle)
    if not parent.is_ensemble:
        return cfg.init_bundle
    return str(parent.member_folders(cfg.init_bundle)[member.index % len(parent.members)])


def _resumable(folder: Path) -> bool:
    """Whether a member folder holds an interrupted run with its checkpoint (else it starts over)."""
    if not (folder / PROGRESS).is_file():
        return False
    try:
        Resume.read(folder)
        return True
    except TrainingError as exc:
        log.warning("%s; member %s is trained from the start", exc, folder.name)
        return False


def _write_ensemble(
    cfg: Config,
    data: TrainData,
    run_dir: Path,
    records: list,
    *,
    folds: np.ndarray,
    data_card: str | None,
    commit: str | None,
    seconds: float,
    resumed: bool,
) -> TrainResult:
    calibration, points, metrics = fit_calibration(cfg, data, records, folds=folds, run_dir=run_dir)
    oof_calibration = cfg.ensemble_calibration == "out-of-fold"
    members, stages, images_seen, member_seconds = [], [], 0, 0.0
    for member, folder, mdata in records:
        meta = models.read_bundle_meta(folder)
        members.append(
            {
                "path": f"{MEMBERS_DIR}/{member.name}",
                "weights_sha256": meta.weights_sha256,
                "arch": member.arch,
                "input_size": list(member.image_size),
                "seed": member.seed,
                "fold": member.fold,
                "valid_images": int(len(mdata.valid_rows)),
                "valid_balanced_accuracy": meta.metrics_valid.get("balanced_accuracy"),
                "seconds": meta.training.get("seconds"),
            }
        )
        stages.append({"member": member.name, "stages": meta.stages})
        images_seen += int(meta.training.get("images_seen") or 0)
        member_seconds += float(meta.training.get("seconds") or 0)
    first = models.read_bundle_meta(records[0][1])
    largest = max((tuple(m.image_size) for m, _, _ in records), key=lambda s: s[0] * s[1])
    meta = models.BundleMeta(
        arch="ensemble",
        classes=tuple(data.vocab),
        class_names=data.names,
        input_size=largest,
        normalization=first.normalization,
        preprocessing={
            **first.preprocessing,
            "resize": first.preprocessing.get("resize", "") + "; each member at its own input size",
        },
        kept_weights=first.kept_weights,
        tta=first.tta,
        head=first.head,
        metrics_valid=metrics,
        recipe=cfg.recipe,
        stages=stages,
        training={
            "seconds": round(member_seconds, 1),
            "wall_seconds": round(seconds, 1),
            "images_seen": images_seen,
            "members": len(records),
        },
        **provenance(cfg, data, data_card=data_card, git_commit=commit),
        calibration=calibration,
        operating_points=points,
        resumed=resumed,
        members=members,
        ensemble={
            "k": len(records),
            "combine": models.COMBINE_RULES[cfg.ensemble_combine],
            "cross_fitted": True,
            "calibration": cfg.ensemble_calibration,
            "calibration_fitted_on": calibration["fitted_on"],
            "metrics_valid_are": "out-of-fold: each image scored by the one member that did not train on it "
            "(the ensemble itself has no held-out split inside the pool)"
            if oof_calibration
            else "the ensemble on the held-out valid split",
        },
    )
    meta = meta.with_(data={**meta.data, "folds": {str(k): int((folds == k).sum()) for k in range(len(records))}})
    models.write_bundle_meta(run_dir, meta)
    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)
    log.info(
        "ensemble of %d written to %s: %s balanced accuracy %.4f",
        len(records),
        run_dir,
        "out-of-fold" if oof_calibration else "held-out valid",
        metrics["balanced_accuracy"],
    )
    return TrainResult(run_dir, metrics, stages, member_seconds, images_seen, [])


def describe(meta: models.BundleMeta) -> dict[str, Any]:
    """One line per member for printing (CLI, card)."""
    return {
        m["path"]: f"{m.get('arch')} {m['input_size'][0]}x{m['input_size'][1]}, seed {m.get('seed')}, "
        f"held-out fold {m.get('fold')}"
        for m in meta.members
    }

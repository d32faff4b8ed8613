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

import dataclasses
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
from dermaclass.data import DecodeCache
from dermaclass.data.labels import class_indices
from dermaclass.data.splits import FOLD_COLUMN, cross_folds, write_split
from dermaclass.evaluate import classification_metrics
from dermaclass.evaluate.calibration import calibrate, class_prior, operating_points
from dermaclass.evaluate.metrics import softmax
from dermaclass.serving import refer
from dermaclass.train.data import TrainData, TrainingError
from dermaclass.train.resume import PROGRESS, Resume
from dermaclass.train.run import REPLACED, TrainResult, code_commit, provenance, train

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"
OOF_FILE = "out_of_fold.csv"


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


def pool_folds(
    data: TrainData, k: int, *, seed: int, saved: pd.DataFrame | None = None, holdout: bool = False
) -> np.ndarray:
    """A fold id per item (-1 outside the pool): the saved run's folds when it has them
    (``--resume``), else new lesion-grouped, stratified folds of the pool: train+valid, or the
    train split alone when the valid split is held out for calibration (``holdout``)."""
    split = data.items["split"].to_numpy()
    inside = (split == "train") if holdout else (split != "test")
    pool = np.flatnonzero(inside)
    if saved is not None and FOLD_COLUMN in saved.columns:
        fold_of = dict(zip(saved["image"].astype(str), pd.to_numeric(saved[FOLD_COLUMN], errors="coerce")))
        folds = np.array([fold_of.get(str(i), np.nan) for i in data.items["image"]], dtype=float)
        if np.isfinite(folds[pool]).all() and set(folds[pool].astype(int)) == set(range(k)):
            return np.where(inside, folds, -1).astype(int)
        log.warning("the saved split's folds do not cover the pool in %d folds; cutting new ones", k)
    folds = np.full(len(split), -1, dtype=int)
    folds[pool] = cross_folds(data.items.iloc[pool], k, seed=seed)
    return folds


def member_data(data: TrainData, folds: np.ndarray, member: schedules.Member, cfg: Config) -> TrainData:
    """The member's view of the run's data: fold ``member.fold`` is its valid split, the other
    pool folds its train split, and everything outside the pool (the test split, and a held-out
    valid split) its test split; images at the member's input size (decoded into the cache once
    if the run has not got them)."""
    split = np.where(folds < 0, "test", np.where(folds == member.fold, "valid", "train")).astype(object)
    size = tuple(member.image_size)
    items = data.items.assign(split=split)
    images = data.images_at.get(size) or DecodeCache(cfg.cache_dir, size).ensure(
        items["path"].tolist(), items["hash"].tolist(), workers=cfg.workers or None
    )
    # The run's stage sizes (progressive resizing) apply to a member at the run's size only.
    images_at = dict(data.images_at) if size == tuple(cfg.image_size) else {size: images}
    return dataclasses.replace(
        data, items=items, images=images, split=data.split.assign(split=split), images_at=images_at
    )


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


def score_members(
    records: list[tuple[schedules.Member, Path, TrainData]],
    *,
    held_out: np.ndarray | None = None,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[list[np.ndarray], np.ndarray] | None]:
    """Every member scored once, as the bundle serves (with its test-time augmentation): on its
    own held-out fold, giving (rows, out-of-fold logits, out-of-distribution margins), and with
    ``held_out`` (rows no member trained on) every member's logits there and the ensemble's
    margins (the combined logits need the calibration fitted on them: ``_held_out_calibration``)."""
    from dermaclass.serving.predictor import Predictor

    rows, logits, margins, served_logits, served_margins = [], [], [], [], []
    for _, folder, mdata in records:
        pred = Predictor(folder, backend="torch", threads=threads)
        valid = mdata.valid_rows
        both = valid if held_out is None else np.concatenate([valid, held_out])
        lo, fe = pred.forward([mdata.images[i] for i in both])
        margin = (
            refer.member_margins([pred.ood_scores(lo, fe)], [pred.ood_threshold], [pred.meta.ood.get("scale") or 0.0])
            if pred.ood_threshold is not None
            else None
        )
        n = len(valid)
        rows.append(valid)
        logits.append(lo[:n])
        margins.append(np.zeros(n) if margin is None else margin[:n])
        served_logits.append(lo[n:])
        if margin is not None:
            served_margins.append(margin[n:])
    served = None
    if held_out is not None:  # the mean of the members' margins, as refer.member_margins takes it
        served = (served_logits, np.mean(served_margins, axis=0) if served_margins else np.zeros(len(held_out)))
    return np.concatenate(rows), np.concatenate(logits), np.concatenate(margins), served


def held_out_calibration(
    member_logits: list[np.ndarray], y: np.ndarray, vocab: list[str], *, rule: str, prior: list[float], cfg: Config
) -> tuple[dict, dict, np.ndarray]:
    """The ensemble's calibration, operating points and served probabilities on a split no member
    trained on (``--ensemble-calibration valid``), for its combination ``rule``.

    A rule that combines before calibrating is fitted on the combined logits, as it serves. The
    mean of calibrated probabilities calibrates each member first, so its temperature and prior
    shift are fitted on every member's logits (K per image, as out-of-fold calibration fits one
    per image); the operating points are then set on the served mean.
    """
    from dermaclass.serving.combine import combine

    settings = cfg.calibration_settings()
    k = len(member_logits)
    if rule != models.COMBINE_RULES["calibrated"]:
        calibration, points, probs = calibrate(combine(member_logits, rule), y, vocab, prior=prior, **settings)
        calibration["fitted_on"] = f"the valid split held out from all {k} members, scored by the ensemble"
        return calibration, points, probs
    calibration, _, _ = calibrate(np.concatenate(member_logits), np.tile(y, k), vocab, prior=prior, **settings)
    calibration["fitted_on"] = f"the valid split held out from all {k} members, scored by each member"
    offsets = np.asarray(calibration.get("offsets") or np.zeros(len(vocab)))
    served = combine(member_logits, rule, temperature=calibration["temperature"], offsets=offsets)
    probs = softmax(served + offsets, calibration["temperature"])
    points = operating_points(
        y,
        probs,
        vocab,
        operating_classes=settings["operating_classes"],
        target_sensitivity=settings["target_sensitivity"],
    )
    return calibration, points, probs


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
    oof_calibration = cfg.ensemble_calibration == "out-of-fold"
    rows, logits, margins, served = score_members(
        records, held_out=None if oof_calibration else data.valid_rows, threads=cfg.threads
    )
    labels = data.items["label"].astype(str).to_numpy()
    prior = class_prior(labels[folds >= 0], data.vocab)
    if oof_calibration:
        y = class_indices(labels[rows], data.vocab, source="the out-of-fold predictions")
        calibration, points, probs = calibrate(logits, y, data.vocab, prior=prior, **cfg.calibration_settings())
        calibration["fitted_on"] = f"out-of-fold predictions of {len(records)} members on the train+valid pool"
    else:  # the held-out valid split, scored by the ensemble as it serves
        member_logits, margins = served
        y = class_indices(labels[data.valid_rows], data.vocab, source="the valid split")
        calibration, points, probs = held_out_calibration(
            member_logits, y, data.vocab, rule=models.COMBINE_RULES[cfg.ensemble_combine], prior=prior, cfg=cfg
        )
    kept = (probs.max(axis=1) >= cfg.refer_below) & (margins >= 0)
    calibration["refer"] = {
        "min_top_probability": cfg.refer_below,
        "ood": {
            "method": refer.ENSEMBLE_OOD,
            "threshold": 0.0,
            "score": "mean over members of (member score - member cut-off) / spread of its validation scores",
        },
        "valid_referred": float(np.mean(~kept)),
        "valid_accuracy_kept": float(np.mean((probs.argmax(1) == y)[kept])) if kept.any() else None,
    }
    metrics = classification_metrics(y, probs, data.vocab)
    oof_probs = (
        probs
        if oof_calibration
        else softmax(logits + np.asarray(calibration.get("offsets") or 0.0), calibration["temperature"])
    )
    write_out_of_fold(run_dir / OOF_FILE, data.items.iloc[rows], folds[rows], logits, oof_probs, data.vocab)
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


def write_out_of_fold(
    path: Path, items: pd.DataFrame, folds: np.ndarray, logits: np.ndarray, probs: np.ndarray, vocab: list[str]
) -> Path:
    """The out-of-fold predictions the ensemble was calibrated on, one row per pool image (its
    fold, label, raw logits of the member that held it out, calibrated probabilities): the
    operating points' trade-off curve and distillation's soft targets read them."""
    from dermaclass.fileio import atomic_path

    table = pd.DataFrame(
        {"image": items["image"].astype(str).to_numpy(), "fold": folds, "label": items["label"].astype(str).to_numpy()}
    )
    for i, c in enumerate(vocab):
        table[f"logit_{c}"] = logits[:, i]
    for i, c in enumerate(vocab):
        table[f"p_{c}"] = probs[:, i]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return path


def describe(meta: models.BundleMeta) -> dict[str, Any]:
    """One line per member for printing (CLI, card)."""
    return {
        m["path"]: f"{m.get('arch')} {m['input_size'][0]}x{m['input_size'][1]}, seed {m.get('seed')}, "
        f"held-out fold {m.get('fold')}"
        for m in meta.members
    }

"""An ensemble's folds and calibration: the lesion-grouped folds of the pool and each member's
view of the data, its members scored as it serves, and the temperature, prior shift,
operating points and referral floor fitted on their out-of-fold predictions (or on the valid
split held out from every member), for ``train --members K`` at its end and for ``dermaclass
calibrate`` on a finished ensemble (e.g. after changing its test-time augmentation).

Temperature scaling is Guo et al. 2017, the prior shift logit adjustment (Menon et al. 2021);
cross-fitted deep ensembles are described in ``train.ensemble``. Test and external images are
never read here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from dermaclass import models, schedules
from dermaclass.config import CALIBRATION_SETTINGS, Config
from dermaclass.data import DecodeCache
from dermaclass.data.labels import class_indices
from dermaclass.data.splits import FOLD_COLUMN, cross_folds
from dermaclass.evaluate import classification_metrics
from dermaclass.evaluate.calibration import calibrate, class_prior, operating_points
from dermaclass.evaluate.metrics import softmax
from dermaclass.serving import refer
from dermaclass.train.data import TrainData, TrainingError

log = logging.getLogger(__name__)

OOF_FILE = "out_of_fold.csv"


def pool_folds(
    data: TrainData,
    k: int,
    *,
    seed: int,
    saved: pd.DataFrame | None = None,
    holdout: bool = False,
    strict: bool = False,
) -> np.ndarray:
    """A fold id per item (-1 outside the pool): the saved run's folds when it has them
    (``--resume``), else new lesion-grouped, stratified folds of the pool: train+valid, or the
    train split alone when the valid split is held out for calibration (``holdout``).
    ``strict``: the saved folds must cover the pool (recalibrating a finished ensemble), else
    TrainingError names what is missing."""
    split = data.items["split"].to_numpy()
    inside = (split == "train") if holdout else (split != "test")
    pool = np.flatnonzero(inside)
    if saved is not None and FOLD_COLUMN in saved.columns:
        fold_of = dict(zip(saved["image"].astype(str), pd.to_numeric(saved[FOLD_COLUMN], errors="coerce")))
        folds = np.array([fold_of.get(str(i), np.nan) for i in data.items["image"]], dtype=float)
        if np.isfinite(folds[pool]).all() and set(folds[pool].astype(int)) == set(range(k)):
            return np.where(inside, folds, -1).astype(int)
        if strict:
            missing = int((~np.isfinite(folds[pool])).sum())
            raise TrainingError(
                f"the saved split's folds do not cover this data's train+valid pool in {k} folds "
                f"({missing} of {len(pool)} images have no fold): give the data the ensemble was trained on"
            )
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


def fit_calibration(
    cfg: Config,
    data: TrainData,
    records: list[tuple[schedules.Member, Path, TrainData]],
    *,
    folds: np.ndarray,
    run_dir: Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(calibration, operating points, valid metrics) of the ensemble over ``records`` (member,
    folder, member data), by ``cfg.ensemble_calibration``, with the referral floor
    ``cfg.refer_below``; writes the out-of-fold predictions (``OOF_FILE``) in ``run_dir``."""
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
    return calibration, points, metrics


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


def recalibrate_ensemble(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    cfg: Config,
    tta: Literal["none", "flips2", "flips4"] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Refit a finished ensemble's calibration as training fitted it (``dermaclass calibrate``):
    each member's on its own held-out fold (temperature, operating points, out-of-distribution
    cut-off), then the ensemble's on the members' out-of-fold predictions (or the held-out valid
    split, as the ensemble was trained), with the folds of its ``split.csv``. ``data`` must hold
    the images the ensemble was trained on. ``tta``: serve with another test-time augmentation
    (e.g. ``flips2``, half the views of ``flips4``), everything refitted on its logits; None
    keeps the bundle's. The calibration settings are ``cfg``'s; the referral floor stays the
    bundle's. The weights do not change.

    The work is done on a copy that replaces the bundle only when it is complete, so an
    interrupted refit leaves the bundle as it was. Returns the new ``calibration`` entry.
    """
    from dermaclass.serving.refit import refit_network
    from dermaclass.train.data import prepare_data

    bundle = Path(bundle)
    meta = models.read_bundle_meta(bundle)
    if meta.calibration and not force:
        raise FileExistsError(
            f"{bundle}: already calibrated (temperature {meta.temperature:.3f}); pass --force to refit it"
        )
    split_file = bundle / "split.csv"
    if not split_file.is_file():
        raise TrainingError(f"{split_file}: missing; an ensemble is recalibrated on the folds it was trained with")
    mode = meta.tta if tta is None else models.tta_mode(tta)
    setting = models.tta_setting(mode)
    rule = {v: k for k, v in models.COMBINE_RULES.items()}.get(meta.ensemble.get("combine"), "logits")
    first = meta.members[0]
    cfg = cfg.replace(
        split_file=str(split_file),
        image_size=tuple(first["input_size"]),
        stage_sizes=(),
        init_bundle=None,
        distill_from=None,
        tta=setting,
        ensemble_calibration=meta.ensemble.get("calibration", "out-of-fold"),
        ensemble_combine=rule,
        refer_below=float(meta.refer.get("min_top_probability", cfg.refer_below)),
    )
    data_paths = [data] if isinstance(data, (str, Path)) else list(data)
    prepared = prepare_data(cfg, data_paths)
    saved = pd.read_csv(split_file, dtype=str, keep_default_na=False)
    folds = pool_folds(
        prepared,
        len(meta.members),
        seed=cfg.seed,
        saved=saved,
        holdout=cfg.ensemble_calibration == "valid",
        strict=True,
    )
    work = bundle.with_name(f".{bundle.name}.recalibrating")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(bundle, work)
    try:
        records = []
        for i, (entry, folder) in enumerate(zip(meta.members, meta.member_folders(work))):
            member = schedules.Member(
                index=i,
                fold=int(entry["fold"]),
                arch=str(entry["arch"]),
                image_size=(int(entry["input_size"][0]), int(entry["input_size"][1])),
                seed=int(entry["seed"]),
            )
            own = models.read_bundle_meta(folder)
            models.write_bundle_meta(folder, own.with_(tta=mode, config={**own.config, "tta": setting}))
            mdata = member_data(prepared, folds, member, cfg)
            # the member's own refit, on the images already decoded (its valid split is its fold)
            labels = mdata.items["label"].astype(str).to_numpy()
            train, valid = (
                (labels[rows].tolist(), [mdata.images[int(i)] for i in rows])
                for rows in (mdata.train_rows, mdata.valid_rows)
            )
            refit_network(folder, train=train, valid=valid, cfg=cfg)
            records.append((member, folder, mdata))
        calibration, points, metrics = fit_calibration(cfg, prepared, records, folds=folds, run_dir=work)
        calibration["refitted"] = {"by": "dermaclass calibrate", "at": datetime.now(UTC).isoformat(timespec="seconds")}
        models.write_bundle_meta(
            work,
            meta.with_(
                tta=mode,
                calibration=calibration,
                operating_points=points,
                metrics_valid=metrics,
                ensemble={**meta.ensemble, "calibration_fitted_on": calibration["fitted_on"]},
                config={
                    **meta.config,
                    **{k: cfg.to_dict()[k] for k in CALIBRATION_SETTINGS if k != "refer_below"},
                    "tta": setting,
                },
            ),
        )
    except BaseException:  # the bundle was never touched; the half-done copy goes
        shutil.rmtree(work, ignore_errors=True)
        raise
    # the refitted copy takes the bundle's place; the old one goes only after the swap
    old = bundle.with_name(f".{bundle.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(bundle, old)
    os.replace(work, bundle)
    shutil.rmtree(old, ignore_errors=True)
    log.info(
        "%s: recalibrated (tta %s) on %s, temperature %.3f",
        bundle,
        mode or "none",
        calibration["fitted_on"],
        calibration["temperature"],
    )
    return calibration

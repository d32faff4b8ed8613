"""Run a model bundle on a labelled dataset split and assemble its ``Report`` (evaluate/record.py).

The data are read by the same data layer as training (any layout, validated, decoded once
into the cache at the bundle's input size). The split comes from a split file, by default
the ``split.csv`` that training wrote beside the bundle, so the test set of a report is the
test set the model never saw. Identity hashes of the model weights and of the evaluated
images make two reports comparable (``dermaclass report compare``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

import dermaclass
from dermaclass.config import Config
from dermaclass.data import CachedImages, DecodeCache, read_split, validate_sources
from dermaclass.data.labels import class_indices
from dermaclass.errors import EvaluationError
from dermaclass.evaluate.metrics import (
    bootstrap_intervals,
    classification_metrics,
    confused_pairs,
    expected_calibration_error,
    flag_rates,
    reliability_bins,
    softmax,
    tradeoff_curve,
)
from dermaclass.evaluate.record import Report
from dermaclass.models import BundleMeta, file_sha256, operating_point_origin, read_bundle_meta, weights_identity
from dermaclass.serving.predictor import Predictor

log = logging.getLogger(__name__)

Split = Literal["test", "valid", "train", "all"]


@dataclass
class Evaluation:
    """A finished evaluation: the report, the per-image predictions and the images."""

    report: Report
    predictions: pd.DataFrame
    images: Any  # preprocessed (H, W, 3) uint8 arrays aligned with ``predictions`` (gallery thumbnails)


def images_identity(hashes: pd.Series, labels: pd.Series) -> str:
    """A hash of the evaluated set: the sorted (content hash, label) pairs, independent of paths and order."""
    lines = sorted(f"{h}\t{lab}" for h, lab in zip(hashes.astype(str), labels.astype(str)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def select_split(
    items: pd.DataFrame, split_df: pd.DataFrame | None, split: str, *, source: str
) -> tuple[pd.DataFrame, dict]:
    """The items of ``split`` according to the split file (all items for ``all``), with counts."""
    if split == "all":
        return items, {"evaluated": len(items)}
    assert split_df is not None
    wanted = set(split_df.loc[split_df["split"] == split, "image"].astype(str))
    listed = set(split_df["image"].astype(str))
    mask = items["image"].astype(str).isin(wanted).to_numpy()
    counts = {
        "evaluated": int(mask.sum()),
        "listed_in_split": len(wanted),
        "listed_but_missing": len(wanted - set(items["image"].astype(str))),
        "not_in_split_file": int((~items["image"].astype(str).isin(listed)).sum()),
    }
    if not mask.any():
        raise EvaluationError(
            f"{source}: no image of the data is in the {split!r} split of the split file "
            f"({len(wanted)} listed); is it the right dataset or split file?"
        )
    if counts["listed_but_missing"]:
        log.warning("%d %s images listed in the split file are not in the data", counts["listed_but_missing"], split)
    return items[mask], counts


def split_rows(
    bundle: Path,
    meta: BundleMeta,
    items: pd.DataFrame,
    *,
    split: Split,
    split_path: Path | None,
    cfg: Config,
    source: str,
) -> tuple[pd.DataFrame, dict, CachedImages]:
    """The rows of ``split`` (by the split file) and their images at the bundle's input size,
    refusing labels the bundle does not know."""
    items = items.reset_index(drop=True)
    split_df = None
    if split != "all":
        if split_path is None or not split_path.is_file():
            raise EvaluationError(f"{bundle}: no split file at {split_path}; pass --split-file or --split all")
        split_df = read_split(split_path)
    chosen, split_counts = select_split(items, split_df, split, source=source)
    chosen = chosen.reset_index(drop=True)
    class_indices(chosen["label"], meta.classes, source=source)  # refuses labels the bundle does not know
    images = DecodeCache(cfg.cache_dir, tuple(meta.input_size)).ensure(
        chosen["path"].tolist(), chosen["hash"].tolist(), workers=cfg.workers or None
    )
    return chosen, split_counts, images


def network_images(
    sizes: Sequence[tuple[int, int]], largest: tuple[int, int], rows: pd.DataFrame, images: CachedImages, cfg: Config
) -> CachedImages | dict[tuple[int, int], CachedImages]:
    """What the bundle's networks read: ``images`` (decoded at the bundle's input size,
    ``largest``), or for an ensemble with members at several ``sizes``, the decode cache at each."""
    if len(sizes) <= 1:
        return images
    return {
        size: images
        if size == tuple(largest)
        else DecodeCache(cfg.cache_dir, size).ensure(
            rows["path"].tolist(), rows["hash"].tolist(), workers=cfg.workers or None
        )
        for size in sizes
    }


def split_images(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    splits: Sequence[Split],
    split_file: str | Path | None = None,
    cfg: Config | None = None,
) -> dict[str, tuple[list[str], CachedImages]]:
    """The labels and preprocessed images of each of ``splits`` of ``data``, by the bundle's
    split file (default: the ``split.csv`` beside it), at the bundle's input size (for an
    ensemble whose members differ in size: {input size: images}, as ``Predictor.logits`` reads)."""
    cfg = cfg or Config()
    bundle = Path(bundle)
    meta = read_bundle_meta(bundle)  # the classes and input size; no network is loaded
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    items, _ = validate_sources(paths, **cfg.source_settings())
    source = ", ".join(str(p) for p in paths)
    split_path = Path(split_file) if split_file else bundle / "split.csv"
    sizes = list(dict.fromkeys(tuple(m["input_size"]) for m in meta.members))
    out = {}
    for s in splits:
        rows, _, images = split_rows(bundle, meta, items, split=s, split_path=split_path, cfg=cfg, source=source)
        out[s] = (rows["label"].astype(str).tolist(), network_images(sizes, meta.input_size, rows, images, cfg))
    return out


def fitted_curve(bundle: Path, cls: str) -> dict[str, list[float]] | None:
    """The trade-off of ``cls`` on the predictions its operating point was fitted on, when the
    bundle keeps them (an ensemble's ``out_of_fold.csv``); None for a single network."""
    path = bundle / "out_of_fold.csv"
    if not path.is_file():
        return None
    oof = pd.read_csv(path, dtype={"label": str})
    if f"p_{cls}" not in oof.columns:
        return None
    y = (oof["label"].to_numpy() == cls).astype(int)
    return tradeoff_curve(y, oof[f"p_{cls}"].to_numpy(), class_index=1)


def evaluate_bundle(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    split: Split = "test",
    split_file: str | Path | None = None,
    cfg: Config | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    gallery: int = 12,
    thumbnails: bool = True,
    tta: bool | None = None,
    progress: Any = None,
) -> Evaluation:
    """Evaluate the bundle on ``split`` of ``data`` (one or more sources, merged as training merges them).

    ``cfg`` supplies the data-layer settings. ``tta``: average the logits over the bundle's flips
    (the four when it has none; recorded in the report, since it changes every figure); None: as the bundle records.
    """
    cfg = cfg or Config()
    bundle = Path(bundle)
    predictor = Predictor(bundle, threads=cfg.threads)
    classes = predictor.classes
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    items, validations = validate_sources(paths, progress=progress, **cfg.source_settings())
    data = ", ".join(str(p) for p in paths)
    split_path = None if split == "all" else (Path(split_file) if split_file else bundle / "split.csv")
    chosen, split_counts, images = split_rows(
        bundle, predictor.meta, items, split=split, split_path=split_path, cfg=cfg, source=data
    )
    tta = predictor.tta if tta is None else tta
    logits = predictor.logits(network_images(predictor.input_sizes, predictor.input_size, chosen, images, cfg), tta=tta)
    raw, probs = softmax(logits), predictor.checked(predictor.calibrated(logits), f"the images of {data}")
    y = class_indices(chosen["label"], classes, source=data)
    groups = chosen["group"].astype(str).to_numpy()
    has_groups = chosen["group"].astype(str).ne(chosen["image"].astype(str)).any()

    metrics = classification_metrics(y, probs, classes)
    intervals = bootstrap_intervals(y, probs, classes, groups=groups if has_groups else None, n_boot=n_boot, seed=seed)
    pred = probs.argmax(axis=1)

    predictions = pd.DataFrame(
        {
            "image": chosen["image"].astype(str),
            "group": groups,
            "label": chosen["label"].astype(str),
            "predicted": [classes[i] for i in pred],
            "correct": pred == y,
        }
    )
    for i, c in enumerate(classes):
        predictions[f"p_{c}"] = probs[:, i]
    points = {}
    identity = images_identity(chosen["hash"], chosen["label"])
    for c, op in predictor.operating_points.items():
        rates = flag_rates(y, probs, class_index=classes.index(c), threshold=op["threshold"])
        predictions[f"flag_{c}"] = probs[:, classes.index(c)] >= op["threshold"]
        points[c] = {
            **op,
            **rates,
            "curve": tradeoff_curve(y, probs, class_index=classes.index(c)),
            "fitted_curve": fitted_curve(bundle, c),
            "fitted_on": operating_point_origin(op, predictor.meta.calibration),
            # a threshold fitted on these very images (calibrate --site): its rates here are fitted
            "fitted_here": (op.get("site") or {}).get("images_sha256") == identity,
        }
        if points[c]["fitted_here"]:
            log.warning(
                "%s: the %s threshold was fitted on these images; its rates here are not a measurement", data, c
            )

    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:gallery]
    worst = [
        {
            "row": int(r),
            "image": str(chosen["image"].iloc[r]),
            "true": classes[y[r]],
            "predicted": classes[pred[r]],
            "p_predicted": float(probs[r, pred[r]]),
            "p_true": float(probs[r, y[r]]),
        }
        for r in wrong
    ]

    meta = predictor.meta
    report = Report(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        dermaclass_version=dermaclass.__version__,
        disclaimer=dermaclass.DISCLAIMER,
        model={
            "bundle": str(bundle),
            "weights_sha256": weights_identity(bundle),
            "arch": meta.arch,
            "networks": len(predictor.networks),
            "members": [f"{m['arch']} {m['input_size'][0]}x{m['input_size'][1]}" for m in meta.members],
            "recipe": meta.recipe,
            "created": meta.created,
            "input_size": list(meta.input_size),
            "git_commit": meta.git_commit,
            "metrics_valid": {k: meta.metrics_valid.get(k) for k in ("balanced_accuracy", "macro_f1")},
        },
        data={
            "root": str(data),
            "split": split,
            "split_file": str(split_path) if split_path else None,
            "split_sha256": file_sha256(split_path) if split_path else None,
            "images_sha256": identity,
            "n": int(len(chosen)),
            "groups": int(len(set(groups))),
            "group_column": validations[0].dataset.columns.get("group") if has_groups else None,
            "counts": split_counts,
            "problems": sum(len(v.problems) for v in validations),
        },
        tta=predictor.tta_mode if tta else None,
        classes=tuple(classes),
        class_names=predictor.class_names,
        metrics=metrics,
        intervals=intervals,
        calibration={
            "method": "temperature",
            "temperature": predictor.temperature,
            "fitted_on": meta.calibration.get("fitted_on"),
            "prior_shift": meta.calibration.get("prior_shift"),
            "ece_uncalibrated": expected_calibration_error(y, raw),
            "ece_calibrated": expected_calibration_error(y, probs),
            "reliability_uncalibrated": reliability_bins(y, raw),
            "reliability_calibrated": reliability_bins(y, probs),
        },
        operating_points=points,
        confused_pairs=confused_pairs(metrics["confusion_matrix"], classes),
        worst_errors=worst,
        gallery_images=thumbnails,  # False: a report to publish without the dataset's images
    )
    log.info("evaluated %d images: balanced accuracy %.4f", len(chosen), metrics["balanced_accuracy"] or float("nan"))
    return Evaluation(report=report, predictions=predictions, images=images)

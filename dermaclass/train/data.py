"""The data of a training run, prepared once: sources validated and merged, a lesion-grouped
split (made, or reused from a split file so a clinic's test set stays fixed across
retrainings), the decode cache at every planned input size, the class vocabulary pinned
(``CategoryBlock(vocab=...)``) so a stepwise subset missing a class keeps the head's size,
and what a parent bundle (``--init-bundle``) says about classes and settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermaclass import models, schedules
from dermaclass.config import Config
from dermaclass.data import DecodeCache, assign_split, make_split, read_split, validate_sources
from dermaclass.data.cache import CachedImages
from dermaclass.data.labels import full_name
from dermaclass.data.splits import MIN_PER_CLASS, thin_classes
from dermaclass.errors import TrainingError

log = logging.getLogger(__name__)


# ---- data --------------------------------------------------------------------------------
@dataclass
class TrainData:
    """Everything a recipe needs from the data, prepared once per run."""

    items: pd.DataFrame  # usable items with a ``split`` column, aligned with ``images``
    images: CachedImages  # at cfg.image_size
    vocab: list[str]
    names: dict[str, str]
    split: pd.DataFrame
    sources: list[str]
    split_reuse: dict[str, int] = field(default_factory=dict)  # kept/followed/assigned/dropped with --split-file
    images_at: dict[tuple[int, int], CachedImages] = field(default_factory=dict)  # progressive resizing: per size
    item_weights: np.ndarray | None = None  # per-item sampling weights (--histo-weight), aligned with items
    soft_targets: np.ndarray | None = None  # per-item teacher probabilities (--distill-from), NaN rows: none

    def images_of(self, size: tuple[int, int] | None) -> CachedImages:
        return self.images if size is None else self.images_at.get(tuple(size), self.images)

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(self.items["split"].to_numpy() == "train")

    @property
    def valid_rows(self) -> np.ndarray:
        return np.flatnonzero(self.items["split"].to_numpy() == "valid")

    def table(self, train_rows: np.ndarray) -> pd.DataFrame:
        """The (row, label, is_valid[, weight]) table fastai reads, for a training subset + the full valid split."""
        rows = np.concatenate([train_rows, self.valid_rows])
        table = pd.DataFrame(
            {
                "row": rows,
                "label": self.items["label"].to_numpy()[rows],
                "is_valid": np.r_[np.zeros(len(train_rows), bool), np.ones(len(self.valid_rows), bool)],
            }
        )
        if self.item_weights is not None:
            table["weight"] = self.item_weights[rows]
        return table


def prepare_data(cfg: Config, data: str | Path | Sequence[str | Path], *, progress=None) -> TrainData:
    """Load and validate one or more sources (skipping bad files), split by lesion/patient, fill the decode cache.

    With ``cfg.init_bundle`` the vocabulary is the union of the bundle's classes and the
    data's, so a class the new data lacks keeps its place (and weights) in the head.
    """
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise TrainingError("no data source given")
    sizes = planned_sizes(cfg)  # every size the stages decode (the Config checked them when built)
    items, validations = validate_sources(paths, progress=progress, **cfg.source_settings())
    skipped = sum(p.action == "skipped" for v in validations for p in v.problems)
    if skipped:
        log.warning("%d files skipped by validation (run `dermaclass data validate` for the list)", skipped)
    counts: dict[str, int] = {}
    if cfg.split_file:
        split, counts = assign_split(items, read_split(cfg.split_file), fractions=cfg.split_fractions, seed=cfg.seed)
    else:
        split = make_split(items, fractions=cfg.split_fractions, seed=cfg.seed)
    items = items.assign(split=split["split"].to_numpy())
    class_names: dict[str, str] = {}
    for v in validations:
        class_names.update({k: n for k, n in v.dataset.class_names.items() if k not in class_names})
    vocab = sorted(items["label"].unique().tolist())
    if cfg.init_bundle:
        parent = models.read_bundle_meta(cfg.init_bundle)
        check_class_names(parent, class_names, source=str(cfg.init_bundle))
        for c, n in parent.class_names.items():
            class_names.setdefault(c, n)
        vocab = sorted(set(vocab) | set(parent.classes))
    for part, thin in thin_classes(items).items():
        log.warning(
            "%s has fewer than %d images of %s: %s",
            part,
            MIN_PER_CLASS,
            ", ".join(f"{c} ({n})" for c, n in thin.items()),
            "the model can hardly learn them" if part == "train" else "their figures there are too noisy to judge",
        )
    for part in ("train", "valid"):
        if not (items["split"] == part).any():
            raise TrainingError(
                f"{', '.join(map(str, paths))}: the {part} split is empty; add images or change --split-fractions"
            )
    images = DecodeCache(cfg.cache_dir, cfg.image_size).ensure(
        items["path"].tolist(), items["hash"].tolist(), workers=cfg.workers or None
    )
    images_at = {tuple(cfg.image_size): images}
    for size in dict.fromkeys(sizes):
        if size not in images_at:  # progressive resizing: each stage size decoded once, cached on disk
            images_at[size] = DecodeCache(cfg.cache_dir, size).ensure(
                items["path"].tolist(), items["hash"].tolist(), workers=cfg.workers or None
            )
    items = items.reset_index(drop=True)
    return TrainData(
        items=items,
        images=images,
        vocab=vocab,
        names={c: full_name(c, class_names) for c in vocab},
        split=split,
        sources=[str(v.dataset.root) for v in validations],
        split_reuse=counts,
        images_at=images_at,
        item_weights=confirmation_weights(items, cfg.histo_weight, sources=paths),
        soft_targets=teacher_targets(cfg.distill_from, items, vocab, temperature=cfg.distill_temperature)
        if cfg.distill_from
        else None,
    )


def teacher_targets(bundle: str | Path, items: pd.DataFrame, vocab: list[str], *, temperature: float) -> np.ndarray:
    """Soft targets for distillation: softmax(logits / T) of an ensemble's out-of-fold predictions
    (``out_of_fold.csv``: each pool image scored by the member that did not train on it),
    matched to ``items`` by image id; rows the teacher never scored are NaN (plain loss). The
    teacher's pool must hold none of the run's valid and test images (refused otherwise)."""
    path = Path(bundle) / "out_of_fold.csv"
    if not path.is_file():
        raise TrainingError(f"{bundle}: no out_of_fold.csv; --distill-from needs an ensemble trained with --members K")
    oof = pd.read_csv(path, dtype={"image": str})
    missing = [c for c in vocab if f"logit_{c}" not in oof.columns]
    if missing:
        raise TrainingError(f"{path}: no teacher logits for the classes {missing}; the teacher must know every class")
    logits = oof[[f"logit_{c}" for c in vocab]].to_numpy(np.float64) / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    index = {image: i for i, image in enumerate(oof["image"])}
    rows = np.array([index.get(str(image), -1) for image in items["image"]])
    # An image the teacher scored out of fold was in its pool, so its other members trained on
    # it. A student whose valid or test images are among them would inherit what the teacher
    # learned from those very images: its checkpoint, calibration and test figures would flatter it.
    seen = {s: int(((rows >= 0) & (items["split"].to_numpy() == s)).sum()) for s in ("valid", "test")}
    if any(seen.values()):
        raise TrainingError(
            f"{path}: the teacher's members trained on "
            + " and ".join(f"{n} of this run's {s} images" for s, n in seen.items() if n)
            + ", so the student's validation and test figures would be biased; distil from an ensemble trained "
            "on the same split with --ensemble-calibration valid (its folds cut the train split only)"
        )
    out = np.full((len(items), len(vocab)), np.nan, dtype=np.float32)
    out[rows >= 0] = probs[rows[rows >= 0]]
    train = items["split"].to_numpy() == "train"
    log.info(
        "distillation: soft targets for %d of %d training images from %s",
        int((rows[train] >= 0).sum()),
        int(train.sum()),
        path,
    )
    if not (rows[train] >= 0).any():
        raise TrainingError(
            f"{path}: none of the training images is in the teacher's out-of-fold predictions "
            "(another dataset, or other image ids?)"
        )
    return out


def confirmation_weights(
    items: pd.DataFrame, histo_weight: float, *, sources: Sequence[str | Path]
) -> np.ndarray | None:
    """Per-item sampling weights: ``histo_weight`` for histopathology-confirmed images (``dx_type``
    == "histo"), 1 for the rest; None when off. Data without a ``dx_type`` column is an error
    that names the sources, not a silent no-op."""
    if histo_weight == 1:
        return None
    if "dx_type" not in items.columns:
        raise TrainingError(
            f"{', '.join(map(str, sources))}: --histo-weight needs a dx_type column in the manifest "
            "(how each diagnosis was confirmed: histo, follow_up, ...); there is none"
        )
    histo = items["dx_type"].astype(str).str.strip().str.lower().eq("histo").to_numpy()
    train = items["split"].to_numpy() == "train"
    log.info(
        "--histo-weight %g: %d of %d training images are histopathology-confirmed",
        histo_weight,
        int((histo & train).sum()),
        int(train.sum()),
    )
    return np.where(histo, float(histo_weight), 1.0)


def planned_sizes(cfg: Config) -> list[tuple[int, int]]:
    """The input size of every stepwise stage (progressive resizing); [] for other recipes.
    A Config is checked when it is built (``config.RULES``), so the plan cannot fail here."""
    if cfg.recipe != "stepwise":
        return []
    return schedules.stage_sizes(cfg.stage_sizes, len(cfg.stage_fractions), cfg.image_size)


def inherit_bundle(cfg: Config) -> Config:
    """With ``--from BUNDLE``: the bundle's architecture and input size (its weights need them)."""
    if not cfg.init_bundle:
        return cfg
    meta = models.read_bundle_meta(cfg.init_bundle)
    if meta.is_ensemble:
        # Member k continues the parent's member k (mod the parent's K), with its arch and size.
        specs = tuple(f"{m['arch']}@{m['input_size'][0]}x{m['input_size'][1]}" for m in meta.members)
        k = cfg.members if cfg.members > 1 else len(meta.members)
        log.info("continuing the ensemble %s: %d members (%s)", cfg.init_bundle, k, ", ".join(specs))
        first = meta.members[0]
        return cfg.replace(
            members=k, member_archs=specs, arch=first["arch"], image_size=tuple(first["input_size"]), pretrained=False
        )
    if cfg.member_archs:
        log.info("continuing %s: every member starts from its weights, so --member-archs is dropped", cfg.init_bundle)
        cfg = cfg.replace(member_archs=())
    if cfg.arch != meta.arch or tuple(cfg.image_size) != meta.input_size:
        log.info("continuing %s: architecture %s, input %dx%d", cfg.init_bundle, meta.arch, *meta.input_size)
    return cfg.replace(arch=meta.arch, image_size=meta.input_size, pretrained=False)


def parent_record(cfg: Config, vocab: list[str]) -> dict[str, Any] | None:
    """What the bundle records about the bundle it continued (None when trained from ImageNet)."""
    if not cfg.init_bundle:
        return None
    meta = models.read_bundle_meta(cfg.init_bundle)
    return {
        "bundle": str(cfg.init_bundle),
        "weights_sha256": models.weights_identity(cfg.init_bundle),
        "created": meta.created,
        "classes": list(meta.classes),
        "classes_added": [c for c in vocab if c not in meta.classes],
        "sources": meta.data.get("sources"),
    }


def check_class_names(parent: models.BundleMeta, names: dict[str, str], *, source: str) -> None:
    """Refuse to continue a bundle whose class codes mean something else in the new data."""
    theirs = parent.class_names
    clash = [c for c, n in names.items() if c in theirs and theirs[c].strip().lower() != n.strip().lower()]
    if clash:
        listed = "; ".join(f"{c!r} is {theirs[c]!r} in the bundle but {names[c]!r} in the data" for c in clash)
        raise TrainingError(f"{source}: class codes conflict: {listed}. Rename the new class or relabel.")

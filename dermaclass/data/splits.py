"""Train/valid/test splits stratified by label and grouped by lesion or patient.

Several images of one lesion on both sides of a split leak and inflate every metric, so the
unit of splitting is the group (lesion_id / patient_id). Exact duplicate files are merged
into one unit as well, even across groups. scikit-learn's StratifiedGroupKFold cuts the
units into k folds of near-equal class mix, and whole folds are handed to test, valid and
train in proportion to the requested fractions.

A retraining run reuses the previous split file: old images keep their split, new images
of an already-split group follow their group, and only new groups are assigned. Test images
therefore never enter training, and the test set stays comparable between model versions.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from dermaclass.errors import DataError
from dermaclass.fileio import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_COLUMNS = ("image", "label", "group", "split")
#: Optional: the content hash, so an old image keeps its split even when renamed or moved.
HASH_COLUMN = "hash"
#: Optional: the cross-fitting fold of a train/valid image in an ensemble's run (-1 for test).
FOLD_COLUMN = "fold"
#: When one unit of images has members in several old splits, the most protected wins.
_PRIORITY = {"test": 0, "valid": 1, "train": 2}


def split_units(items: pd.DataFrame) -> pd.Series:
    """An id per row such that rows sharing a group or a content hash share the id.

    Union-find over groups: any two images with identical bytes join their groups.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    groups = items["group"].astype(str).tolist()
    for g in groups:
        find(g)
    if "hash" in items.columns:
        first_group: dict[str, str] = {}
        for g, h in zip(groups, items["hash"]):
            if not h:
                continue
            if h in first_group:
                a, b = find(first_group[h]), find(g)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first_group[h] = g
    return pd.Series([find(g) for g in groups], index=items.index, name="unit")


def n_folds(fractions: tuple[float, ...]) -> int:
    """The fewest folds (<= 20) that realise the fractions exactly, else 20."""
    for k in range(2, 21):
        if all(abs(f * k - round(f * k)) < 1e-6 for f in fractions):
            return k
    return 20


def check_split_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    """Validate (train, valid, test) fractions: three non-negative numbers summing to 1."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise DataError(f"split fractions must be three numbers train,valid,test summing to 1; got {fractions}")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def _folds(labels: pd.Series, units: pd.Series, k: int, seed: int) -> np.ndarray:
    """A fold id in [0, k) per row: stratified by label, never splitting a unit."""
    folds = np.empty(len(labels), dtype=int)
    if labels.value_counts().max() >= k:
        sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # A class with fewer groups than folds is reported by validation as small_class.
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, idx) in enumerate(sgkf.split(np.zeros(len(labels)), labels, units)):
                folds[idx] = fold
        return folds
    # Too few images for stratification (a handful of new images in a retraining run):
    # deal the shuffled units round-robin, which still keeps every unit on one side.
    order = np.random.default_rng(seed).permutation(units.unique())
    fold_of = {unit: i % k for i, unit in enumerate(order)}
    return units.map(fold_of).to_numpy()


def cross_folds(items: pd.DataFrame, k: int, *, seed: int = 0) -> np.ndarray:
    """A fold id in [0, k) per row for cross-fitting an ensemble (train/ensemble.py): the same
    grouping as the split (a lesion, or identical files, never in two folds), stratified by label."""
    if k < 2:
        raise DataError(f"cross-fitting needs at least 2 folds, got {k}")
    units = split_units(items)
    if units.nunique() < k:
        raise DataError(f"{units.nunique()} lesions/groups cannot fill {k} folds; use fewer members")
    return _folds(items["label"].reset_index(drop=True), units.reset_index(drop=True), k, seed)


def _columns(df: pd.DataFrame) -> list[str]:
    """The columns a split file holds: the four required ones, then hash and fold when present."""
    return list(SPLIT_COLUMNS) + [c for c in (HASH_COLUMN, FOLD_COLUMN) if c in df.columns]


def make_split(
    items: pd.DataFrame, *, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> pd.DataFrame:
    """Assign every item to train/valid/test, stratified by label, grouped by unit.

    Returns a DataFrame with the columns image, label, group, split (in the items' order).
    """
    fractions = check_split_fractions(fractions)
    units = split_units(items)
    n_units = units.nunique()
    k = min(n_folds(fractions), n_units)
    n_test = round(fractions[2] * k)
    n_valid = round(fractions[1] * k)
    # Tiny data: a requested split must not vanish through rounding.
    if fractions[2] > 0 and n_test == 0 and k >= 3:
        n_test = 1
    if fractions[1] > 0 and n_valid == 0 and k - n_test >= 2:
        n_valid = 1
    split = np.full(len(items), "train", dtype=object)
    if k >= 2 and (n_test or n_valid):
        folds = _folds(items["label"], units, k, seed)
        split[folds < n_test] = "test"
        split[(folds >= n_test) & (folds < n_test + n_valid)] = "valid"
    out = pd.DataFrame(
        {"image": items["image"].values, "label": items["label"].values, "group": items["group"].values, "split": split}
    )
    if HASH_COLUMN in items.columns:
        out[HASH_COLUMN] = items[HASH_COLUMN].values
    log.info("split %d images (%d units) into %s", len(out), n_units, out["split"].value_counts().to_dict())
    return out


def assign_split(
    items: pd.DataFrame,
    existing: pd.DataFrame,
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Extend an existing split to the current items without moving any old image.

    Returns the split for ``items`` and counts: kept (old images), followed (new images
    joining an already-split group), assigned (new groups), dropped (old images no longer
    in the data).
    """
    old = dict(zip(existing["image"].astype(str), existing["split"]))
    # An old image found under a new name (another source order, a moved folder) keeps its split.
    old_by_hash = (
        dict(zip(existing[HASH_COLUMN].astype(str), existing["split"])) if HASH_COLUMN in existing.columns else {}
    )
    old_by_hash.pop("", None)
    hashes = items[HASH_COLUMN].astype(str).tolist() if HASH_COLUMN in items.columns else [""] * len(items)
    old_group_split: dict[str, str] = {}
    for g, s in zip(existing["group"].astype(str), existing["split"]):
        old_group_split.setdefault(g, s)
    units = split_units(items)
    unit_split: dict[str, str] = {}
    for unit, image, group, h in zip(units, items["image"].astype(str), items["group"].astype(str), hashes):
        s = old.get(image) or old_by_hash.get(h) or old_group_split.get(group)
        if s is not None and (unit not in unit_split or _PRIORITY[s] < _PRIORITY[unit_split[unit]]):
            unit_split[unit] = s
    split = []
    counts = {"kept": 0, "followed": 0, "assigned": 0, "dropped": 0}
    for unit, image, h in zip(units, items["image"].astype(str), hashes):
        if image in old or h in old_by_hash:
            split.append(old[image] if image in old else old_by_hash[h])
            counts["kept"] += 1
        elif unit in unit_split:
            split.append(unit_split[unit])
            counts["followed"] += 1
        else:
            split.append(None)
    out = pd.DataFrame(
        {"image": items["image"].values, "label": items["label"].values, "group": items["group"].values, "split": split}
    )
    if HASH_COLUMN in items.columns:
        out[HASH_COLUMN] = items[HASH_COLUMN].values
    new = out["split"].isna().to_numpy()
    if new.any():
        fresh = make_split(items[new], fractions=fractions, seed=seed)
        out.loc[new, "split"] = fresh["split"].to_numpy()
        counts["assigned"] = int(new.sum())
    present_images, present_hashes = set(out["image"].astype(str)), set(hashes)
    old_hashes = existing[HASH_COLUMN].astype(str) if HASH_COLUMN in existing.columns else [""] * len(existing)
    counts["dropped"] = sum(
        1
        for image, h in zip(existing["image"].astype(str), old_hashes)
        if image not in present_images and (not h or h not in present_hashes)
    )
    log.info("reused split: %s", counts)
    return out, counts


MIN_PER_CLASS = 5  # valid/test images of a class below which its figures are too noisy to judge


def thin_classes(split: pd.DataFrame, *, minimum: int = MIN_PER_CLASS) -> dict[str, dict[str, int]]:
    """Per split part (train, valid, test), the classes with fewer than ``minimum`` images there
    (0 included): their sensitivity on that part is one or two images' worth."""
    counts = split.groupby(["split", "label"]).size().unstack(fill_value=0)
    counts = counts.reindex(index=["train", "valid", "test"], columns=sorted(split["label"].unique()), fill_value=0)
    thin = {part: {c: int(n) for c, n in row.items() if n < minimum} for part, row in counts.iterrows()}
    return {part: classes for part, classes in thin.items() if classes}


def read_split(path: str | Path) -> pd.DataFrame:
    """Read and check a split file (image, label, group, split)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse the split file ({exc})") from exc
    missing = [c for c in ("image", "split") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: split file lacks column(s) {', '.join(missing)}; expected {', '.join(SPLIT_COLUMNS)}")
    if "group" not in df.columns:
        df["group"] = df["image"]
    if "label" not in df.columns:
        df["label"] = ""
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise DataError(f"{path}: unknown split name(s) {bad}; expected {', '.join(SPLITS)}")
    crossing = df.groupby("group")["split"].nunique()
    crossing = crossing[crossing > 1]
    if len(crossing):
        raise DataError(
            f"{path}: {len(crossing)} group(s) appear in more than one split (e.g. {crossing.index[0]!r}); "
            "this split leaks and cannot be reused"
        )
    if df["image"].duplicated().any():
        raise DataError(f"{path}: image {df.loc[df['image'].duplicated(), 'image'].iloc[0]!r} is listed twice")
    return df[_columns(df)]


def write_split(split: pd.DataFrame, path: str | Path) -> Path:
    """Write a split file atomically."""
    with atomic_path(path) as tmp:
        split[_columns(split)].to_csv(tmp, index=False)
    return Path(path)

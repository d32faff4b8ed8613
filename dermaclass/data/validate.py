"""Validating a clinic's image set: decode every file and say what is in it and what is wrong.

Builds on ``sources.load_dataset`` (which reads the layout without decoding). Every image is
decoded fully, not just its header, because a truncated JPEG passes a header check and then
breaks a training run an hour in. Exact duplicates are found by content hash: within a
class they are kept (and later kept on one side of every split); across classes they
contradict each other and are skipped. The result is a plain dict for ``--json`` and the
data card.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dermaclass.data.images import ImageInfo, inspect_file
from dermaclass.data.labels import full_name, load_class_names
from dermaclass.data.sources import PROBLEM_KINDS, Dataset, Problem, load_dataset
from dermaclass.errors import DataError

log = logging.getLogger(__name__)

#: Below this many files a process pool costs more than it saves.
_POOL_THRESHOLD = 256


def inspect_files(
    paths: list[str], *, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> list[ImageInfo]:
    """Decode every file (in parallel on all cores) and return what each one is."""
    workers = workers or min(os.cpu_count() or 1, 8)
    results: Iterable[ImageInfo]
    if workers <= 1 or len(paths) < _POOL_THRESHOLD:
        results = map(inspect_file, paths)
        return _collect(results, len(paths), progress)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return _collect(pool.map(inspect_file, paths, chunksize=64), len(paths), progress)


def _collect(results: Iterable[ImageInfo], total: int, progress: Callable[[int, int], None] | None) -> list[ImageInfo]:
    out = []
    for i, info in enumerate(results, start=1):
        out.append(info)
        if progress is not None and (i % 256 == 0 or i == total):
            progress(i, total)
    return out


@dataclass
class Validation:
    """The outcome of validating a dataset: usable items plus every problem found."""

    dataset: Dataset
    items: pd.DataFrame  # usable items, with hash, format, mode, width, height columns
    problems: list[Problem]
    min_per_class: int
    files_checked: int
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Everything the report shows, as plain JSON-able data."""
        items, ds = self.items, self.dataset
        counts = items["label"].value_counts()
        groups = items.groupby("label")["group"].nunique()
        per_class = [
            {
                "label": label,
                "name": full_name(label, ds.class_names),
                "images": int(counts[label]),
                "groups": int(groups[label]),
                "fraction": round(float(counts[label]) / len(items), 4),
            }
            for label in sorted(counts.index)
        ]
        sizes = Counter(f"{w}x{h}" for w, h in zip(items["width"], items["height"]))
        modes = Counter(items["mode"])
        by_kind = Counter(p.kind for p in self.problems)
        areas = items["width"] * items["height"]
        smallest, largest = items.loc[areas.idxmin()], items.loc[areas.idxmax()]
        return {
            "root": str(ds.root),
            "layout": ds.layout,
            "manifest": str(ds.manifest) if ds.manifest else None,
            "columns": ds.columns,
            "files_checked": self.files_checked,
            "images": len(items),
            "classes": len(per_class),
            "groups": int(items["group"].nunique()),
            "group_column": ds.columns.get("group"),
            "group_label": _group_label(ds.columns.get("group")),
            "per_class": per_class,
            "imbalance_ratio": round(float(counts.max()) / float(counts.min()), 2),
            "image_modes": dict(sorted(modes.items())),
            "converted_to_rgb": int(sum(n for m, n in modes.items() if m != "RGB")),
            "formats": dict(sorted(Counter(items["format"]).items())),
            "sizes": {
                "smallest": f"{smallest['width']}x{smallest['height']}",
                "largest": f"{largest['width']}x{largest['height']}",
                "most_common": [{"size": s, "images": n} for s, n in sizes.most_common(5)],
            },
            "min_per_class": self.min_per_class,
            "problems": {
                "total": len(self.problems),
                "skipped": sum(p.action == "skipped" for p in self.problems),
                "by_kind": {k: by_kind[k] for k in PROBLEM_KINDS if by_kind[k]},
                "list": [p.to_dict() for p in self.problems],
            },
            "notes": self.notes,
        }


def _group_label(column: str | None) -> str:
    """How to call the groups in a report: lesions, patients, or plain groups."""
    name = (column or "").lower()
    return "lesions" if "lesion" in name else "patients" if "patient" in name else "groups"


def _duplicates(items: pd.DataFrame) -> tuple[list[Problem], set[int]]:
    """Problems for images with identical bytes, and the rows to drop (label conflicts)."""
    problems: list[Problem] = []
    drop: set[int] = set()
    for _, same in items[items.duplicated("hash", keep=False)].groupby("hash", sort=False):
        first, first_group = same.iloc[0]["image"], same.iloc[0]["group"]
        labels = sorted(set(same["label"]))
        if len(labels) == 1:
            for image, group in zip(same["image"].iloc[1:], same["group"].iloc[1:]):
                where = "same group" if group == first_group else "other group; splits keep them together"
                problems.append(Problem("duplicate", image, f"same content as {first} ({where})", "kept"))
        else:
            others = ", ".join(f"{i} ({lab})" for i, lab in zip(same["image"], same["label"]))
            for idx, image, label in zip(same.index, same["image"], same["label"]):
                problems.append(
                    Problem(
                        "duplicate_conflict", image, f"labelled {label!r}, but identical files are: {others}", "skipped"
                    )
                )
                drop.add(idx)
    return problems, drop


def validate(
    dataset: Dataset,
    *,
    min_per_class: int = 10,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Validation:
    """Decode every image of ``dataset`` and collect its problems and statistics."""
    items = dataset.items.copy()
    problems = list(dataset.problems)
    infos = inspect_files(items["path"].tolist(), workers=workers, progress=progress)
    items["hash"] = [i.hash for i in infos]
    items["format"] = [i.format for i in infos]
    items["mode"] = [i.mode for i in infos]
    items["width"] = [i.width for i in infos]
    items["height"] = [i.height for i in infos]

    bad = []
    for idx, info, image in zip(items.index, infos, items["image"]):
        if info.problem is not None:
            problems.append(Problem(info.problem, image, info.detail, "skipped"))
            bad.append(idx)
        elif not info.extension_ok:
            problems.append(
                Problem("wrong_extension", image, f"content is {info.format} but the extension says otherwise", "kept")
            )
        if info.problem is None and info.frames > 1:
            problems.append(
                Problem(
                    "multi_frame", image, f"{info.format} with {info.frames} frames; only the first is used", "kept"
                )
            )
    items = items.drop(index=bad)

    dup_problems, drop = _duplicates(items)
    problems += dup_problems
    items = items.drop(index=list(drop))
    items["width"] = items["width"].astype(int)
    items["height"] = items["height"].astype(int)

    for label, n in sorted(items["label"].value_counts().items()):
        if n < min_per_class:
            problems.append(
                Problem(
                    "small_class", f"class {label!r}", f"{n} images, fewer than the minimum {min_per_class}", "kept"
                )
            )
    notes = list(dataset.notes)
    non_rgb = int((items["mode"] != "RGB").sum())
    if non_rgb:
        notes.append(f"{non_rgb} images are not 8-bit RGB; they are converted to RGB for training and prediction")
    items = items.reset_index(drop=True)
    if items.empty:
        raise DataError(f"{dataset.root}: no image decoded ({len(problems)} problems)")
    log.info("validated %d files: %d usable, %d problems", len(infos), len(items), len(problems))
    return Validation(dataset, items, problems, min_per_class, files_checked=len(infos), notes=notes)


def validate_source(
    path: str | Path,
    *,
    min_per_class: int,
    workers: int,
    manifest: str | None = None,
    image_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    class_names: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Validation:
    """Load a dataset and validate it (the one path every command takes). The settings are
    ``Config.source_settings()``: columns left None are detected; ``workers`` 0 = all cores."""
    names = load_class_names(Path(class_names)) if class_names else None
    dataset = load_dataset(
        path, manifest=manifest, image_col=image_col, label_col=label_col, group_col=group_col, class_names=names
    )
    return validate(dataset, min_per_class=min_per_class, workers=workers or None, progress=progress)


def validate_sources(
    paths: Sequence[str | Path],
    *,
    progress: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> tuple[pd.DataFrame, list[Validation]]:
    """Validate several sources (a clinic export, a new batch, the app's review folder) and merge them.

    The first source is read with ``settings`` (``validate_source``'s: manifest, column names,
    ...) and keeps its image ids, so a split file written for it still matches; later sources
    are read with auto-detection, and their image ids and groups are prefixed with the
    source's folder name so two sources can never collide. The same file in two sources is
    kept once (the first); with conflicting labels it is dropped from both, with a warning.
    """
    detected = {**settings, "manifest": None, "image_col": None, "label_col": None, "group_col": None}
    frames, validations = [], []
    for k, path in enumerate(paths):
        v = validate_source(path, progress=progress, **(settings if k == 0 else detected))
        items = v.items.copy()
        if k > 0:
            name = v.dataset.root.name
            items["image"] = name + "/" + items["image"].astype(str)
            items["group"] = name + ":" + items["group"].astype(str)
        items["source"] = str(v.dataset.root)
        frames.append(items)
        validations.append(v)
    items = pd.concat(frames, ignore_index=True)
    if len(paths) > 1:
        across = items.groupby("hash")["source"].transform("nunique") > 1
        labels = items.groupby("hash")["label"].transform("nunique")
        conflict = across & (labels > 1)
        if conflict.any():
            log.warning(
                "%d files appear in several sources with different labels; dropped: %s",
                int(conflict.sum()),
                ", ".join(items.loc[conflict, "path"].astype(str).head(5)),
            )
            items = items[~conflict]
        first_source = items.groupby("hash")["source"].transform("first")
        repeat = (items["source"] != first_source) & items.duplicated("hash", keep=False)
        if repeat.any():
            log.info("%d files repeat an earlier source's file; kept once", int(repeat.sum()))
            items = items[~repeat]
    return items.reset_index(drop=True), validations

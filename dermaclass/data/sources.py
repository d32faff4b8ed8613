"""Reading the layouts clinics export into one table of labelled images.

Two layouts, detected without flags:

1. a folder per class: ``root/<label>/**/*.jpg|png|...``;
2. a CSV manifest beside an image folder: the one CSV at the dataset root (or ``manifest=``),
   with an image column (image_id / image / filename / path, with or without extension), a
   label column (dx / label / diagnosis / class) and an optional group column (lesion_id /
   patient_id). Images are found by id in the root or any sub-folder. HAM10000 is this layout.

Loading does not decode images (validation does); it reports what it can see without
decoding: rows without a file, files without a row, empty and unknown labels. Each problem
names the file and says whether the item was skipped or kept.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermaclass.data.images import IMAGE_EXTENSIONS
from dermaclass.data.labels import KNOWN_CLASS_NAMES, full_name
from dermaclass.errors import DataError

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image_id", "image", "filename", "file_name", "file", "path", "image_path", "isic_id")
LABEL_COLUMNS = ("dx", "label", "diagnosis", "class", "target")
GROUP_COLUMNS = ("lesion_id", "patient_id", "lesion", "patient", "group")
#: Columns of the items table; manifest columns with these names are kept as ``meta_<name>``.
ITEM_COLUMNS = ("image", "path", "label", "group")

PROBLEM_KINDS: dict[str, str] = {
    "zero_byte": "file is empty (0 bytes)",
    "not_image": "not an image file",
    "unreadable": "image cannot be decoded",
    "truncated": "image data is truncated",
    "wrong_extension": "file extension does not match its content",
    "missing_file": "manifest row has no image file",
    "unlisted_file": "image file has no manifest row",
    "ambiguous_file": "several files match one manifest id",
    "duplicate_row": "image listed more than once in the manifest",
    "empty_label": "label is empty",
    "unknown_label": "label is not in the class list",
    "duplicate": "exact duplicate of another image with the same label",
    "duplicate_conflict": "exact duplicate of an image with a different label",
    "small_class": "class has fewer images than the minimum",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, naming the file and what was done about it."""

    kind: str
    file: str
    detail: str
    action: str  # "skipped": the image is not used; "kept": used, but look at it

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "file": self.file, "detail": self.detail, "action": self.action}


@dataclass
class Dataset:
    """A labelled image set: ``items`` has one row per usable image.

    ``items`` columns: ``image`` (stable id: manifest id, or ``label/file`` for folders),
    ``path`` (absolute file path), ``label``, ``group`` (lesion/patient id; the image id when
    the data has none), plus any other manifest columns (metadata such as dx_type, age).
    """

    root: Path
    layout: str
    items: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    manifest: Path | None = None
    columns: dict[str, str | None] = field(default_factory=dict)
    class_names: dict[str, str] = field(default_factory=dict)
    has_groups: bool = False

    @property
    def classes(self) -> list[str]:
        """Sorted labels present in the usable items."""
        return sorted(self.items["label"].unique().tolist())

    def names(self) -> dict[str, str]:
        """Full name of every class present."""
        return {c: full_name(c, self.class_names) for c in self.classes}


def _walk(root: Path, skip: set[Path], linked: list[Path] | None = None) -> list[Path]:
    """All regular files under root, skipping hidden files/folders and OS litter. Symbolic links
    to folders are not followed (they could leave the dataset); ``linked`` collects them so the
    caller can say so."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        if linked is not None:
            linked += [Path(dirpath) / d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        for name in sorted(filenames):
            if name.startswith(".") or name in {"Thumbs.db", "desktop.ini"}:
                continue
            p = Path(dirpath) / name
            if p not in skip:
                out.append(p)
    return out


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _find_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: Path
) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.strip().lower() in lower:
            return lower[wanted.strip().lower()]
        raise DataError(f"{source}: no {what} column named {wanted!r}; its columns are {', '.join(columns)}")
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


DELIMITERS = ",;\t|"  # European spreadsheet exports use ';'


def _delimiter(sample: str) -> str:
    """The manifest's delimiter, sniffed among ``DELIMITERS`` only: an open sniff once split a
    one-column file on a letter ('mage_', 'd'). Falls back to ','."""
    header = sample.splitlines()[0] if sample else ""
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return max(DELIMITERS, key=header.count) if any(d in header for d in DELIMITERS) else ","


def _read_csv(path: Path) -> pd.DataFrame:
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            with open(path, encoding=encoding, newline="") as f:
                sep = _delimiter(f.read(65536))
            return pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, encoding=encoding)
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
            raise DataError(f"{path}: cannot parse the CSV manifest ({exc})") from exc
    raise DataError(f"{path}: cannot decode the CSV manifest as UTF-8 or Latin-1")


def _vocabulary(labels: set[str], class_names: dict[str, str] | None) -> tuple[set[str] | None, str | None]:
    """The class list labels are checked against, and a note saying where it came from."""
    if class_names:
        return set(class_names), "labels checked against the given class-names file"
    if not labels:
        return None, None
    known = labels & set(KNOWN_CLASS_NAMES)
    # Mostly known codes: a stray label is far more likely a typo than a new class.
    if len(known) * 2 >= len(labels) and len(known) < len(labels):
        return set(KNOWN_CLASS_NAMES), (
            "most labels are known dermatology codes, so the others are reported as unknown; "
            "pass --class-names to declare a clinic's own classes"
        )
    return None, None


def _check_labels(
    items: pd.DataFrame, class_names: dict[str, str] | None, problems: list[Problem], notes: list[str]
) -> pd.DataFrame:
    empty = items["label"] == ""
    for file in items.loc[empty, "image"]:
        problems.append(Problem("empty_label", file, "label is empty", "skipped"))
    items = items[~empty]
    vocab, note = _vocabulary(set(items["label"]), class_names)
    if vocab is None:
        return items
    notes.append(note)
    unknown = ~items["label"].isin(vocab)
    for file, label in zip(items.loc[unknown, "image"], items.loc[unknown, "label"]):
        close = difflib.get_close_matches(label, sorted(vocab), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(Problem("unknown_label", file, f"label {label!r} is not in the class list{hint}", "skipped"))
    return items[~unknown]


def _load_folders(root: Path) -> tuple[pd.DataFrame, list[Problem], list[str]]:
    problems: list[Problem] = []
    notes: list[str] = []
    rows = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    names = {p.name.lower() for p in class_dirs}
    if names and names <= {"train", "valid", "val", "validation", "test"}:
        raise DataError(
            f"{root}: looks like a pre-split layout ({', '.join(sorted(names))}); dermaclass splits by "
            "lesion/patient itself. Merge the splits into one folder per class, or point at one of them."
        )
    linked: list[Path] = []
    files = _walk(root, skip=set(), linked=linked)
    for link in linked:
        problems.append(
            Problem(
                "symlink",
                _rel(link, root),
                "a symbolic link to a folder: not followed (its images "
                "are not read); copy them in or point at the real folder",
                "skipped",
            )
        )
    for path in files:
        rel = _rel(path, root)
        parts = rel.split("/")
        if len(parts) == 1:
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                problems.append(
                    Problem("empty_label", rel, "image at the dataset root, not in a class folder", "skipped")
                )
            continue  # README, licence files and the like at the root are not data
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(
                Problem("not_image", rel, f"not an image file (extension {path.suffix or 'none'!r})", "skipped")
            )
            continue
        rows.append({"image": rel, "path": str(path), "label": parts[0].strip(), "group": rel})
    if not rows:
        raise DataError(f"{root}: no images found (expected a CSV manifest or one folder per class)")
    notes.append("layout: one folder per class; no lesion/patient ids, so each image is its own group")
    return pd.DataFrame(rows), problems, notes


def _load_manifest(
    root: Path, manifest: Path, image_col: str | None, label_col: str | None, group_col: str | None
) -> tuple[pd.DataFrame, list[Problem], list[str], dict[str, str | None]]:
    problems: list[Problem] = []
    notes: list[str] = []
    table = _read_csv(manifest)
    cols = list(table.columns)
    for c in cols:  # pandas renames a repeated header "label" to "label.1"
        base, _, n = c.rpartition(".")
        if base in cols and n.isdigit():
            notes.append(f"{manifest.name}: column {base!r} appears more than once; the first one is used")
    icol = _find_column(cols, image_col, IMAGE_COLUMNS, "image", manifest)
    lcol = _find_column(cols, label_col, LABEL_COLUMNS, "label", manifest)
    gcol = _find_column(cols, group_col, GROUP_COLUMNS, "group", manifest)
    if icol is None or lcol is None:
        missing = "image" if icol is None else "label"
        flag = "--image-col" if icol is None else "--label-col"
        cands = IMAGE_COLUMNS if icol is None else LABEL_COLUMNS
        raise DataError(
            f"{manifest}: no {missing} column found among {', '.join(cols)} "
            f"(looked for {', '.join(cands)}); name it with {flag}"
        )
    mname = manifest.name

    files = [p for p in _walk(root, skip={manifest.resolve()}) if p.suffix.lower() != ".csv"]
    by_rel = {_rel(p, root): p for p in files}
    by_name: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_name.setdefault(p.name, []).append(p)
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(p.stem, []).append(p)

    rows = []
    seen: dict[str, int] = {}
    matched: set[Path] = set()
    for i, rec in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        raw = str(rec[icol]).strip().replace("\\", "/").removeprefix("./")
        where = f"{mname} row {i}"
        if not raw:
            problems.append(Problem("missing_file", where, "image id is empty", "skipped"))
            continue
        stem = Path(raw).stem if Path(raw).suffix.lower() in IMAGE_EXTENSIONS else Path(raw).name
        hits = [by_rel[raw]] if raw in by_rel else by_name.get(raw) or by_stem.get(stem) or []
        if not hits:
            problems.append(
                Problem("missing_file", f"{where} ({raw})", f"no file for image id {raw!r} under {root}", "skipped")
            )
            continue
        if len(hits) > 1:
            problems.append(
                Problem(
                    "ambiguous_file",
                    f"{where} ({raw})",
                    f"{len(hits)} files match: {', '.join(_rel(h, root) for h in hits[:3])}; using the first",
                    "kept",
                )
            )
        path = hits[0]
        matched.add(path)
        meta = {(f"meta_{k}" if k in ITEM_COLUMNS else k): v for k, v in rec.items() if k not in (icol, lcol, gcol)}
        group = str(rec[gcol]).strip() if gcol else ""
        rows.append({"image": raw, "path": str(path), "label": str(rec[lcol]).strip(), "group": group or raw, **meta})
        seen[raw] = seen.get(raw, 0) + 1

    items = pd.DataFrame(rows, columns=list(ITEM_COLUMNS) if not rows else None)
    # A manifest that lists an image twice: keep one if the labels agree, drop all if not.
    for raw in [k for k, n in seen.items() if n > 1]:
        labels = set(items.loc[items["image"] == raw, "label"])
        if len(labels) == 1:
            problems.append(Problem("duplicate_row", raw, f"listed {seen[raw]} times in {mname}; using one", "kept"))
        else:
            problems.append(
                Problem(
                    "duplicate_row", raw, f"listed {seen[raw]} times in {mname} with labels {sorted(labels)}", "skipped"
                )
            )
            items = items[items["image"] != raw]
    items = items.drop_duplicates("image")

    # Image files without a row, only in folders that hold manifest images: a masks/ folder
    # beside images/ (as HAM10000 ships) is not data and must not drown the report.
    data_dirs = {p.parent for p in matched}
    ignored_dirs: set[str] = set()
    for p in files:
        if p in matched or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.parent in data_dirs:
            problems.append(Problem("unlisted_file", _rel(p, root), f"image file has no row in {mname}", "skipped"))
        else:
            ignored_dirs.add(_rel(p.parent, root) if p.parent != root else ".")
    for d in sorted(ignored_dirs):
        notes.append(f"ignored folder {d}/: none of its files is in {mname}")
    if gcol is None:
        notes.append(f"{mname} has no lesion/patient column: each image is its own group")
    notes.insert(0, f"layout: CSV manifest {mname} (image={icol}, label={lcol}, group={gcol or 'none'})")
    return items, problems, notes, {"image": icol, "label": lcol, "group": gcol}


def find_manifest(root: Path) -> Path | None:
    """The one CSV at the dataset root, None when there is none; an error when ambiguous."""
    csvs = sorted(p for p in root.glob("*.csv") if p.is_file() and not p.name.startswith("."))
    if len(csvs) > 1:
        raise DataError(
            f"{root}: {len(csvs)} CSV files at the root ({', '.join(p.name for p in csvs)}); "
            "choose the manifest with --manifest FILE"
        )
    return csvs[0] if csvs else None


def load_dataset(
    root: str | Path,
    *,
    manifest: str | Path | None = None,
    image_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    class_names: dict[str, str] | None = None,
) -> Dataset:
    """Read a clinic's image set in either layout, without decoding images.

    Raises DataError (naming the path) when nothing usable can be read.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if root.is_file():
        if root.suffix.lower() == ".csv" and manifest is None:
            root, manifest = root.parent, root
        else:
            raise DataError(f"{root}: expected a dataset folder, got a file")
    mpath = Path(manifest).expanduser().resolve() if manifest is not None else find_manifest(root)
    if mpath is not None and not mpath.is_file():
        raise DataError(f"{mpath}: manifest not found")
    columns: dict[str, str | None] = {}
    if mpath is not None:
        items, problems, notes, columns = _load_manifest(root, mpath, image_col, label_col, group_col)
        layout = "manifest"
    else:
        items, problems, notes = _load_folders(root)
        layout = "folders"
    items = _check_labels(items, class_names, problems, notes).reset_index(drop=True)
    if items.empty:
        raise DataError(f"{mpath or root}: no usable labelled images ({len(problems)} problems)")
    log.info("loaded %d images in %d classes from %s (%s layout)", len(items), items["label"].nunique(), root, layout)
    return Dataset(
        root=root,
        layout=layout,
        items=items,
        problems=problems,
        notes=notes,
        manifest=mpath,
        columns=columns,
        class_names=dict(class_names or {}),
        has_groups=bool(columns.get("group")),
    )

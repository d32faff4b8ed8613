"""Class codes and their full names.

Labels are whatever a clinic's data has. This table gives full names to the codes
dermatology datasets use (HAM10000 / ISIC 2018-2019, and the ten clinical classes of the
dermoscopy application in seed 003), and decides which labels look like typos: when most
of a dataset's labels are codes from this table, a label outside it is reported as unknown.
A clinic with its own classes passes its own names (``--class-names FILE``).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from dermaclass.errors import DataError, EvaluationError

#: Codes seen in public dermoscopy datasets, with full names.
KNOWN_CLASS_NAMES: dict[str, str] = {
    # HAM10000 / ISIC 2018 Task 3
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
    # ISIC 2019 additions
    "ak": "actinic keratosis",
    "scc": "squamous cell carcinoma",
    "unk": "unknown / other",
    # seed 003's clinical classes
    "acne": "acne",
    "alopecia": "alopecia",
    "blister": "blister",
    "crust": "crust",
    "erythema": "erythema",
    "leuko": "leukoderma",
    "macula": "macula",
    "tumor": "tumor",
    "ulcer": "ulcer",
    "wheal": "wheal",
}


def load_class_names(path: Path) -> dict[str, str]:
    """Read a clinic's class list: code -> full name.

    Accepts JSON or YAML (a mapping, or a list of codes) and CSV/TSV with two columns
    ``code,name`` (a header row is optional).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: class-names file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class-names file ({exc})") from exc
    suffix = path.suffix.lower()
    if suffix in {".json", ".yaml", ".yml"}:
        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: not valid {suffix[1:].upper()} ({exc})") from exc
        if isinstance(data, list):
            data = {str(code): str(code) for code in data}
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a mapping code -> name or a list of codes")
        names = {str(k).strip(): str(v).strip() for k, v in data.items()}
    else:
        lines = text.splitlines()
        delimiter = "\t" if lines and "\t" in lines[0] else ","
        rows = [r for r in csv.reader(lines, delimiter=delimiter) if any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] in (
            ["code", "name"],
            ["label", "name"],
            ["class", "name"],
        ):
            rows = rows[1:]
        names = {}
        for row in rows:
            code = row[0].strip()
            names[code] = row[1].strip() if len(row) > 1 and row[1].strip() else code
    names = {k: v for k, v in names.items() if k}
    if not names:
        raise DataError(f"{path}: class-names file lists no classes")
    return names


def full_name(code: str, names: dict[str, str] | None = None) -> str:
    """The full name of a class code: the clinic's names first, then the known table."""
    if names and code in names:
        return names[code]
    return KNOWN_CLASS_NAMES.get(code, code)


def class_indices(labels: Sequence[object], classes: Sequence[str], *, source: str) -> np.ndarray:
    """The index in ``classes`` of every label, refusing labels a model does not know.

    The one place a label string becomes a class index outside training's DataLoaders (which
    pin the vocab): evaluation, calibration, the referral fit and the export checks. The error
    names ``source`` and each unknown label with its count, and says what to do.
    """
    index = {str(c): i for i, c in enumerate(classes)}
    text = [str(v) for v in labels]
    unknown = Counter(v for v in text if v not in index)
    if unknown:
        listed = ", ".join(f"{lab!r} ({n} image{'s' if n > 1 else ''})" for lab, n in unknown.most_common())
        raise EvaluationError(
            f"{source}: labels the model does not know: {listed}; the model's classes are "
            f"{', '.join(map(str, classes))}. Relabel, drop them, or train a model that has them."
        )
    return np.array([index[v] for v in text], dtype=np.int64)

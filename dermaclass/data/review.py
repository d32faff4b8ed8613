"""The review folder: clinicians' corrections saved in the CSV-manifest layout for retraining.

When a clinician marks a prediction wrong in the app and gives the right label, the image
and the label go to ``REVIEW/images/<content hash>.<ext>`` and a row of
``REVIEW/labels.csv`` (image, label, predicted, probability, model, note, saved, and for the
audit the original file name and an optional lesion/patient id). Every field is quoted and a
note is limited to ``MAX_NOTE`` characters with its line breaks normalised, so no input can
make the manifest unreadable (a 1 MB note or a bare carriage return once did). The folder
is a dataset the data layer reads as it is, so ``dermaclass train DATA REVIEW`` (or
``dermaclass data validate REVIEW``) picks the corrections up: the loop from the clinic
back to training. Every write is atomic (temp file, then rename) and the manifest is
rewritten under a lock, so concurrent app users never corrupt it; saving the same image
twice updates its row rather than duplicating it.
"""

from __future__ import annotations

import csv
import threading
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from dermaclass.data.images import content_hash, load_rgb
from dermaclass.errors import DataError
from dermaclass.fileio import atomic_path

MANIFEST = "labels.csv"
COLUMNS = ("image", "label", "predicted", "probability", "model", "note", "saved", "original_name", "lesion")
MAX_NOTE = 2000  # characters; Python's csv module refuses fields over 131,072
MAX_FIELD = 200  # label, lesion id, file name


def _clean(text: str | None, *, field: str, limit: int) -> str:
    """One manifest field: line breaks normalised to \n, other control characters dropped, length checked."""
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or ord(ch) >= 32).strip()
    if len(text) > limit:
        raise DataError(
            f"the {field} is {len(text):,} characters long; at most {limit:,} are kept in the review "
            "manifest, so shorten it"
        )
    return text


_LOCK = threading.Lock()


def save_correction(
    review_dir: str | Path,
    image: str | Path | bytes,
    *,
    label: str,
    predicted: str | None = None,
    probability: float | None = None,
    model: str | None = None,
    note: str = "",
    original_name: str | None = None,
    lesion: str | None = None,
) -> dict[str, str | int]:
    """Store one corrected image and its label; returns the manifest row and the folder's size."""
    label = _clean(str(label or ""), field="label", limit=MAX_FIELD).replace("\n", " ")
    if not label:
        raise DataError("a correction needs the right label")
    note = _clean(note, field="note", limit=MAX_NOTE)
    original_name = _clean(original_name, field="file name", limit=MAX_FIELD).replace("\n", " ")
    lesion = _clean(lesion, field="lesion id", limit=MAX_FIELD).replace("\n", " ")
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    load_rgb(data)  # refuse to store something that is not a readable image (raises with the reason)
    digest = content_hash(data)[:16]
    suffix = (
        ".png"
        if data[:8] == b"\x89PNG\r\n\x1a\n"
        else ".jpg"
        if data[:3] == b"\xff\xd8\xff"
        else (Path(image).suffix.lower() if not isinstance(image, bytes) and Path(image).suffix else ".img")
    )
    review = Path(review_dir)
    rel = f"images/{digest}{suffix}"
    row = {
        "image": rel,
        "label": label,
        "predicted": predicted or "",
        "probability": "" if probability is None else f"{probability:.4f}",
        "model": model or "",
        "note": note,
        "saved": datetime.now(UTC).isoformat(timespec="seconds"),
        "original_name": original_name,
        "lesion": lesion,
    }
    with _LOCK:
        (review / "images").mkdir(parents=True, exist_ok=True)
        target = review / rel
        if not target.exists():
            with atomic_path(target) as tmp:
                Path(tmp).write_bytes(data)
        path = review / MANIFEST
        table = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame(columns=COLUMNS)
        table = table[table["image"] != rel]
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True).fillna("")
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False, quoting=csv.QUOTE_ALL, lineterminator="\n")
    return {**row, "corrections": len(table)}

"""Atomic file output: nothing a run writes is ever left half-written.

Every artefact (split files, configs, reports, bundles) goes to a temporary file in the same
folder and is renamed over the target, so a crash or power loss leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    With ``overwrite=False`` an existing target raises FileExistsError before anything is
    written. On an exception the temporary file is removed and the target is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: already exists; refusing to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        if tmp_path.exists():
            tmp_path.chmod(0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Write text atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, *, overwrite: bool = True) -> Path:
    """Write JSON atomically (indented, UTF-8, keys in insertion order)."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", overwrite=overwrite)


def record_fields(record: Any, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A frozen dataclass record's fields as JSON-ready values (tuples as lists), ``format``
    first, in field order (the typed records of model.json and report.json)."""
    import dataclasses

    out: dict[str, Any] = {"format": record.format}
    for f in dataclasses.fields(record):
        if f.name not in ("format", *skip):
            v = getattr(record, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def check_record_header(
    d: Any, *, source: Any, kind: str, current: int, required: tuple[str, ...], error: type[Exception]
) -> None:
    """What every typed record checks first in its parsed JSON: an object, a format version this
    code reads (``current`` or older), and the keys it cannot do without; ``error`` names the file."""
    if not isinstance(d, dict):
        raise error(f"{source}: {kind} must be a JSON object, not {type(d).__name__}")
    fmt = d.get("format", current)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise error(f"{source}: format is {fmt!r}, not a format version")
    if fmt > current:
        raise error(f"{source}: format {fmt} is newer than this dermaclass reads ({current}); upgrade dermaclass")
    missing = [k for k in required if k not in d]
    if missing:
        raise error(f"{source}: {kind} lacks {', '.join(missing)}")

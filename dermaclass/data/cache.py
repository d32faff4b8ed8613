"""Decode once: a disk cache of decoded, resized uint8 images keyed by content hash and size.

On 2 CPU cores, decoding and resizing JPEGs at every epoch costs a large share of the
training step, so images are decoded once into memory-mapped ``.npy`` shards. An image's
key is the hash of its bytes, so a renamed or re-exported file is still a hit, an edited
file is a miss, and a retraining run with a few new images decodes only those.

Layout: ``<cache_dir>/<W>x<H>/shard-*.npy`` (N x H x W x 3 uint8) with a ``.json`` index of
the hashes in row order. The JSON is renamed into place last: a shard without its index is
an interrupted write and is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dermaclass.data.images import content_hash, fit_to_size, load_rgb
from dermaclass.fileio import atomic_path, write_json

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$DERMACLASS_CACHE``, else ``$XDG_CACHE_HOME/dermaclass``, else ``~/.cache/dermaclass``."""
    if os.environ.get("DERMACLASS_CACHE"):
        return Path(os.environ["DERMACLASS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dermaclass"


def decode_resized(path: str, size: tuple[int, int]) -> np.ndarray:
    """Decode a file to an (H, W, 3) uint8 array of the given (width, height)."""
    # draft() lets libjpeg decode big images at a fraction of full size: far less work.
    return fit_to_size(load_rgb(path, draft=(size[0] * 2, size[1] * 2)), size)


def _decode_job(args: tuple[str, tuple[int, int]]) -> np.ndarray:
    return decode_resized(*args)


def _file_hash(path: str) -> str:
    return content_hash(Path(path).read_bytes())


class DecodeCache:
    """Decoded images of one size, shared by every dataset and run on this machine."""

    def __init__(self, root: str | Path | None, size: tuple[int, int]) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.dir = Path(root or default_cache_dir()) / f"{self.size[0]}x{self.size[1]}"

    def index(self) -> dict[str, tuple[str, int]]:
        """hash -> (shard file name, row) over all complete shards."""
        out: dict[str, tuple[str, int]] = {}
        if not self.dir.is_dir():
            return out
        for meta in sorted(self.dir.glob("shard-*.json")):
            try:
                hashes = json.loads(meta.read_text())["hashes"]
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable cache index %s", meta)
                continue
            shard = meta.with_suffix(".npy").name
            if not (self.dir / shard).is_file():
                continue
            for row, h in enumerate(hashes):
                out.setdefault(h, (shard, row))
        return out

    def ensure(
        self,
        paths: Sequence[str],
        hashes: Sequence[str] | None = None,
        *,
        workers: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> CachedImages:
        """Make sure every file is cached (decoding only the misses); return an array view.

        ``hashes`` are the files' content hashes when already known (validation computes
        them); otherwise the files are read and hashed here, which is cheap next to decoding.
        """
        paths = [str(p) for p in paths]
        if hashes is None:
            hashes = [_file_hash(p) for p in paths]
        hashes = list(hashes)
        index = self.index()
        todo: dict[str, str] = {}
        for p, h in zip(paths, hashes):
            if h not in index and h not in todo:
                todo[h] = p
        if todo:
            self._write_shard(list(todo.items()), workers=workers, progress=progress)
            index = self.index()
        log.info("decode cache %s: %d images, %d decoded now", self.dir, len(paths), len(todo))
        return CachedImages(self.dir, [index[h] for h in hashes], self.size)

    def _write_shard(
        self, todo: list[tuple[str, str]], *, workers: int | None, progress: Callable[[int, int], None] | None
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        width, height = self.size
        name = f"shard-{uuid.uuid4().hex[:12]}"
        jobs = [(p, self.size) for _, p in todo]
        workers = workers or min(os.cpu_count() or 1, 8)
        with atomic_path(self.dir / f"{name}.npy") as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(todo), height, width, 3))
            if workers > 1 and len(jobs) >= 64:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    decoded = pool.map(_decode_job, jobs, chunksize=32)
                    self._fill(arr, decoded, progress)
            else:
                self._fill(arr, map(_decode_job, jobs), progress)
            arr.flush()
            del arr
        # The index goes last: it is what makes the shard visible.
        write_json(self.dir / f"{name}.json", {"size": [width, height], "hashes": [h for h, _ in todo]})

    @staticmethod
    def _fill(arr: np.ndarray, decoded, progress: Callable[[int, int], None] | None) -> None:
        total = len(arr)
        for i, img in enumerate(decoded):
            arr[i] = img
            if progress is not None and ((i + 1) % 256 == 0 or i + 1 == total):
                progress(i + 1, total)


class CachedImages(Sequence[np.ndarray]):
    """A list-like view of cached images in item order; cheap to pickle into DataLoader workers.

    Shards are opened lazily (memory-mapped, read-only) in whichever process reads them.
    """

    def __init__(self, directory: Path, locations: list[tuple[str, int]], size: tuple[int, int]) -> None:
        self.directory = Path(directory)
        self.locations = locations
        self.size = size
        self._open: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        shard, row = self.locations[i]
        arr = self._open.get(shard)
        if arr is None:
            arr = self._open[shard] = np.load(self.directory / shard, mmap_mode="r")
        return np.array(arr[row])  # a private copy: augmentations may write to it

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # memmaps are reopened in the receiving process
        return state

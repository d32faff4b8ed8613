"""The decode cache decodes each image once, keyed by content, and survives interruptions."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
from conftest import save_image

from dermaclass.data import DecodeCache
from dermaclass.data import cache as cache_module


def test_decodes_once_and_reads_back(folder_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    paths = sorted(str(p) for p in folder_dataset.rglob("*.jpg"))
    calls = []
    real = cache_module.decode_resized
    monkeypatch.setattr(cache_module, "decode_resized", lambda p, s: calls.append(p) or real(p, s))
    cache = DecodeCache(tmp_path / "cache", (16, 12))
    images = cache.ensure(paths, workers=1)
    assert len(calls) == len(paths) and len(images) == len(paths)
    assert images[0].shape == (12, 16, 3) and images[0].dtype == np.uint8
    expected = real(paths[3], (16, 12))
    np.testing.assert_array_equal(images[3], expected)
    again = cache.ensure(paths, workers=1)
    assert len(calls) == len(paths)  # second run: all hits
    np.testing.assert_array_equal(again[3], expected)
    # A renamed copy is a hit (content key); a new image is the only miss.
    shutil.copy(paths[0], tmp_path / "renamed.jpg")
    new = save_image(tmp_path / "new.jpg", seed=4242)
    cache.ensure([str(tmp_path / "renamed.jpg"), str(new)], workers=1)
    assert calls[-1] == str(new) and len(calls) == len(paths) + 1


def test_interrupted_shard_is_ignored(folder_dataset: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in folder_dataset.rglob("*.jpg"))[:4]
    cache = DecodeCache(tmp_path, (8, 8))
    cache.ensure(paths, workers=1)
    (cache.dir / "shard-dead.npy").write_bytes(b"partial")  # no index: never visible
    assert len(cache.index()) == 4


def test_cached_images_pickle_for_workers(folder_dataset: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in folder_dataset.rglob("*.jpg"))[:3]
    images = DecodeCache(tmp_path, (8, 6)).ensure(paths, workers=1)
    first = images[0]
    clone = pickle.loads(pickle.dumps(images))
    np.testing.assert_array_equal(clone[0], first)
    first[:] = 0  # a returned array is a private copy
    assert images[0].any()


def test_aspect_ratio_is_kept(tmp_path: Path) -> None:
    path = save_image(tmp_path / "wide.png", seed=3, size=(80, 20), fmt="PNG")
    arr = cache_module.decode_resized(str(path), (20, 20))
    assert arr.shape == (20, 20, 3)  # centre crop, not a squeeze

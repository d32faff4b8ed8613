"""Shared fixtures: tiny generated clinic datasets, and the HAM10000 copy in ../shared when present."""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HAM10000 = Path(os.environ.get("HAM10000_DIR") or ROOT / ".." / "shared" / "data" / "ham10000").resolve()
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def noise_image(seed: int, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Image.Image:
    """A unique random image (random content, so no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def save_image(path: Path, seed: int, *, mode: str = "RGB", fmt: str | None = None, size=(32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = noise_image(seed, size, mode)
    fmt = fmt or {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}.get(path.suffix.lower(), "JPEG")
    img.save(path, format=fmt)
    return path


def jpeg_bytes(seed: int, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    noise_image(seed, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """A clean folder-per-class dataset: 3 classes x 12 images."""
    root = tmp_path / "clinic"
    for c, label in enumerate(("acne", "crust", "ulcer")):
        for i in range(12):
            save_image(root / label / f"{label}_{i:02d}.jpg", seed=100 * c + i)
    return root


@pytest.fixture
def manifest_dataset(tmp_path: Path) -> Path:
    """A clean CSV-manifest dataset in HAM10000's shape: 3 classes, lesions with 1-2 images."""
    root = tmp_path / "export"
    rows = []
    n = 0
    for label in ("mel", "nv", "bkl"):
        for lesion in range(10):
            for _ in range(1 + lesion % 2):
                image_id = f"IMG_{n:04d}"
                save_image(root / "images" / f"{image_id}.jpg", seed=n)
                rows.append({"lesion_id": f"L_{label}_{lesion}", "image_id": image_id, "dx": label, "age": "50"})
                n += 1
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture
def ham_subset(tmp_path: Path) -> Path:
    """A small real HAM10000 subset (first 10 lesions per class) copied with its manifest."""
    if not (HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 not found at {HAM10000} (see ../shared/data/ham10000/README.md)")
    meta = pd.read_csv(HAM10000 / "HAM10000_metadata.csv")
    lesions = meta.groupby("dx")["lesion_id"].apply(lambda s: list(dict.fromkeys(s))[:10]).explode()
    subset = meta[meta["lesion_id"].isin(set(lesions))]
    root = tmp_path / "ham_subset"
    (root / "images").mkdir(parents=True)
    for image_id in subset["image_id"]:
        shutil.copy(HAM10000 / "images" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
    subset.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """Three classes a network can tell apart (a dominant colour channel), 20 images each."""
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for c, label in enumerate(("bkl", "mel", "nv")):
        (root / label).mkdir()
        for i in range(20):
            arr = rng.integers(0, 60, (24, 32, 3)).astype(np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


#: A tiny test network trained in seconds on ``colour_data`` (its classes differ only in colour,
#: so no colour constancy), for the fixtures and tests that need a trained bundle.
TINY = dict(
    image_size="32,24", batch_size=8, arch="test_resnet", pretrained=False, head_epochs=0, epochs=2,
    recipe="baseline", lr=1e-2, colour_constancy="none",
)  # fmt: skip
#: The same network's flags for `dermaclass train` in a subprocess (stepwise, two stages).
TINY_TRAIN_FLAGS = (
    "--image-size 32,24 --batch-size 8 --arch test_resnet --no-pretrained --head-epochs 1 "
    "--stage-fractions 0.5,1.0 --lr 1e-3 --threads 1"
).split()


def tiny_config(tmp: Path, **changes):
    """``TINY`` with its own decode cache under ``tmp``, and ``changes``."""
    from dermaclass.config import load_config

    return load_config(**{**TINY, "cache_dir": str(tmp / "cache"), **changes})


def train_command(data: Path, run: Path, *flags: str) -> list[str]:
    """`python -m dermaclass train DATA --out RUN` on the tiny network, with ``flags`` added."""
    import sys

    return [sys.executable, "-m", "dermaclass", "train", str(data), "--out", str(run), *TINY_TRAIN_FLAGS, *flags]


@pytest.fixture(scope="session")
def tiny_bundle(colour_data: Path, tmp_path_factory) -> Path:
    """A bundle trained in seconds on ``colour_data`` (baseline recipe, a tiny test network)."""
    from dermaclass.train import prepare_data, train

    tmp = tmp_path_factory.mktemp("bundle")
    cfg = tiny_config(tmp)
    run = tmp / "run"
    train(cfg, prepare_data(cfg, colour_data), run)
    return run


@pytest.fixture(scope="session")
def tiny_ensemble(colour_data: Path, tmp_path_factory) -> Path:
    """A cross-fitted ensemble of two tiny networks on ``colour_data`` (train/ensemble.py)."""
    from dermaclass.train import prepare_data, train_ensemble

    tmp = tmp_path_factory.mktemp("ensemble")
    cfg = tiny_config(tmp, members=2)
    train_ensemble(cfg, prepare_data(cfg, colour_data), tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="session")
def tiny_ensemble_heldout(colour_data: Path, tmp_path_factory) -> Path:
    """``tiny_ensemble`` with ``--ensemble-calibration valid``: the folds cut the train split
    only, so the valid split is held out from every member (a teacher a student may distil)."""
    from dermaclass.train import prepare_data, train_ensemble

    tmp = tmp_path_factory.mktemp("ensemble_heldout")
    cfg = tiny_config(tmp, members=2, ensemble_calibration="valid")
    train_ensemble(cfg, prepare_data(cfg, colour_data), tmp / "run")
    return tmp / "run"


def free_port() -> int:
    """A free loopback port for a launched app."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

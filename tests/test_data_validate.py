"""Validation finds every kind of problem a clinic export has, naming each file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HAM_CLASSES, jpeg_bytes, save_image
from PIL import Image

from dermaclass.data import load_dataset, validate


def _problems(validation) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in validation.to_dict()["problems"]["list"]:
        out.setdefault(p["kind"], []).append(p)
    return out


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A folder-per-class export with one of every file problem."""
    root = tmp_path / "messy"
    for c, label in enumerate(("mel", "nv")):
        for i in range(12):
            save_image(root / label / f"ok_{i:02d}.jpg", seed=1000 * c + i)
    (root / "mel" / "zero.jpg").write_bytes(b"")
    (root / "mel" / "text.jpg").write_text("this is not an image")
    (root / "mel" / "notes.txt").write_text("clinic notes")
    (root / "nv" / "truncated.jpg").write_bytes(jpeg_bytes(7)[:400])
    png = root / "nv" / "ok_00.png"
    save_image(png, seed=5, fmt="PNG")
    data = bytearray(png.read_bytes())
    data[60:200] = bytes(140)  # zero out the compressed pixel data: a broken PNG
    (root / "nv" / "corrupt.png").write_bytes(bytes(data))
    png.unlink()
    save_image(root / "nv" / "really_png.jpg", seed=9, fmt="PNG")  # wrong extension
    save_image(root / "nv" / "gray.png", seed=11, mode="L")
    save_image(root / "nv" / "rgba.png", seed=12, mode="RGBA")
    save_image(root / "nv" / "palette.png", seed=13, mode="P")
    save_image(root / "nv" / "deep.png", seed=14, mode="I;16")
    save_image(root / "nv" / "cmyk.jpg", seed=15, mode="CMYK")
    shutil.copy(root / "mel" / "ok_00.jpg", root / "mel" / "copy_of_ok_00.jpg")  # same-class duplicate
    save_image(root / "mell" / "typo.jpg", seed=2000)  # a typo'd class folder: an unknown label
    shutil.copy(root / "mel" / "ok_05.jpg", root / "nv" / "mel_as_nv.jpg")  # cross-class duplicate
    save_image(root / "stray.jpg", seed=99)  # image outside any class folder
    return root


def test_every_problem_is_named(messy_folder: Path) -> None:
    v = validate(load_dataset(messy_folder))
    problems = _problems(v)
    files = {kind: {p["file"] for p in ps} for kind, ps in problems.items()}
    assert files["zero_byte"] == {"mel/zero.jpg"}
    assert files["not_image"] == {"mel/text.jpg", "mel/notes.txt"}
    assert files["truncated"] == {"nv/truncated.jpg"}
    assert files["unreadable"] == {"nv/corrupt.png"}
    assert files["wrong_extension"] == {"nv/really_png.jpg"}
    (dup,) = problems["duplicate"]  # one of the pair is named, pointing at the other
    pair = {"mel/ok_00.jpg", "mel/copy_of_ok_00.jpg"}
    assert dup["file"] in pair and (pair - {dup["file"]}).pop() in dup["detail"]
    assert files["duplicate_conflict"] == {"mel/ok_05.jpg", "nv/mel_as_nv.jpg"}
    assert files["unknown_label"] == {"mell/typo.jpg"}
    assert "did you mean 'mel'" in problems["unknown_label"][0]["detail"]
    assert files["empty_label"] == {"stray.jpg"}
    # what was skipped is not in the usable items; what was kept is
    usable = set(v.items["image"])
    for kind in ("zero_byte", "not_image", "truncated", "unreadable", "duplicate_conflict", "unknown_label"):
        assert not usable & files[kind], kind
    assert {"nv/really_png.jpg", "mel/copy_of_ok_00.jpg", "mel/ok_00.jpg"} <= usable


def test_modes_are_reported_and_converted(messy_folder: Path) -> None:
    stats = validate(load_dataset(messy_folder)).to_dict()
    assert {"L", "RGBA", "P", "I;16", "CMYK", "RGB"} <= set(stats["image_modes"])
    assert stats["converted_to_rgb"] == 5
    assert any("converted to RGB" in n for n in stats["notes"])


def test_counts_groups_and_imbalance(manifest_dataset: Path) -> None:
    stats = validate(load_dataset(manifest_dataset)).to_dict()
    assert stats["images"] == 45 and stats["classes"] == 3 and stats["groups"] == 30
    assert stats["group_label"] == "lesions"
    per = {c["label"]: c for c in stats["per_class"]}
    assert per["mel"]["images"] == 15 and per["mel"]["groups"] == 10
    assert per["mel"]["name"] == "melanoma"
    assert stats["imbalance_ratio"] == 1.0
    assert stats["problems"]["total"] == 0


def test_small_class_is_reported(manifest_dataset: Path) -> None:
    stats = validate(load_dataset(manifest_dataset), min_per_class=20).to_dict()
    small = [p for p in stats["problems"]["list"] if p["kind"] == "small_class"]
    assert len(small) == 3 and all(p["action"] == "kept" for p in small)


def test_huge_image_is_refused(tmp_path: Path, monkeypatch) -> None:
    from dermaclass.data import images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = save_image(tmp_path / "a" / "big.png", seed=1, fmt="PNG")
    info = images.inspect_file(path)
    assert info.problem == "unreadable" and "pixel limit" in info.detail


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    from dermaclass.data.images import load_rgb

    arr = (pd.Series(range(64 * 48)).to_numpy().reshape(48, 64) * 20).astype("uint16")
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    values = set(np.asarray(rgb)[..., 0].ravel().tolist())
    assert len(values) > 100  # clipping at 255 would leave only a handful of levels


@pytest.mark.slow
def test_real_ham10000_subset(ham_subset: Path) -> None:
    v = validate(load_dataset(ham_subset))
    stats = v.to_dict()
    assert stats["classes"] == 7
    assert {c["label"] for c in stats["per_class"]} == set(HAM_CLASSES)
    assert all(c["groups"] == 10 for c in stats["per_class"])
    assert stats["image_modes"] == {"RGB": stats["images"]}
    assert stats["sizes"]["most_common"][0]["size"] == "200x150"
    assert stats["problems"]["total"] == 0

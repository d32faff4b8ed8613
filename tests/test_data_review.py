"""The review folder: corrections in the CSV-manifest layout that training reads back."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import noise_image

from dermaclass.config import load_config
from dermaclass.data import validate_source
from dermaclass.data.images import ImageDecodeError
from dermaclass.data.review import save_correction
from dermaclass.errors import DataError


def test_corrections_form_a_dataset(tmp_path: Path) -> None:
    review = tmp_path / "review"
    for i, label in enumerate(["mel", "nv", "mel"]):
        src = tmp_path / f"up{i}.png"
        noise_image(i).save(src)
        row = save_correction(review, src, label=label, predicted="bkl", probability=0.7, model="m", note="biopsy")
    assert row["corrections"] == 3
    table = pd.read_csv(review / "labels.csv")
    assert table["label"].tolist() == ["mel", "nv", "mel"] and table["note"].eq("biopsy").all()
    v = validate_source(review, **load_config().source_settings())
    assert len(v.items) == 3 and sorted(v.items["label"]) == ["mel", "mel", "nv"]
    assert not [p for p in v.problems if p.action == "skipped"]


def test_same_image_updates_its_row(tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    noise_image(5).save(src)
    save_correction(tmp_path / "r", src, label="mel")
    row = save_correction(tmp_path / "r", src.read_bytes(), label="bcc")
    assert row["corrections"] == 1
    assert pd.read_csv(tmp_path / "r" / "labels.csv")["label"].tolist() == ["bcc"]
    assert len(list((tmp_path / "r" / "images").iterdir())) == 1


def test_refuses_non_images_and_empty_labels(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageDecodeError):
        save_correction(tmp_path / "r", bad, label="mel")
    good = tmp_path / "g.png"
    noise_image(1).save(good)
    with pytest.raises(DataError, match="right label"):
        save_correction(tmp_path / "r", good, label=" ")
    assert not (tmp_path / "r" / "labels.csv").exists()


def test_notes_cannot_break_the_manifest(tmp_path: Path) -> None:
    from dermaclass.data.review import MAX_NOTE

    review = tmp_path / "r"
    src = tmp_path / "a.png"
    noise_image(3).save(src)
    with pytest.raises(DataError, match="note is .* characters long"):
        save_correction(review, src, label="mel", note="x" * (MAX_NOTE + 1))
    save_correction(
        review, src, label="mel", note='first line\rsecond, "quoted"\r\nthird', original_name="IMG 1.jpg", lesion="L-9"
    )
    other = tmp_path / "b.png"
    noise_image(4).save(other)
    save_correction(review, other, label="nv")
    table = pd.read_csv(review / "labels.csv", dtype=str, keep_default_na=False)
    assert len(table) == 2 and table["note"][0] == 'first line\nsecond, "quoted"\nthird'
    assert table["original_name"][0] == "IMG 1.jpg" and table["lesion"].tolist() == ["L-9", ""]
    v = validate_source(review, **load_config().source_settings())
    assert len(v.items) == 2

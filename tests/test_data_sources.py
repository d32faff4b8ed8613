"""Both clinic layouts load without flags; manifest problems name the row and the file."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pandas as pd
import pytest
from conftest import HAM10000, save_image

from dermaclass.config import load_config
from dermaclass.data import load_class_names, load_dataset
from dermaclass.errors import DataError


def test_folder_layout(folder_dataset: Path) -> None:
    ds = load_dataset(folder_dataset)
    assert ds.layout == "folders"
    assert ds.classes == ["acne", "crust", "ulcer"]
    assert len(ds.items) == 36
    assert ds.items["image"].iloc[0] == "acne/acne_00.jpg"
    assert ds.names()["acne"] == "acne"
    assert not ds.problems


def test_manifest_layout_detects_columns(manifest_dataset: Path) -> None:
    ds = load_dataset(manifest_dataset)
    assert ds.layout == "manifest"
    assert ds.columns == {"image": "image_id", "label": "dx", "group": "lesion_id"}
    assert ds.has_groups and ds.items["group"].nunique() == 30
    assert "age" in ds.items.columns  # metadata is carried along
    assert not ds.problems


def test_manifest_ids_with_extension_paths_and_semicolons(tmp_path: Path) -> None:
    root = tmp_path / "d"
    save_image(root / "a" / "x1.png", seed=1)
    save_image(root / "b" / "deep" / "x2.jpg", seed=2)
    save_image(root / "x3.jpg", seed=3)
    (root / "labels.csv").write_text("Filename;Diagnosis;Patient_ID\nx1.png;mel;p1\nb/deep/x2.jpg;nv;p2\nx3;nv;p2\n")
    ds = load_dataset(root)
    assert ds.columns == {"image": "Filename", "label": "Diagnosis", "group": "Patient_ID"}
    assert sorted(Path(p).name for p in ds.items["path"]) == ["x1.png", "x2.jpg", "x3.jpg"]


def test_manifest_problems(manifest_dataset: Path) -> None:
    csv = manifest_dataset / "metadata.csv"
    table = pd.read_csv(csv, dtype=str)
    extra = pd.DataFrame(
        [
            {"lesion_id": "L_x", "image_id": "NOPE_1", "dx": "mel"},  # missing file
            {"lesion_id": "L_y", "image_id": "IMG_0000", "dx": "mel"},  # listed twice, same label
            {"lesion_id": "L_z", "image_id": "IMG_0001", "dx": "nv"},  # listed twice, other label
            {"lesion_id": "L_w", "image_id": "IMG_0002", "dx": ""},  # empty label is its own problem
        ]
    )
    pd.concat([table[table.image_id != "IMG_0002"], extra]).to_csv(csv, index=False)
    save_image(manifest_dataset / "images" / "EXTRA.jpg", seed=500)  # no row
    save_image(manifest_dataset / "masks" / "IMG_0000_segmentation.png", seed=501)  # not data
    ds = load_dataset(manifest_dataset)
    kinds = {(p.kind, p.file.split(" (")[0] if "row" in p.file else p.file) for p in ds.problems}
    assert ("missing_file", "metadata.csv row 45") in kinds or any(k == "missing_file" for k, _ in kinds)
    missing = [p for p in ds.problems if p.kind == "missing_file"]
    assert len(missing) == 1 and "NOPE_1" in missing[0].file and "metadata.csv row" in missing[0].file
    dup = {p.file: p.action for p in ds.problems if p.kind == "duplicate_row"}
    assert dup == {"IMG_0000": "kept", "IMG_0001": "skipped"}
    assert [p.file for p in ds.problems if p.kind == "unlisted_file"] == ["images/EXTRA.jpg"]
    assert [p.file for p in ds.problems if p.kind == "empty_label"] == ["IMG_0002"]
    assert any("ignored folder masks/" in n for n in ds.notes)
    assert "IMG_0001" not in set(ds.items["image"]) and (ds.items["image"] == "IMG_0000").sum() == 1


def test_unknown_labels_only_when_most_are_known(tmp_path: Path) -> None:
    own = tmp_path / "own"
    for label in ("acne", "wart", "mole"):  # a clinic's own classes: nothing is unknown
        save_image(own / label / "a.jpg", seed=zlib.crc32(label.encode()) % 1000)  # stable across processes
    assert not load_dataset(own).problems
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"acne": "Acne vulgaris", "wart": "Verruca"}))
    ds = load_dataset(own, class_names=load_class_names(names))
    assert [p.file for p in ds.problems if p.kind == "unknown_label"] == ["mole/a.jpg"]
    assert ds.names() == {"acne": "Acne vulgaris", "wart": "Verruca"}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("n.yaml", "mel: Melanoma\nnv: Naevus\n"),
        ("n.csv", "code,name\nmel,Melanoma\nnv,Naevus\n"),
        ("n.tsv", "mel\tMelanoma\nnv\tNaevus\n"),
    ],
)
def test_class_names_formats(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    assert load_class_names(tmp_path / name) == {"mel": "Melanoma", "nv": "Naevus"}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "no such folder"),
        (lambda r: r.mkdir(), "no images found"),
        (lambda r: (r.mkdir(), (r / "a.csv").write_text("x\n1\n"), (r / "b.csv").write_text("x\n1\n")), "--manifest"),
        (lambda r: (r.mkdir(), (r / "m.csv").write_text("foo,bar\n1,2\n")), "no image column found"),
        (lambda r: (r.mkdir(), (r / "train" / "mel").mkdir(parents=True)), "pre-split layout"),
    ],
)
def test_clear_errors_name_the_path(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message) as exc:
        load_dataset(root)
    assert str(root) in str(exc.value)


def test_column_flag_that_does_not_exist(manifest_dataset: Path) -> None:
    with pytest.raises(DataError, match="no label column named 'diag'.*lesion_id"):
        load_dataset(manifest_dataset, label_col="diag")


@pytest.mark.skipif(not (HAM10000 / "HAM10000_metadata.csv").is_file(), reason=f"HAM10000 not found at {HAM10000}")
def test_ham10000_loads_without_flags() -> None:
    ds = load_dataset(HAM10000)
    assert len(ds.items) == 10015 and ds.items["group"].nunique() == 7470
    assert ds.items["label"].value_counts().to_dict() == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    assert not ds.problems  # the masks/ folder is recognised as not data


def test_odd_manifests_symlinks_and_frames_are_reported(tmp_path: Path) -> None:
    """A one-column CSV split on a letter, a repeated header used silently, a symlinked class
    folder ignored silently, an animated GIF reduced to frame 1 silently."""
    from PIL import Image

    from dermaclass.data import validate_source
    from dermaclass.data.sources import _delimiter

    assert _delimiter("image\nimg_1.jpg\nimg_2.jpg\n") == ","
    assert _delimiter("image;label\na.jpg;mel\n") == ";" and _delimiter("image\tlabel\na.jpg\tmel\n") == "\t"
    root = tmp_path / "m"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 24), (40 * i, 90, 120)).save(root / f"img{i}.png")
    (root / "labels.csv").write_text(
        "image,label,label\n" + "".join(f"img{i}.png,{'mel' if i % 2 else 'nv'},x\n" for i in range(4))
    )
    v = validate_source(root, **load_config().source_settings())
    assert sorted(v.items["label"]) == ["mel", "mel", "nv", "nv"]
    assert any("'label' appears more than once" in n for n in v.dataset.notes)

    folders = tmp_path / "f"
    for label in ("mel", "nv"):
        (folders / label).mkdir(parents=True)
        Image.new("RGB", (32, 24), (200, 10, 10)).save(folders / label / "a.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 10)).save(elsewhere / "b.png")
    (folders / "bkl").symlink_to(elsewhere, target_is_directory=True)
    frames = [Image.new("RGB", (32, 24), (c, c, c)) for c in (10, 200)]
    frames[0].save(folders / "nv" / "anim.gif", save_all=True, append_images=frames[1:])
    v = validate_source(folders, **load_config().source_settings())
    kinds = {(p.kind, p.file) for p in v.problems}
    assert ("symlink", "bkl") in kinds and ("multi_frame", "nv/anim.gif") in kinds

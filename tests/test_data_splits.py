"""Splits are stratified, grouped (no lesion on two sides) and stable across retraining."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import HAM10000

from dermaclass.data import assign_split, load_dataset, make_split, read_split, write_split
from dermaclass.data.splits import n_folds, split_units
from dermaclass.errors import DataError


def _items(n_groups: int = 60, per_group: int = 2, labels=("a", "b", "c")) -> pd.DataFrame:
    rows = [
        {"image": f"g{g}_{i}", "label": labels[g % len(labels)], "group": f"g{g}", "hash": f"h{g}_{i}"}
        for g in range(n_groups)
        for i in range(per_group)
    ]
    return pd.DataFrame(rows)


def _crossing(split: pd.DataFrame) -> int:
    return int((split.groupby("group")["split"].nunique() > 1).sum())


def test_fold_count_realises_fractions() -> None:
    assert n_folds((0.7, 0.15, 0.15)) == 20
    assert n_folds((0.8, 0.1, 0.1)) == 10
    assert n_folds((0.6, 0.2, 0.2)) == 5


def test_grouped_stratified_and_seeded() -> None:
    items = _items()
    split = make_split(items, fractions=(0.6, 0.2, 0.2), seed=1)
    assert _crossing(split) == 0
    counts = split.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 8).all() and (counts.loc["train"] == 24).all()
    assert split.equals(make_split(items, fractions=(0.6, 0.2, 0.2), seed=1))
    assert not split.equals(make_split(items, fractions=(0.6, 0.2, 0.2), seed=2))


def test_duplicates_across_groups_share_a_side() -> None:
    items = _items()
    items.loc[items.image == "g5_0", "hash"] = "same"
    items.loc[items.image == "g8_1", "hash"] = "same"
    units = split_units(items)
    assert units[items.image == "g5_0"].iloc[0] == units[items.image == "g8_1"].iloc[0]
    for seed in range(5):
        split = make_split(items, fractions=(0.6, 0.2, 0.2), seed=seed).set_index("image")["split"]
        assert split["g5_0"] == split["g8_1"] == split["g5_1"] == split["g8_0"]


def test_tiny_data_keeps_every_split() -> None:
    split = make_split(_items(n_groups=6, per_group=1), fractions=(0.7, 0.15, 0.15))
    assert set(split["split"]) == {"train", "valid", "test"}


def test_bad_fractions() -> None:
    with pytest.raises(DataError, match="summing to 1"):
        make_split(_items(), fractions=(0.7, 0.2, 0.2))


def test_reuse_never_moves_old_images(tmp_path: Path) -> None:
    old_items = _items()
    old = make_split(old_items, fractions=(0.6, 0.2, 0.2), seed=0)
    write_split(old, tmp_path / "split.csv")
    # New data: one old image gone, a new image of an old (test) lesion, three new lesions.
    test_group = old.loc[old.split == "test", "group"].iloc[0]
    new_rows = pd.DataFrame(
        [{"image": "new_of_old", "label": "a", "group": test_group, "hash": "n0"}]
        + [{"image": f"n{g}", "label": "abc"[g], "group": f"new{g}", "hash": f"nh{g}"} for g in range(3)]
    )
    items = pd.concat([old_items.iloc[1:], new_rows], ignore_index=True)
    split, counts = assign_split(items, read_split(tmp_path / "split.csv"), fractions=(0.6, 0.2, 0.2))
    assert counts == {"kept": 119, "followed": 1, "assigned": 3, "dropped": 1}
    merged = split.merge(old, on="image", suffixes=("", "_old"))
    assert (merged["split"] == merged["split_old"]).all()
    assert split.set_index("image").loc["new_of_old", "split"] == "test"
    assert _crossing(split) == 0


def test_read_split_rejects_leaky_files(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("image,label,group,split\na,x,g1,train\nb,x,g1,test\n")
    with pytest.raises(DataError, match="more than one split"):
        read_split(path)
    path.write_text("image,split\na,holdout\n")
    with pytest.raises(DataError, match="unknown split"):
        read_split(path)


@pytest.mark.skipif(not (HAM10000 / "HAM10000_metadata.csv").is_file(), reason=f"HAM10000 not found at {HAM10000}")
def test_no_lesion_crosses_splits_on_full_ham10000() -> None:
    items = load_dataset(HAM10000).items
    split = make_split(items, seed=42)
    assert _crossing(split) == 0
    shares = split["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.02)
    assert shares["valid"] == pytest.approx(0.15, abs=0.02) and shares["test"] == pytest.approx(0.15, abs=0.02)
    per_class = split.groupby(["label", "split"]).size().unstack()
    assert (per_class["test"] / per_class.sum(axis=1)).between(0.10, 0.20).all()  # every class, stratified


def test_renamed_image_keeps_its_split_by_content_hash() -> None:

    items = pd.DataFrame(
        {
            "image": [f"i{k}" for k in range(40)],
            "label": ["a", "b"] * 20,
            "group": [f"g{k}" for k in range(40)],
            "hash": [f"h{k}" for k in range(40)],
        }
    )
    old = make_split(items, seed=1)
    assert "hash" in old.columns
    renamed = items.assign(image=[f"clinic/{i}" for i in items["image"]], group=[f"clinic:{g}" for g in items["group"]])
    new, counts = assign_split(renamed, old, seed=1)
    assert counts["kept"] == 40 and counts["assigned"] == 0 and counts["dropped"] == 0
    assert new["split"].tolist() == old["split"].tolist()


def test_thin_classes_are_listed_per_part() -> None:
    import pandas as pd

    from dermaclass.data.splits import thin_classes

    split = pd.DataFrame(
        {
            "label": ["a"] * 20 + ["b"] * 8,
            "split": ["train"] * 10 + ["valid"] * 5 + ["test"] * 5 + ["train"] * 6 + ["valid"] * 1 + ["test"] * 1,
        }
    )
    assert thin_classes(split) == {"valid": {"b": 1}, "test": {"b": 1}}
    assert thin_classes(split, minimum=6) == {"valid": {"a": 5, "b": 1}, "test": {"a": 5, "b": 1}}

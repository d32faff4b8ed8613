"""Demonstration: retrain a HAM10000 bundle on HAM10000 plus a folder of new images with a new class.

The new folder holds a class a clinic would add in practice: ``ungradable`` (images that are
not a readable dermoscopic lesion), made from patches of scikit-learn's two sample photographs
and synthetic textures (no download). ``dermaclass retrain`` then trains from the parent
bundle with its recipe and split, evaluates old and new on the parent's test split and writes
the comparison. This script prints and records (benchmarks/results/retrain_demo.json):
whether every image of the parent's split kept its split, how many new images went where,
the class lists, and the comparison's deltas and flags.

    python benchmarks/retrain_demo.py --parent runs/bench_baseline --out runs/retrain_demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data" / "ham10000"


def make_new_class(folder: Path, n: int = 150, seed: int = 0) -> Path:
    """``folder/ungradable/*.png``: 200x150 images that are not dermoscopic lesions."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = folder / "ungradable"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i % 3 < 2:
            photo = photos[i % 2]
            h, w = photo.shape[:2]
            s = rng.uniform(0.3, 0.9)
            cw, ch = int(w * s), int(w * s * 0.75)
            ch = min(ch, h)
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            img = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((200, 150))
        else:
            base = rng.integers(0, 256, 3)
            noise = rng.normal(0, rng.uniform(5, 60), (150, 200, 3))
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        img.save(out / f"ungradable_{i:04d}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", required=True, help="a bundle trained on HAM10000 (run folder with split.csv)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--new", default=None, help="folder for the generated new class [default: OUT-new-data]")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    parent, out = Path(args.parent), Path(args.out)
    new = Path(args.new or f"{out}-new-data")
    if not (new / "ungradable").is_dir():
        make_new_class(new)
    cmd = [
        sys.executable,
        "-m",
        "dermaclass",
        "retrain",
        str(parent),
        str(DATA),
        str(new),
        "--out",
        str(out),
        "--n-boot",
        str(args.n_boot),
    ]
    print("$", " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    old_split = pd.read_csv(parent / "split.csv", dtype=str)
    new_split = pd.read_csv(out / "split.csv", dtype=str)
    merged = old_split.merge(new_split, on="image", suffixes=("_old", "_new"))
    added = new_split[~new_split["image"].isin(old_split["image"])]
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    meta = json.loads((out / "model.json").read_text())
    result = {
        "parent": str(parent),
        "out": str(out),
        "exit_code": code,
        "old_images": len(old_split),
        "old_images_found": len(merged),
        "old_images_kept_split": int((merged["split_old"] == merged["split_new"]).sum()),
        "new_images_by_split": added["split"].value_counts().to_dict(),
        "classes_parent": meta["parent"]["classes"],
        "classes_new": meta["classes"],
        "compare_on_parent_test": {
            k: {kk: v[kk] for kk in ("old", "new", "delta", "delta_interval")} for k, v in cmp["overall"].items()
        },
        "sensitivity": {c: v["sensitivity"] for c, v in cmp["per_class"].items()},
        "sensitivity_drops": cmp["sensitivity_drops"],
        "new_model_valid": meta["metrics_valid"]["balanced_accuracy"],
    }
    print(
        f"old split kept: {result['old_images_kept_split']:,} of {result['old_images']:,} images; "
        f"new images: {result['new_images_by_split']}; classes {result['classes_parent']} -> {result['classes_new']}"
    )
    ba = result["compare_on_parent_test"]["balanced_accuracy"]
    print(
        f"parent test split: balanced accuracy {ba['old']:.4f} -> {ba['new']:.4f} ({ba['delta']:+.4f}, "
        f"{ba['delta_interval']}); sensitivity drops flagged: {result['sensitivity_drops'] or 'none'}"
    )
    write_json(RESULTS / "retrain_demo.json", result)
    print(f"wrote {RESULTS / 'retrain_demo.json'}")


if __name__ == "__main__":
    main()

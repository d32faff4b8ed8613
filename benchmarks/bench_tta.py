"""Benchmark: test-time augmentation over the dihedral group, on trained models of several seeds.

The bundle serves ``flips4`` (the mean logits of the image and its horizontal, vertical and
double flips). The lever screens ask whether the other four views of the dihedral group
D4 (the 90-degree rotations and the two transposes; dermoscopy has no up or down) buy more.
The network is fully convolutional up to a global pool, so a transposed 128x96 input (96x128)
goes through it as it is. Each view's logits are computed once per image; ``none``,
``flips4`` and ``dihedral8`` are means over subsets of them, so the three are paired on the
same network and images. Balanced accuracy and AUROC need no temperature (argmax and ranks
do not change with it), so none is refitted.

Measured on the HAM10000 test split of the shared split file and every image of the
external sets, for the shipped default's full-budget models (seed 42 is the bundled model).
Prints a table and writes benchmarks/results/tta.json.

    python benchmarks/bench_tta.py [--models SEED=BUNDLE ...] [--out tta.json] [--quick]

Ensembles: ``--models 42=runs/bench_ensemble/k3-full-seed42 ... --out tta_ensemble.json`` (each
view's logits are the bundle's combined logits, so the modes compare what it would serve).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from common import EXTERNAL, HAM, RESULTS, ROOT, SPLIT, fmt, mean_sd, repo_relative
from dermaclass.config import load_config
from dermaclass.evaluate.metrics import classification_metrics, softmax
from dermaclass.evaluate.run import split_images
from dermaclass.fileio import write_json
from dermaclass.serving.predictor import Predictor

# The dihedral group of the image: the first four are the bundle's flips4.
VIEWS = {
    "identity": lambda a: a,
    "flip_lr": lambda a: a[:, ::-1],
    "flip_ud": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
    "transpose": lambda a: a.transpose(1, 0, 2),
    "rot90": lambda a: a.transpose(1, 0, 2)[::-1],
    "rot270": lambda a: a.transpose(1, 0, 2)[:, ::-1],
    "anti_transpose": lambda a: a[::-1, ::-1].transpose(1, 0, 2),
}
# The first N views. flips2 (the image and its mirror) asks whether an ensemble, which already
# averages several networks, can serve half the views at the same accuracy: latency grows with
# members x views.
MODES = {"none": 1, "flips2": 2, "flips4": 4, "dihedral8": 8}
MODELS = [
    f"42={ROOT / 'models' / 'ham10000-effnet-lite0'}",
    *(f"{s}={ROOT / 'runs' / 'bench_levers' / 'full' / f'defaults-seed{s}'}" for s in (43, 44)),
]


def view_logits(predictor: Predictor, images, view) -> tuple[np.ndarray, float]:  # noqa: ANN001 - a decode-cache view
    """Logits of one view of every image (no TTA inside), and the seconds it took."""
    t = time.perf_counter()
    batch = [np.ascontiguousarray(view(np.asarray(images[i]))) for i in range(len(images))]
    return predictor.logits(batch, tta=False), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, help="SEED=BUNDLE of each trained model")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: the bundled model, 200 images a set, tta_quick.json"
    )
    ap.add_argument("--out", default="tta.json", help="results file name in benchmarks/results")
    args = ap.parse_args()
    cfg = load_config()
    models = args.models[:1] if args.quick else args.models
    rows = []
    for spec in models:
        seed, path = spec.split("=", 1)
        bundle = Path(path)
        if not (bundle / "model.json").is_file():
            print(f"skipped {spec}: no bundle there")
            continue
        predictor = Predictor(bundle, backend="torch", threads=cfg.threads)
        classes = predictor.classes
        sets = {"test": split_images(bundle, HAM, splits=("test",), split_file=SPLIT, cfg=cfg)["test"]}
        for name, folder in EXTERNAL.items():
            if folder.is_dir():
                sets[name] = split_images(bundle, folder, splits=("all",), cfg=cfg)["all"]
        row = {"seed": int(seed), "model": repo_relative(bundle), "sets": {}}
        for where, (labels, images) in sets.items():
            n = min(200, len(labels)) if args.quick else len(labels)
            picked = [images[i] for i in range(n)]
            y = np.array([classes.index(c) for c in labels[:n]])
            per_view, seconds = zip(*(view_logits(predictor, picked, v) for v in VIEWS.values()))
            row["sets"][where] = {"n": n, "seconds_per_view": round(float(np.mean(seconds)), 1)}
            for mode, k in MODES.items():
                m = classification_metrics(y, softmax(np.mean(per_view[:k], axis=0)), classes)
                row["sets"][where][mode] = {
                    "balanced_accuracy": m["balanced_accuracy"],
                    "macro_auroc": m["macro_auroc"],
                    "nv_sensitivity": m["per_class"]["nv"]["sensitivity"],
                    "mel_sensitivity": m["per_class"]["mel"]["sensitivity"],
                }
            print(
                f"seed {seed} {where}: "
                + ", ".join(f"{mode} {row['sets'][where][mode]['balanced_accuracy']:.3f}" for mode in MODES),
                flush=True,
            )
        rows.append(row)

    wheres = list(dict.fromkeys(w for r in rows for w in r["sets"]))
    summary = {
        w: {
            mode: {
                k: mean_sd([r["sets"][w][mode][k] for r in rows if w in r["sets"]])
                for k in ("balanced_accuracy", "macro_auroc", "nv_sensitivity")
            }
            | {
                "minus_flips4": mean_sd(
                    [
                        r["sets"][w][mode]["balanced_accuracy"] - r["sets"][w]["flips4"]["balanced_accuracy"]
                        for r in rows
                        if w in r["sets"]
                    ]
                )
            }
            for mode in MODES
        }
        for w in wheres
    }
    print(f"\nbalanced accuracy, mean ± sd over {len(rows)} models (difference from flips4):")
    for w in wheres:
        print(
            f"  {w:>9}: "
            + "  ".join(
                f"{mode} {fmt(summary[w][mode]['balanced_accuracy'])} ({summary[w][mode]['minus_flips4']['mean']:+.3f})"
                for mode in MODES
            )
        )
    out = RESULTS / (args.out.replace(".json", "_quick.json") if args.quick else args.out)
    write_json(
        out,
        {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "command": " ".join(["python", "benchmarks/bench_tta.py", *sys.argv[1:]]),
            "split_file": repo_relative(SPLIT),
            "views": list(VIEWS),
            "modes": MODES,
            "backend": "torch",
            "runs": rows,
            "summary": summary,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

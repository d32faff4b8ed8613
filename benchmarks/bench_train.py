"""Benchmark: wall time and validation figures of real training runs on HAM10000.

Runs ``dermaclass train`` once per named variant (a recipe plus flags) in a fresh run
folder, sequentially (2 cores: runs in parallel would only slow each other), and records
wall time, images seen, the stage plan and the validation balanced accuracy / macro-F1
from the run's ``summary.json``. ``--collect`` instead gathers finished run folders (for
runs started by hand with nohup). Every run is measured on the HAM10000 test split of its
split file and on every image of the external sets (``external``: derm7pt, isic2017). Nothing is asserted: the figures are printed and written
to ``benchmarks/results/<name>.json``.

    python benchmarks/bench_train.py --name default --runs-dir runs -- --recipe stepwise
    python benchmarks/bench_train.py --name mine --collect runs/run_a runs/run_b ...

Wall time here includes data validation and the decode cache lookup (the cache is built
once per machine; a first run also pays a few seconds of decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import EXTERNAL, measure
from dermaclass.evaluate.external import evaluate_external, headline
from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "ham10000"


def summarise(run_dir: Path, wall: float | None = None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    meta = json.loads((run_dir / "model.json").read_text())
    cfg = meta["config"]
    return {
        "run": str(run_dir),
        "recipe": meta["recipe"],
        "imbalance": cfg["imbalance"],
        "lr_rule": cfg["lr_rule"] if meta["recipe"] == "stepwise" else None,
        "lr": cfg["lr"],
        "lr_suggestion": cfg.get("lr_suggestion"),
        "seed": cfg.get("seed"),
        "image_size": cfg["image_size"],
        "valid_balanced_accuracy": summary["metrics_valid"]["balanced_accuracy"],
        "valid_macro_f1": summary["metrics_valid"]["macro_f1"],
        "valid_accuracy": summary["metrics_valid"]["accuracy"],
        "training_minutes": round(summary["seconds"] / 60, 2),
        "wall_minutes": round(wall / 60, 2) if wall is not None else None,
        "images_seen": summary["images_seen"],
        "stages": summary["stages"],
        "range_tests": summary.get("range_tests", []),
        "temperature": (meta.get("calibration") or {}).get("temperature"),
        "operating_points": meta.get("operating_points"),
        **_test_figures(run_dir),
    }


def _test_figures(run_dir: Path) -> dict:
    """Test-split figures (from `RUN/report/report.json` when `dermaclass evaluate` has been run, else
    measured now) and the external sets' figures (``external``), measured now."""
    path = run_dir / "report" / "report.json"
    split = run_dir / "split.csv"
    if path.is_file():
        sets = {k: v for k, v in EXTERNAL.items() if v.is_dir()}
        figures = {
            "test": headline(json.loads(path.read_text())),
            "external": evaluate_external(run_dir, sets, n_boot=200),
        }
    else:
        figures = measure(run_dir, split_file=split)
    t = figures["test"]
    return {
        "test_balanced_accuracy": t["balanced_accuracy"],
        "test_macro_f1": t["macro_f1"],
        "test_macro_auroc": t["macro_auroc"],
        **figures,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="results/<name>.json")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs"))
    ap.add_argument("--collect", nargs="*", help="finished run folders to gather instead of training")
    ap.add_argument("train_args", nargs="*", help="flags for dermaclass train (after --)")
    args = ap.parse_args()

    rows = []
    if args.collect:
        rows = [summarise(Path(d)) for d in args.collect]
    else:
        run_dir = Path(args.runs_dir) / f"bench_{args.name}"
        cmd = [sys.executable, "-m", "dermaclass", "train", args.data, "--out", str(run_dir), *args.train_args]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        rows = [summarise(run_dir, time.perf_counter() - start)]
    for r in rows:
        print(
            f"{r['run']:40} {r['recipe']:9} {r['imbalance']:12} valid balanced accuracy {r['valid_balanced_accuracy']:.4f} "
            f"macro-F1 {r['valid_macro_f1']:.4f}  {r['training_minutes']:.1f} min training"
            + (f", {r['wall_minutes']:.1f} min wall" if r["wall_minutes"] else "")
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"train_{args.name}.json"
    write_json(
        out, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "data": args.data, "runs": rows}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

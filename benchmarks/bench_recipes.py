"""Benchmark: baseline vs sgdr vs stepwise (and stepwise without weight sharing) on HAM10000.

Seed 001 claims that stepwise subset training beats the baseline at about 40 % less training
cost (cost = epochs x images, its Table IV); seed 003 claims a large time reduction from
SGDR + cycle-length multiplication + differential LRs. This script trains each variant on
the same lesion-grouped split (the first run's split file is reused by every later run, so
only the training seed changes), for each of ``--seeds``, then evaluates every bundle on
the test split and records balanced accuracy, macro-F1, images processed and wall time.

Budgets (``--budget``): ``default`` runs every recipe at its defaults; ``matched`` gives
the baseline the stepwise cost / 0.6 in epochs (the paper's 40 %-cheaper claim made
testable). ``--quick`` is a smoke run (one seed, one short epoch per phase).

Prints a table and writes benchmarks/results/recipes.json (recipes_quick.json for --quick).

    python benchmarks/bench_recipes.py [--seeds 42 43] [--budget default|matched] [--quick]
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

import numpy as np

from dermaclass import schedules
from dermaclass.config import Config, load_config
from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data" / "ham10000"


def variants(budget: str, quick: bool) -> dict[str, list[str]]:
    if quick:
        short = ["--head-epochs", "0"]
        return {"baseline": ["--recipe", "baseline", "--epochs", "1", *short],
                "sgdr": ["--recipe", "sgdr", "--n-cycles", "1", *short],
                "stepwise": ["--recipe", "stepwise", "--n-cycles", "1", "--stage-fractions", "0.5,1.0", *short],
                "stepwise-no-sharing": ["--recipe", "stepwise", "--n-cycles", "1", "--stage-fractions", "0.5,1.0",
                                        "--no-weight-sharing", *short]}
    out = {"baseline": ["--recipe", "baseline"], "sgdr": ["--recipe", "sgdr"], "stepwise": ["--recipe", "stepwise"],
           "stepwise-no-sharing": ["--recipe", "stepwise", "--no-weight-sharing"]}
    if budget == "matched":
        cfg = Config()
        plan = schedules.stage_plan(n_train=1, fractions=cfg.stage_fractions, batch_size=cfg.batch_size,
                                    lr_rule=cfg.lr_rule, head_epochs=cfg.head_epochs, n_cycles=cfg.n_cycles,
                                    cycle_len=cfg.cycle_len, cycle_mult=cfg.cycle_mult)
        epochs = max(1, round(schedules.training_cost(plan) / 0.6) - cfg.head_epochs)
        out["baseline"] = ["--recipe", "baseline", "--epochs", str(epochs)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_recipes"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    ap.add_argument("--budget", choices=("default", "matched"), default="default")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds = args.seeds[:1]
    from dermaclass.evaluate.run import evaluate_bundle

    runs_dir = Path(args.runs_dir) / ("quick" if args.quick else args.budget)
    runs_dir.mkdir(parents=True, exist_ok=True)
    split_file: Path | None = None
    rows = []
    for seed in args.seeds:
        for name, flags in variants(args.budget, args.quick).items():
            if args.only and name not in args.only:
                continue
            out = runs_dir / f"{name}-seed{seed}"
            cmd = [sys.executable, "-m", "dermaclass", "train", args.data, "--out", str(out), "--seed", str(seed), *flags]
            if split_file is not None:
                cmd += ["--split-file", str(split_file)]
            if not (out / "model.json").is_file():
                print("$", " ".join(cmd), flush=True)
                start = time.perf_counter()
                subprocess.run(cmd + (["--force"] if out.exists() else []), check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - start
            else:
                wall = None  # an earlier invocation trained it; its training time is in model.json
            split_file = split_file or out / "split.csv"
            meta = json.loads((out / "model.json").read_text())
            report = evaluate_bundle(out, args.data, split_file=split_file, cfg=load_config(), n_boot=args.n_boot).report
            rows.append({
                "variant": name, "seed": seed, "flags": flags,
                "test_balanced_accuracy": report["balanced_accuracy"],
                "test_balanced_accuracy_interval": report["intervals"]["overall"]["balanced_accuracy"],
                "test_macro_f1": report["macro_f1"], "test_macro_auroc": report["macro_auroc"],
                "valid_balanced_accuracy": meta["metrics_valid"]["balanced_accuracy"],
                "images_processed": meta["training"]["images_seen"],
                "full_data_epochs": meta["training"]["epochs_equivalent"],
                "training_minutes": round(meta["training"]["seconds"] / 60, 2),
                "wall_minutes": round(wall / 60, 2) if wall else None,
            })
            r = rows[-1]
            print(f"{name:20} seed {seed}: test balanced accuracy {r['test_balanced_accuracy']:.4f} "
                  f"macro-F1 {r['test_macro_f1']:.4f}; {r['images_processed']:,} images, "
                  f"{r['training_minutes']:.1f} min", flush=True)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        ba = [r["test_balanced_accuracy"] for r in rows if r["variant"] == name]
        summary[name] = {"seeds": len(ba), "test_balanced_accuracy_mean": float(np.mean(ba)),
                         "test_balanced_accuracy_sd": float(np.std(ba, ddof=1)) if len(ba) > 1 else None,
                         "images_processed_mean": float(np.mean([r["images_processed"] for r in rows if r["variant"] == name])),
                         "training_minutes_mean": float(np.mean([r["training_minutes"] for r in rows if r["variant"] == name]))}
    print("\nvariant               seeds  test bal. acc. (mean +- sd)   images processed   minutes")
    for name, s in summary.items():
        sd = f"{s['test_balanced_accuracy_sd']:.4f}" if s["test_balanced_accuracy_sd"] is not None else "-"
        print(f"{name:20}  {s['seeds']:5}  {s['test_balanced_accuracy_mean']:.4f} +- {sd:8}   "
              f"{s['images_processed_mean']:>14,.0f}   {s['training_minutes_mean']:7.1f}")
    out = RESULTS / ("recipes_quick.json" if args.quick else f"recipes_{args.budget}.json")
    write_json(out, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "budget": args.budget,
                     "seeds": args.seeds, "split_file": str(split_file), "runs": rows, "summary": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

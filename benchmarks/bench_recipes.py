"""Benchmark: baseline vs sgdr vs stepwise (and stepwise without weight sharing) on HAM10000.

Seed 001 claims that stepwise subset training beats the baseline at about 40 % less training
cost (cost = epochs x images; its baseline trains 100 epochs on all the data, its stepwise
plan 20 epochs on each of the 20/40/60/80/100 % subsets). Seed 003 claims a large time
reduction from SGDR + cycle-length multiplication + differential LRs. This script trains
every variant on the same lesion-grouped split (the bundled model's ``split.csv``, so only
the training seed changes), for each of ``--seeds``, evaluates
every bundle on the test split and on every image of the two external sets (``external``:
derm7pt and isic2017, compared on and never fitted on), and records balanced accuracy,
macro-F1, macro AUROC, images processed and wall time.

Budgets follow from ``--n-cycles`` N (SGDR cycles per stepwise stage; cycles of 1, 2, 4
epochs, so E = 2^N - 1 epochs per stage):

- ``stepwise``: the default recipe with N cycles per stage (cost about 3E + a head epoch on
  20 %); ``stepwise-no-sharing``: the same plan, every stage restarting from ImageNet
  weights (seed 001's Table IV ablation);
- ``baseline-matched``: fit_one_cycle on all the data for the stepwise cost / 0.6 (the
  paper's comparison: 5E epochs against 20+40+60+80+100 % of E);
- ``sgdr``: SGDR with N + 1 cycles and differential LRs; ``baseline-sgdr-cost``:
  fit_one_cycle for the same number of epochs, so seed 003's claim is tested at equal cost.

The default N = 1 keeps five variants x three seeds within about 90 minutes on 2 cores;
the shipped default (N = 3, 21 full-data epochs for stepwise) is measured once by
bench_train.py. ``--quick`` is a smoke run (one seed, one short epoch per phase). Results
are rewritten after every run, and a re-run keeps the measured rows of an unfinished
results file with the same budget (``--fresh`` starts over) and skips the bundles already
trained, so the benchmark can be finished over several sessions.

Prints a table and writes benchmarks/results/recipes.json (recipes_quick.json for --quick).

    python benchmarks/bench_recipes.py [--seeds 42 43 44] [--n-cycles 1] [--only stepwise sgdr] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from common import SPLIT, mean_sd, measure, train_run
from dermaclass import schedules
from dermaclass.config import Config
from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data" / "ham10000"


def variants(n_cycles: int, quick: bool) -> dict[str, list[str]]:
    """The trainer flags of each variant (see the module docstring for the budgets)."""
    if quick:
        short = ["--head-epochs", "0"]
        return {
            "baseline-matched": ["--recipe", "baseline", "--epochs", "1", *short],
            "sgdr": ["--recipe", "sgdr", "--n-cycles", "1", *short],
            "stepwise": ["--recipe", "stepwise", "--n-cycles", "1", "--stage-fractions", "0.5,1.0", *short],
            "stepwise-no-sharing": [
                "--recipe",
                "stepwise",
                "--n-cycles",
                "1",
                "--stage-fractions",
                "0.5,1.0",
                "--no-weight-sharing",
                *short,
            ],
        }
    cfg = Config()
    plan = schedules.stage_plan(
        n_train=1,
        fractions=cfg.stage_fractions,
        batch_size=cfg.batch_size,
        lr_rule=cfg.lr_rule,
        head_epochs=cfg.head_epochs,
        n_cycles=n_cycles,
        cycle_len=cfg.cycle_len,
        cycle_mult=cfg.cycle_mult,
    )
    matched = max(1, round(schedules.training_cost(plan) / 0.6) - cfg.head_epochs)
    sgdr_epochs = schedules.sgdr_epochs(n_cycles + 1, cfg.cycle_len, cfg.cycle_mult)
    cycles = ["--n-cycles", str(n_cycles)]
    return {
        "stepwise": ["--recipe", "stepwise", *cycles],
        "stepwise-no-sharing": ["--recipe", "stepwise", *cycles, "--no-weight-sharing"],
        "baseline-matched": ["--recipe", "baseline", "--epochs", str(matched)],
        "sgdr": ["--recipe", "sgdr", "--n-cycles", str(n_cycles + 1)],
        "baseline-sgdr-cost": ["--recipe", "baseline", "--epochs", str(sgdr_epochs)],
    }


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Mean and sample sd over seeds per variant, plus the paired (same-seed) differences
    of every variant against baseline-matched, the paper's reference."""
    summary: dict[str, dict] = {}
    ref = {r["seed"]: r["test_balanced_accuracy"] for r in rows if r["variant"] == "baseline-matched"}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        ba = [r["test_balanced_accuracy"] for r in mine]
        f1 = [r["test_macro_f1"] for r in mine]
        diffs = [r["test_balanced_accuracy"] - ref[r["seed"]] for r in mine if r["seed"] in ref]
        summary[name] = {
            "seeds": len(mine),
            "external": {
                k: {
                    "balanced_accuracy": mean_sd(
                        [r["external"][k]["balanced_accuracy"] for r in mine if k in r.get("external", {})]
                    )
                }
                for k in sorted({k for r in mine for k in r.get("external", {})})
            },
            "test_balanced_accuracy_mean": float(np.mean(ba)),
            "test_balanced_accuracy_sd": float(np.std(ba, ddof=1)) if len(ba) > 1 else None,
            "test_macro_f1_mean": float(np.mean(f1)),
            "test_macro_auroc_mean": float(np.mean([r["test_macro_auroc"] for r in mine])),
            "minus_baseline_matched_mean": float(np.mean(diffs)) if diffs else None,
            "minus_baseline_matched_per_seed": diffs,
            "images_processed_mean": float(np.mean([r["images_processed"] for r in mine])),
            "full_data_epochs_mean": float(np.mean([r["full_data_epochs"] for r in mine])),
            "training_minutes_mean": float(np.mean([r["training_minutes"] for r in mine])),
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_recipes"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--n-cycles", type=int, default=1, help="SGDR cycles per stepwise stage (sets every budget)")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows of an unfinished results file")
    args = ap.parse_args()
    if args.quick:
        args.seeds = args.seeds[:1]

    runs_dir = Path(args.runs_dir) / ("quick" if args.quick else f"cycles{args.n_cycles}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    split_file: Path = SPLIT
    result_file = RESULTS / ("recipes_quick.json" if args.quick else "recipes.json")
    rows: list[dict] = []
    if result_file.is_file() and not args.fresh:
        old = json.loads(result_file.read_text())
        if old.get("n_cycles") == args.n_cycles and not old.get("complete"):
            rows = [r for r in old["runs"] if r.get("external")]  # measured on the external sets too
            print(f"keeping {len(rows)} measured runs of {result_file}", flush=True)
    done = {(r["variant"], r["seed"]) for r in rows}

    def save(rows: list[dict], complete: bool) -> None:
        write_json(
            result_file,
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "command": " ".join(["python", "benchmarks/bench_recipes.py", *sys.argv[1:]]),
                "n_cycles": args.n_cycles,
                "seeds": args.seeds,
                "complete": complete,
                "variants": variants(args.n_cycles, args.quick),
                "split_file": str(split_file.relative_to(ROOT)),
                "runs": rows,
                "summary": summarise(rows),
            },
        )

    for seed in args.seeds:
        for name, flags in variants(args.n_cycles, args.quick).items():
            if (args.only and name not in args.only) or (name, seed) in done:
                continue
            run = runs_dir / f"{name}-seed{seed}"
            wall = train_run(run, data=args.data, seed=seed, split_file=split_file, flags=flags)
            meta = json.loads((run / "model.json").read_text())
            figures = measure(run, split_file=split_file, data=Path(args.data), n_boot=args.n_boot)
            report, external = figures["test"], figures["external"]  # external: compared on, never fitted on
            rows.append(
                {
                    "variant": name,
                    "seed": seed,
                    "flags": flags,
                    "test_balanced_accuracy": report["balanced_accuracy"],
                    "test_balanced_accuracy_interval": report["intervals"].get("balanced_accuracy"),
                    "test_macro_f1": report["macro_f1"],
                    "test_macro_auroc": report["macro_auroc"],
                    "valid_balanced_accuracy": meta["metrics_valid"]["balanced_accuracy"],
                    "images_processed": meta["training"]["images_seen"],
                    "full_data_epochs": meta["training"]["epochs_equivalent"],
                    "training_minutes": round(meta["training"]["seconds"] / 60, 2),
                    "wall_minutes": wall,
                    "test": report,
                    "external": external,
                }
            )
            r = rows[-1]
            ext = "  ".join(f"{k} {v['balanced_accuracy']:.4f}" for k, v in external.items())
            print(
                f"{name:20} seed {seed}: test balanced accuracy {r['test_balanced_accuracy']:.4f} "
                f"macro-F1 {r['test_macro_f1']:.4f}; external {ext}; {r['images_processed']:,} images, "
                f"{r['training_minutes']:.1f} min",
                flush=True,
            )
            save(rows, complete=False)
    summary = summarise(rows)
    print(
        "\nvariant               seeds  test bal. acc. (mean +- sd)   vs baseline-matched   images processed   minutes"
    )
    for name, s in summary.items():
        sd = f"{s['test_balanced_accuracy_sd']:.4f}" if s["test_balanced_accuracy_sd"] is not None else "-"
        d = f"{s['minus_baseline_matched_mean']:+.4f}" if s["minus_baseline_matched_mean"] is not None else "-"
        print(
            f"{name:20}  {s['seeds']:5}  {s['test_balanced_accuracy_mean']:.4f} +- {sd:8}   {d:>19}   "
            f"{s['images_processed_mean']:>14,.0f}   {s['training_minutes_mean']:7.1f}"
        )
    save(rows, complete=True)
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()

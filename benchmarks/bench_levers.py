"""Benchmark: the levers that might make a model hold up on other clinics' images, over seeds.

Each lever is a set of variants (``dermaclass train`` flags) trained at one matched
screening budget on the bundled model's lesion-grouped split, for each of ``--seeds``.
Every run is measured on the HAM10000 test split and on every image of the two external
sets (derm7pt, isic2017), which rank the variants; they are never used to fit anything.
``--tta`` also measures each run with flip test-time augmentation (a free lever: the same
weights, evaluated twice).

Screening budget (``--budget short``, about 5 minutes a run on 2 cores): the stepwise recipe
with one SGDR cycle per stage (3.2 full-data epochs). ``--budget full`` runs the shipped
default's budget (about 40 minutes) to confirm a screen.

Run folders are named by their flags, so a variant that two levers share (e.g. the fixed-LR
reference) is trained once per seed; when its folder is gone, the figures another lever's
results file holds for the same flags, budget and seed are taken (marked ``measured_in``). Results are rewritten after every run (an interrupted invocation keeps what it measured,
and a re-run skips trained bundles) to benchmarks/results/levers_<lever>.json, with the
mean +- sd over seeds per variant and the same-seed differences against the lever's
reference variant.

    python benchmarks/bench_levers.py --lever lr|colour|ema|regularise|smoothing|resize|backbone|loss|imbalance|lr-rule|budget|average|augment|mix|sam|histo|recipe|precision [--seeds 42 43 44]
                                      [--only VARIANT ...] [--tta] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from common import HAM, RESULTS, ROOT, SPLIT, fmt, measure, repo_relative, run_facts, summarise_rows, train_run
from dermaclass.fileio import write_json

# The screens measure the network: every run is trained with ``--tta none`` and measured
# without test-time augmentation (``--tta`` adds a flip-TTA measurement of the same weights).
# Flags given twice (a budget's --recipe, then a variant's) resolve to the variant's: typer keeps the last.
BUDGETS = {
    "short": ["--recipe", "stepwise", "--n-cycles", "1", "--tta", "none"],
    "full": ["--recipe", "stepwise", "--tta", "none"],
    "quick": [
        "--recipe",
        "stepwise",
        "--n-cycles",
        "1",
        "--stage-fractions",
        "0.5,1.0",
        "--head-epochs",
        "0",
        "--tta",
        "none",
    ],
}

# lever -> {variant: flags}; the first variant is the reference. Flags are explicit about every
# setting that differs from today's defaults (fixed LR 1e-2, Shades-of-Gray), so a variant means
# the same training after a default changes. The first four levers were screened against the
# defaults they replaced (range-test LR, no colour constancy); the later ones against today's.
LEVERS: dict[str, dict[str, list[str]]] = {
    "lr": {
        "valley": ["--lr-find", "--colour-constancy", "none"],  # the default before the external-set screens
        "minimum": ["--lr-find", "--lr-suggestion", "minimum", "--colour-constancy", "none"],
        "fixed-1e-2": ["--colour-constancy", "none"],
        "fixed-3e-3": ["--lr", "3e-3", "--colour-constancy", "none"],
    },
    "colour": {
        "fixed-1e-2": ["--colour-constancy", "none"],
        "shades-of-gray": [],
    },
    "ema": {
        "fixed-1e-2": ["--colour-constancy", "none"],
        "ema-0.998": ["--colour-constancy", "none", "--ema-decay", "0.998"],
    },
    "regularise": {
        "fixed-1e-2": ["--colour-constancy", "none"],
        "keep-last": ["--colour-constancy", "none", "--keep", "last"],
    },
    "smoothing": {
        "default": [],
        "label-smoothing-0.1": ["--label-smoothing", "0.1"],
    },
    "resize": {  # progressive resizing (fastbook) over seed 001's stages, same final size
        "default": [],
        "progressive-96-128": ["--stage-sizes", "96x72,112x84,128x96,128x96,128x96"],
        "final-160x120": ["--image-size", "160,120"],
    },
    "backbone": {
        "default": [],
        "lite1": ["--arch", "tf_efficientnet_lite1"],
        "lite2": ["--arch", "tf_efficientnet_lite2"],
    },
    "loss": {  # logit adjustment (Menon et al. 2021) on the data as it comes, no sampler
        "default": [],
        "logit-adjusted": ["--imbalance", "logit-adjusted"],
    },
    "imbalance": {  # the sampler against the other --imbalance options, on today's defaults
        "default": [],
        "none": ["--imbalance", "none"],
        "weights": ["--imbalance", "weights"],
        "sqrt-weights": ["--imbalance", "sqrt-weights"],
        "focal": ["--imbalance", "focal"],
    },
    "lr-rule": {  # seed 001's Eq. 9 and a constant LR against the linear batch-size rule (the default)
        "default": [],
        "eq9": ["--lr-rule", "eq9"],
        "constant": ["--lr-rule", "constant"],
    },
    "budget": {  # more SGDR cycles per stage (1 -> 3 -> 7 epochs per stage)
        "default": [],
        "n-cycles-2": ["--n-cycles", "2"],
    },
    "average": {  # SWA of the last SGDR cycle ends (in the short budget: the last stages' ends)
        "default": [],
        "average-2": ["--average-cycles", "2"],
        "average-3": ["--average-cycles", "3"],
    },
    "average-in-stage": {  # SWA inside the last stage: with 2 cycles per stage, its two cycle ends (1 + 2 epochs)
        "n-cycles-2": ["--n-cycles", "2"],
        "n-cycles-2-average-2": ["--n-cycles", "2", "--average-cycles", "2"],
    },
    "augment": {  # seed 002's augmentation: AugMix, which it found better than MixUp or CutMix
        "default": [],
        "augmix": ["--augment", "augmix"],
        "zoom": ["--augment", "zoom"],  # a wider scale range: other framings of the lesion (derm7pt's crops)
    },
    "mix": {  # batch mixing (fastai's callbacks, their default alphas)
        "default": [],
        "mixup": ["--mix", "mixup"],
        "cutmix": ["--mix", "cutmix"],
    },
    "sam": {  # seed 002's optimizer: SAM, rho 0.05 (two passes a batch: same images, about 2x the time)
        "default": [],
        "sam-0.05": ["--sam-rho", "0.05"],
    },
    "recipe": {  # the default recipe against seed 003's SGDR at a similar cost (run with --budget full)
        "default": [],
        "sgdr-4-cycles": ["--recipe", "sgdr", "--n-cycles", "4"],  # 1 head + 1+2+4+8 SGDR epochs
    },
    "histo": {  # HAM10000's dx_type, histopathology-confirmed images sampled twice as often
        "default": [],
        "histo-x2": ["--histo-weight", "2"],
    },
    "precision": {
        "default": [],
        "bfloat16": ["--precision", "bfloat16"],
    },
}


def run_name(flags: list[str]) -> str:
    """A run folder named by its flags, so that levers sharing a variant share its runs."""
    if not flags:
        return "defaults"
    return "_".join(f.lstrip("-") for f in flags).replace("/", "-")


def measured(run: Path, args: argparse.Namespace, *, tta: bool) -> dict:
    """``measure`` once per run folder (cached beside the bundle: a re-run or another lever reuses it)."""
    cache = run / f"bench_measure{'_tta' if tta else ''}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    figures = measure(run, split_file=Path(args.split_file), data=Path(args.data), tta=tta, n_boot=args.n_boot)
    write_json(cache, figures)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lever", required=True, choices=sorted(LEVERS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--tta", action="store_true", help="also measure every run with flip TTA")
    ap.add_argument("--data", default=str(HAM))
    ap.add_argument("--split-file", default=str(SPLIT))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_levers"))
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="smoke run: one seed, tiny budget, *_quick.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budget = args.seeds[:1], "quick"
    variants = LEVERS[args.lever]
    reference = next(iter(variants))
    runs_dir = Path(args.runs_dir) / args.budget
    runs_dir.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / f"levers_{args.lever}{'_quick' if args.quick else ''}.json"
    command = " ".join(["python", "benchmarks/bench_levers.py", *sys.argv[1:]])
    # Rows of earlier invocations (other seeds or variants) are kept: one results file per lever.
    split_rel = repo_relative(args.split_file)
    rows: list[dict] = []
    if result_file.is_file():
        old = json.loads(result_file.read_text())
        if old.get("budget") == args.budget:
            rows = [r for r in old["runs"] if r["variant"] in variants]
    wanted = {(n, sd) for sd in args.seeds for n in variants if not args.only or n in args.only}
    # A variant another lever already measured (the same flags, budget and seed: the same command)
    # is taken from that lever's results, as its run folder would be if it were still on disk.
    measured_elsewhere: dict[tuple[tuple[str, ...], int], tuple[str, dict]] = {}
    for other in sorted(RESULTS.glob("levers_*.json")):
        if other == result_file or other.stem.endswith("_quick"):
            continue
        data = json.loads(other.read_text())
        if data.get("budget") == args.budget and data.get("split_file") == split_rel:
            for r in data["runs"]:
                measured_elsewhere.setdefault((tuple(r["flags"]), r["seed"]), (other.name, r))
    rows = [r for r in rows if (r["variant"], r["seed"]) not in wanted]

    def save(complete: bool) -> None:
        rows.sort(key=lambda r: (r["seed"], list(variants).index(r["variant"])))
        seeds = {r["seed"] for r in rows}
        complete = complete and {(r["variant"], r["seed"]) for r in rows} >= {(n, sd) for n in variants for sd in seeds}
        write_json(
            result_file,
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "command": command,
                "lever": args.lever,
                "budget": args.budget,
                "budget_flags": BUDGETS[args.budget],
                "seeds": sorted({r["seed"] for r in rows}),
                "split_file": split_rel,
                "reference": reference,
                "variants": variants,
                "complete": complete,
                "runs": rows,
                "summary": summarise_rows(rows, reference=reference),
                **(
                    {
                        "summary_tta": summarise_rows(
                            [{**r, **r["tta"]} for r in rows if r.get("tta")], reference=reference
                        )
                    }
                    if args.tta
                    else {}
                ),
            },
        )

    for seed in args.seeds:  # seed-major: after each seed every variant has a paired figure
        for name, flags in variants.items():
            if args.only and name not in args.only:
                continue
            run = runs_dir / f"{run_name(flags)}-seed{seed}"
            wall = None
            shared = measured_elsewhere.get((tuple(flags), seed))
            if shared and not (run / "model.json").is_file() and (not args.tta or shared[1].get("tta")):
                source, row = shared
                rows.append({**row, "variant": name, "measured_in": source})
                print(f"{name:16} seed {seed}: measured in {source} (same flags, budget and seed)", flush=True)
                save(complete=False)
                continue
            if not (run / "model.json").is_file():
                for stale in run.glob("bench_measure*.json"):  # figures of an earlier bundle in this folder
                    stale.unlink()
                log = runs_dir / f"{run_name(flags)}-seed{seed}.log"
                log.unlink(missing_ok=True)
                flags_run = [*BUDGETS[args.budget], *flags]
                wall = train_run(run, data=args.data, seed=seed, split_file=args.split_file, flags=flags_run, log=log)
            row = {
                "variant": name,
                "seed": seed,
                "flags": flags,
                "run": repo_relative(run),
                **run_facts(run),
                "wall_minutes": wall,
                **measured(run, args, tta=False),
            }
            if args.tta:
                row["tta"] = measured(run, args, tta=True)
            rows.append(row)
            ext = "  ".join(f"{k} {v['balanced_accuracy']:.4f}" for k, v in row["external"].items())
            print(
                f"{name:16} seed {seed}: HAM test BA {row['test']['balanced_accuracy']:.4f}  {ext}  "
                f"({row['training_minutes']:.1f} min)",
                flush=True,
            )
            save(complete=False)
    save(complete=True)
    summary = summarise_rows(rows, reference=reference)
    wheres = [
        w
        for w in next(iter(summary.values()))
        if isinstance(next(iter(summary.values()))[w], dict) and "balanced_accuracy" in next(iter(summary.values()))[w]
    ]
    print(f"\nlever {args.lever}, budget {args.budget}: balanced accuracy, mean ± sd over seeds")
    print(f"{'variant':16} seeds  " + "  ".join(f"{w:>15}" for w in wheres) + "   nv sens.   minutes")
    for name, s in summary.items():
        print(
            f"{name:16} {s['seeds']:5}  "
            + "  ".join(f"{fmt(s[w]['balanced_accuracy']):>15}" for w in wheres)
            + f"   {fmt(s['nv_sensitivity_test']):>8}   {fmt(s['training_minutes']):>7}"
        )
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()

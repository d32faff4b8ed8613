"""Benchmark: seed 002's TPE search against random search, then the best settings at full budget.

Part ``search``: for each sampler (``tpe``, ``random``) and study seed (``--study-seeds``), one
``dermaclass tune`` study of ``--trials`` trials at the short budget on the bundled model's
lesion-grouped split, scored by validation balanced accuracy (the only figure a study sees):
its best value, the best-so-far after every trial, and how many trials finished, were pruned
or failed, with the minutes they took.

Part ``confirm``: the best trial of each sampler (over its studies) is retrained with its
``best.yaml`` at the full budget (three SGDR cycles per stage, or eight one-cycle epochs for
the baseline recipe) for each of ``--seeds``, and measured as the app serves it on the HAM10000
test split and on every image of derm7pt, isic2017 and PH2 (never used to choose anything).
The default recipe's full-budget runs of the same seeds are the reference (``--default
SEED=BUNDLE``, e.g. the bundled model for seed 42).

Results are rewritten after every study and run to benchmarks/results/tune.json (a re-run
resumes studies and skips trained runs).

    python benchmarks/bench_tune.py [--part search confirm] [--trials 40] [--study-seeds 1 2] [--seeds 42 43 44]
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
from typing import Any

from common import HAM, RESULTS, ROOT, SPLIT, measure, repo_relative, run_facts, summarise_rows, train_run
from dermaclass.fileio import write_json

SAMPLERS = ("tpe", "random")
QUICK_FLAGS = ["--stage-fractions", "0.5,1.0", "--image-size", "64,48", "--head-epochs", "0"]


def study_figures(out: Path) -> dict[str, Any]:
    """What a finished study holds: its best trial, the best-so-far curve, the trial states and minutes."""
    import optuna

    from dermaclass import tune as T

    study = T.open_study(out, storage=None, sampler=None, pruner=None, resume=True, force=False)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    interrupted = set(study.user_attrs.get(T.INTERRUPTED, []))
    curve, best = [], None
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE and (best is None or t.value > best):
            best = t.value
        if t.number not in interrupted:
            curve.append(best)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    top = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study": repo_relative(out),
        "trials": len(curve),
        "states": {
            s: sum(t.state.name == s and t.number not in interrupted for t in trials)
            for s in ("COMPLETE", "PRUNED", "FAIL")
        },  # fmt: skip
        "best_valid_balanced_accuracy": None if top is None else top.value,
        "best_trial": None if top is None else top.number,
        "best_params": {} if top is None else dict(top.params),
        "best_so_far": curve,
        "minutes": round(sum((t.user_attrs.get("minutes") or 0) for t in trials), 1),
        "best_yaml": repo_relative(out / "best.yaml") if (out / "best.yaml").is_file() else None,
    }


def full_budget_flags(params: dict[str, Any], base_recipe: str) -> list[str]:
    """The epoch flags of the full budget for the best trial's recipe."""
    recipe = params.get("recipe", base_recipe)
    return ["--epochs", "8"] if recipe == "baseline" else ["--n-cycles", "3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["search", "confirm"], choices=["search", "confirm"])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--study-seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--data", default=str(HAM))
    ap.add_argument("--split-file", default=str(SPLIT))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_tune"))
    ap.add_argument("--default", nargs="*", default=[], metavar="SEED=BUNDLE",
                    help="the default recipe's full-budget bundle for a seed (else it is trained)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 trials, one seed each, tiny budget")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.study_seeds, args.seeds = 3, args.study_seeds[:1], args.seeds[:1]
    runs_dir = Path(args.runs_dir) / ("quick" if args.quick else "")
    runs_dir.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / f"tune{'_quick' if args.quick else ''}.json"
    old = json.loads(result_file.read_text()) if result_file.is_file() else {}
    studies: dict[str, Any] = old.get("studies", {})
    rows: list[dict] = old.get("runs", [])
    command = " ".join(["python", "benchmarks/bench_tune.py", *sys.argv[1:]])
    commands = list(dict.fromkeys([*old.get("commands", []), command]))

    def save() -> None:
        write_json(result_file, {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "commands": commands, "split_file": repo_relative(args.split_file), "trials": args.trials,
            "studies": studies, "runs": rows, "summary": summarise_rows(rows, reference="default"),
        })  # fmt: skip

    extra = QUICK_FLAGS if args.quick else []
    if "search" in args.part:
        for sampler in SAMPLERS:
            for s in args.study_seeds:
                out = runs_dir / f"{sampler}-s{s}"
                cmd = [sys.executable, "-m", "dermaclass", "tune", args.data, "--out", str(out), "--trials",
                       str(args.trials), "--sampler", sampler, "--seed", str(s), "--split-file", args.split_file,
                       "--budget", "short", *extra]  # fmt: skip
                if (out / "study.db").is_file():
                    cmd.append("--resume")
                print("$", " ".join(cmd), flush=True)
                start = time.perf_counter()
                with open(runs_dir / f"{sampler}-s{s}.log", "a") as log:
                    subprocess.run(cmd, check=True, stdout=log, stderr=log)
                studies[f"{sampler}-s{s}"] = {"sampler": sampler, "study_seed": s, **study_figures(out),
                                              "wall_minutes": round((time.perf_counter() - start) / 60, 1)}  # fmt: skip
                f = studies[f"{sampler}-s{s}"]
                print(f"{sampler} study seed {s}: best valid balanced accuracy {f['best_valid_balanced_accuracy']} "
                      f"({f['states']}, {f['wall_minutes']} min)", flush=True)  # fmt: skip
                save()
    if "confirm" in args.part:
        given = {int(k): Path(v) for k, v in (spec.split("=", 1) for spec in args.default)}
        variants: dict[str, tuple[Path | None, list[str]]] = {"default": (None, [])}
        for sampler in SAMPLERS:
            mine = [v for v in studies.values() if v["sampler"] == sampler and v["best_yaml"]]
            if mine:
                best = max(mine, key=lambda v: v["best_valid_balanced_accuracy"])
                variants[f"{sampler}-best"] = (
                    ROOT / best["best_yaml"],
                    full_budget_flags(best["best_params"], "stepwise"),
                )
        for seed in args.seeds:
            for name, (config, flags) in variants.items():
                if any(r["variant"] == name and r["seed"] == seed for r in rows):
                    continue
                run = given.get(seed) if name == "default" and seed in given else runs_dir / f"{name}-seed{seed}"
                run_flags = [*(["--config", str(config)] if config else []), *flags, *extra]
                wall = train_run(run, data=args.data, seed=seed, split_file=args.split_file, flags=run_flags,
                                 log=runs_dir / f"{name}-seed{seed}.log", resume=True)  # fmt: skip
                figures = measure(run, split_file=Path(args.split_file), tta=True)
                rows.append({"variant": name, "seed": seed, "flags": run_flags, "run": repo_relative(run),
                             **run_facts(run), "wall_minutes": wall, **figures})  # fmt: skip
                ext = "  ".join(f"{k} {v['balanced_accuracy']:.4f}" for k, v in figures["external"].items())
                print(f"{name:14} seed {seed}: HAM test {figures['test']['balanced_accuracy']:.4f}  {ext}", flush=True)
                save()
    save()
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()

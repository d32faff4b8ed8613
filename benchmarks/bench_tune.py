"""Benchmark: seed 002's TPE search against random search, then the best settings at full budget.

Part ``search``: for each sampler (``tpe``, ``random``) and study seed (``--study-seeds``), one
``dermaclass tune`` study of ``--trials`` trials at the short budget on the bundled model's
lesion-grouped split, scored by validation balanced accuracy (the only figure a study sees):
its best value, the best-so-far after every trial, and how many trials finished, were pruned
or failed, with the minutes they took.

The TPE studies prune with Hyperband (the tool's default); the random studies do not prune, so
that every random trial's whole validation curve is recorded: random trials are an unbiased
sample of the space, and part ``pruners`` replays Hyperband, successive halving and the median
rule on their curves (the same trials, in the same order) to measure which pruner saves more
epochs without stopping the trials that end best. Against TPE this is conservative: pruning
can only lose trials, so unpruned random search is at least as good as pruned random search.

Part ``confirm``: the best trial of each sampler (over its studies) is retrained with its
``best.yaml`` at the full budget (three SGDR cycles per stage, or eight one-cycle epochs for
the baseline recipe) for each of ``--seeds``, and measured as the app serves it on the HAM10000
test split and on every image of derm7pt, isic2017 and PH2 (never used to choose anything).
The default recipe's full-budget runs of the same seeds are the reference (``--default
SEED=BUNDLE``, e.g. the bundled model for seed 42).

Results are rewritten after every study and run to benchmarks/results/tune.json (a re-run
resumes studies and skips trained runs).

    python benchmarks/bench_tune.py [--part search pruners confirm] [--trials 40] [--study-seeds 1 2] [--seeds 42 43 44]
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

import numpy as np

from common import HAM, RESULTS, ROOT, SPLIT, measure, repo_relative, run_facts, summarise_rows, train_run
from dermaclass.fileio import write_json

SAMPLERS = ("tpe", "random")
# TPE prunes as the tool does by default; random search records whole curves for the replay.
PRUNING = {"tpe": "hyperband", "random": "none"}
REPLAYED = ("hyperband", "halving", "median")
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
    pairs = [(float(t.value), raw_best(t)) for t in complete]
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
        "served_vs_raw": served_vs_raw([p for p in pairs if p[1] is not None]),
    }


def raw_best(trial: Any) -> float | None:
    """A finished trial's best per-epoch raw validation score (what its pruner saw): the user
    attribute ``tune`` records, else the best intermediate value (studies from before it did)."""
    v = trial.user_attrs.get("valid_raw_best")
    if v is None and trial.intermediate_values:
        v = max(trial.intermediate_values.values())
    return None if v is None else float(v)


def served_vs_raw(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """How far a study's objective (the served bundle's validation balanced accuracy: TTA,
    temperature, prior shift) ranks its finished trials differently from the raw best-epoch
    score the pruner sees: Spearman's rho, whether both pick the same best trial, where the
    served best stands by raw score, and the served-minus-raw gap."""
    from scipy.stats import spearmanr

    if len(pairs) < 2:
        return {"trials": len(pairs)}
    served, raw = np.array(pairs).T
    by_raw = np.argsort(-raw, kind="stable")
    top = int(np.argmax(served))
    rho = spearmanr(served, raw).statistic
    gap = served - raw
    return {
        "trials": len(pairs),
        "spearman": None if not np.isfinite(rho) else round(float(rho), 3),
        "same_best": bool(top == int(by_raw[0])),
        "served_best_raw_rank": int(np.flatnonzero(by_raw == top)[0]) + 1,
        "gap_mean": round(float(gap.mean()), 4),
        "gap_min": round(float(gap.min()), 4),
        "gap_max": round(float(gap.max()), 4),
    }


def study_curves(out: Path) -> list[tuple[list[float], float, float]]:
    """Every complete trial of a study in trial order: its per-epoch validation balanced
    accuracies, its final value and its minutes."""
    import optuna

    from dermaclass import tune as T

    study = T.open_study(out, storage=None, sampler=None, pruner=None, resume=True, force=False)
    return [
        (
            [t.intermediate_values[k] for k in sorted(t.intermediate_values)],
            float(t.value),
            t.user_attrs.get("minutes") or 0.0,
        )
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        if t.state == optuna.trial.TrialState.COMPLETE and t.intermediate_values
    ]


def replay_pruner(curves: list[tuple[list[float], float, float]], pruner: str) -> dict[str, Any]:
    """Replay ``pruner`` on recorded whole curves (the trials in their order, each reporting its
    epochs until the pruner stops it): the share of epochs (and, pro rata, minutes) it saves,
    and whether the trials that ended best survive it."""
    import optuna

    from dermaclass import tune as T

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=T.make_pruner(pruner))
    used, kept = [], []
    for steps, value, _ in curves:
        trial = study.ask()
        n, pruned = 0, False
        for step, v in enumerate(steps, start=1):
            trial.report(v, step)
            n = step
            if trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
        used.append(n)
        kept.append(not pruned)
    values = [v for _, v, _ in curves]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    total = sum(len(c) for c, _, _ in curves)
    minutes = sum(m * n / max(1, len(c)) for (c, _, m), n in zip(curves, used))
    best_kept = max((values[i] for i in range(len(values)) if kept[i]), default=None)
    return {
        "trials": len(curves),
        "pruned": len(curves) - sum(kept),
        "epochs_used": sum(used),
        "epochs_unpruned": total,
        "epoch_share": round(sum(used) / max(1, total), 3),
        "minutes_pro_rata": round(minutes, 1),
        "minutes_unpruned": round(sum(m for _, _, m in curves), 1),
        "best_kept": order[0] in [i for i in range(len(kept)) if kept[i]] if values else None,
        "best_value_kept": best_kept,
        "best_value": max(values, default=None),
        "top5_kept": sum(kept[i] for i in order[:5]),
    }


def full_budget_flags(params: dict[str, Any], base_recipe: str) -> list[str]:
    """The epoch flags of the full budget for the best trial's recipe."""
    recipe = params.get("recipe", base_recipe)
    return ["--epochs", "8"] if recipe == "baseline" else ["--n-cycles", "3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--part", nargs="+", default=["search", "pruners", "confirm"], choices=["search", "pruners", "confirm"]
    )
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
    pruners: dict[str, Any] = old.get("pruners", {})
    rows: list[dict] = old.get("runs", [])
    command = " ".join(["python", "benchmarks/bench_tune.py", *sys.argv[1:]])
    commands = list(dict.fromkeys([*old.get("commands", []), command]))

    def save() -> None:
        write_json(result_file, {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "commands": commands, "split_file": repo_relative(args.split_file), "trials": args.trials,
            "studies": studies, "pruners": pruners, "runs": rows, "summary": summarise_rows(rows, reference="default"),
        })  # fmt: skip

    extra = QUICK_FLAGS if args.quick else []
    if "search" in args.part:
        for sampler in SAMPLERS:
            for s in args.study_seeds:
                out = runs_dir / f"{sampler}-s{s}"
                cmd = [sys.executable, "-m", "dermaclass", "tune", args.data, "--out", str(out), "--trials",
                       str(args.trials), "--sampler", sampler, "--seed", str(s), "--split-file", args.split_file,
                       "--budget", "short", "--pruner", PRUNING[sampler], *extra]  # fmt: skip
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
                      f"({f['states']}, {f['wall_minutes']} min); served against raw: {f['served_vs_raw']}",
                      flush=True)  # fmt: skip
                save()
    if "pruners" in args.part:
        for name, st in studies.items():
            if st["sampler"] != "random":
                continue
            curves = study_curves(ROOT / st["study"])
            pruners[name] = {p: replay_pruner(curves, p) for p in REPLAYED}
            for p, r in pruners[name].items():
                print(f"{name} replayed with {p}: {r['pruned']}/{r['trials']} pruned, {r['epoch_share']:.0%} of the "
                      f"epochs, best kept {r['best_kept']}, top 5 kept {r['top5_kept']}", flush=True)  # fmt: skip
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

"""Benchmark: cross-fitted deep ensembles against one network, at equal time and at full budget.

Variants (``dermaclass train`` flags on the bundled model's lesion-grouped split, each for
every ``--seeds``; member k of an ensemble trains with seed + k on its own folds, so a seed
is a fold assignment too):
- ``single-full``: one network, the shipped default recipe (stepwise, 3 SGDR cycles per stage);
- ``k3-short`` / ``k5-short``: 3 or 5 members, each at the screening budget (one SGDR cycle
  per stage: 1 epoch of the full budget's 1 + 2 + 4): measured at 0.4x and 0.65x the time of
  ``single-full`` (the minutes are recorded);
- ``k3-mid``: 3 members at two SGDR cycles per stage (1 + 2 epochs), the nearest whole-cycle
  budget above "the same total time" for K = 3 (three members at 3/7 of the epochs each);
  with ``k5-short`` below it, the two bracket one full-budget network's time;
- ``k3-full`` / ``k5-full``: 3 or 5 members, each at the full budget (what a shipped bundle
  may spend; about 3x and 5x the time of ``single-full``);
- ``k3-mixed-short``: 3 members of different arch and input size (Lite0 128x96, Lite1
  160x120, Lite2 192x144) at the screening budget, against ``k3-short``'s three Lite0s;
- ``k3-short-valid``: ``k3-short`` calibrated on the valid split held out from every member and
  scored by the ensemble itself, against calibration on the members' out-of-fold predictions;
- ``k3-full-valid``: ``k3-full`` with ``--ensemble-calibration valid`` (the folds cut the train
  split only; the valid split is held out from every member and calibrates the ensemble);
- ``distill-k3-full-valid``: one student network at the full budget (``single-full``'s recipe
  and time) trained with soft targets from the same seed's ``k3-full-valid`` out-of-fold
  predictions (``--distill-from``): how much of the ensemble's gain one network keeps. Its
  teacher never saw the valid split (a teacher that did is refused: see the ``superseded`` key
  of the results). The teacher must be trained (or given with ``--use``) first.

Every bundle serves as it ships (flip TTA, its calibration), and is measured on the HAM10000
test split and on every image of derm7pt, isic2017 and PH2 (never used to fit anything). For
an ensemble the same member logits also give each ``--ensemble-combine`` rule as it would
serve with the ensemble's calibration (``rules``; ``combine`` is the rule the bundle serves;
records measured before ``rules`` existed served the mean of logits and hold the mean of
calibrated probabilities as ``prob_mean``), and each member alone
(``members``, with its own calibration), so the ensemble's gain over its own members is paired.
The melanoma operating point (fitted on valid, or out-of-fold for an ensemble) is reported on
every set: sensitivity and specificity, P(mel) AUROC, and the whole trade-off curve (sensitivity
against specificity over thresholds; plotted in results/ensemble_tradeoff.png with the stored
point marked, on the out-of-fold predictions it was fitted on, HAM test and each external set).

Results are rewritten after every run to benchmarks/results/ensemble.json (a re-run skips
trained bundles and measured runs).

    python benchmarks/bench_ensemble.py [--variants single-full k3-short k5-short] [--seeds 42 43 44] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import EXTERNAL, HAM, RESULTS, ROOT, SPLIT, fmt, repo_relative, summarise_rows, train_run
from dermaclass.fileio import write_json

SHORT = ["--recipe", "stepwise", "--n-cycles", "1"]
FULL = ["--recipe", "stepwise"]
MIXED = "tf_efficientnet_lite0@128x96,tf_efficientnet_lite1@160x120,tf_efficientnet_lite2@192x144"
VARIANTS: dict[str, list[str]] = {
    "single-full": FULL,
    "k3-short": [*SHORT, "--members", "3"],
    "k5-short": [*SHORT, "--members", "5"],
    "k3-full": [*FULL, "--members", "3"],
    "k5-full": [*FULL, "--members", "5"],
    "k3-mid": [*FULL, "--n-cycles", "2", "--members", "3"],
    "k3-mixed-short": [*SHORT, "--members", "3", "--member-archs", MIXED],
    "k3-short-valid": [*SHORT, "--members", "3", "--ensemble-calibration", "valid"],
    "single-short": SHORT,
    "k3-full-valid": [*FULL, "--members", "3", "--ensemble-calibration", "valid"],
    "distill-k3-full-valid": [*FULL, "--distill-from", "{teacher:k3-full-valid}"],
}
QUICK = ["--recipe", "stepwise", "--n-cycles", "1", "--stage-fractions", "0.5,1.0", "--head-epochs", "0"]
FIGURES = ("balanced_accuracy", "macro_f1", "macro_auroc", "ece", "log_loss")


def load_set(path: Path, *, sizes: list[tuple[int, int]], split_file: Path | None) -> tuple[Any, dict]:
    """Items (image, label, path, ...) and decode-cache images at every size of ``path`` (its
    test split, or every image)."""
    from dermaclass.config import load_config
    from dermaclass.data import DecodeCache, read_split, validate_sources
    from dermaclass.evaluate.run import select_split

    cfg = load_config()
    items, _ = validate_sources([path], **cfg.source_settings())
    items = items.reset_index(drop=True)
    if split_file is not None:
        items, _ = select_split(items, read_split(split_file), "test", source=str(path))
        items = items.reset_index(drop=True)
    images = {s: DecodeCache(cfg.cache_dir, s).ensure(items["path"].tolist(), items["hash"].tolist()) for s in sizes}
    return items, images


def figures(y: np.ndarray, probs: np.ndarray, classes: list[str], points: dict[str, dict]) -> dict[str, Any]:
    """Headline figures, per-class sensitivity/specificity/AUROC, and each stored operating point's rates."""
    from dermaclass.evaluate.metrics import classification_metrics, flag_rates, tradeoff_curve

    m = classification_metrics(y, probs, classes)
    return {
        **{k: m[k] for k in FIGURES},
        "n": int(len(y)),
        "curves": {c: tradeoff_curve(y, probs, class_index=classes.index(c)) for c in points},
        "per_class": {
            c: {k: v.get(k) for k in ("support", "sensitivity", "specificity", "auroc")}
            for c, v in m["per_class"].items()
        },
        "operating_points": {
            c: flag_rates(y, probs, class_index=classes.index(c), threshold=op["threshold"]) for c, op in points.items()
        },
    }


def plot_tradeoff(rows: list[dict], path: Path, *, cls: str = "mel") -> None:
    """Sensitivity against specificity of ``cls`` per set, one panel per variant (first seed), with
    the stored operating point marked: how the threshold fitted inside holds on other clinics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dermaclass.fileio import atomic_path

    first = {}
    for r in rows:
        first.setdefault(r["variant"], r)
    if not first:
        return
    fig, axes = plt.subplots(1, len(first), figsize=(4.2 * len(first), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], first.items()):
        sets = {
            "out-of-fold" if r.get("out_of_fold_curves") else "": r.get("out_of_fold_curves", {}).get(cls),
            "HAM test": r["test"]["curves"].get(cls),
            **{k: v["curves"].get(cls) for k, v in r["external"].items()},
        }
        for i, (label, curve) in enumerate((k, v) for k, v in sets.items() if k and v):
            ax.plot(curve["specificity"], curve["sensitivity"], label=label, color=f"C{i}")
        for i, (_where, f) in enumerate([("HAM test", r["test"]), *r["external"].items()]):
            op = f["operating_points"].get(cls)
            if op and op.get("sensitivity") is not None:
                ax.plot(op["specificity"], op["sensitivity"], "o", color=f"C{i + bool(r.get('out_of_fold_curves'))}")
        ax.set(
            title=f"{name} (seed {r['seed']})",
            xlabel="specificity",
            ylabel=f"{cls} sensitivity",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def measure_run(run: Path, sets: dict[str, Path], *, split_file: Path) -> dict[str, Any]:
    """The bundle as it serves (its TTA and calibration) on HAM test and every external set;
    for an ensemble also the probability mean and each member alone, from the same logits."""
    from dermaclass.evaluate.run import fitted_curve
    from dermaclass.models import COMBINE_RULES
    from dermaclass.serving.combine import combine
    from dermaclass.serving.predictor import Predictor

    pred = Predictor(run, backend="torch")
    classes = pred.classes
    out: dict[str, Any] = {"test": None, "external": {}, "combine": pred.combine_rule, "rules": {}, "members": {}}
    for name, path in {"test": HAM, **sets}.items():
        items, images = load_set(path, sizes=pred.input_sizes, split_file=split_file if name == "test" else None)
        labels = items["label"].astype(str).tolist()
        y = np.array([classes.index(v) for v in labels])
        start = time.perf_counter()
        outs = pred.member_outputs(images)
        seconds = time.perf_counter() - start
        los = [lo for lo, _ in outs]
        f = figures(y, pred.checked(pred.calibrated(pred.served(outs)[0])), classes, pred.operating_points)
        f["seconds_per_image"] = seconds / max(1, len(y))
        if name == "test":
            out["test"] = f
        else:
            out["external"][name] = f
        if pred.members:
            # each combination rule as `--ensemble-combine` would serve it with the ensemble's
            # calibration (for the bundle's own rule, the served figures above); "mean of
            # calibrated probabilities" is what older records hold as prob_mean
            for rule in COMBINE_RULES.values():
                combined = combine(los, rule, temperature=pred.temperature, offsets=pred.offsets)
                out["rules"].setdefault(rule, {})[name] = figures(
                    y, pred.calibrated(combined), classes, pred.operating_points
                )
            out["members"][name] = [
                figures(y, m.calibrated(lo), classes, m.operating_points) for m, (lo, _) in zip(pred.members, outs)
            ]
        print(f"  {name}: {len(y)} images, balanced accuracy {f['balanced_accuracy']:.4f}", flush=True)
    # the predictions the operating points were fitted on (an ensemble's out_of_fold.csv)
    out["out_of_fold_curves"] = {c: curve for c in pred.operating_points if (curve := fitted_curve(run, c))}
    return out


def run_facts(run: Path) -> dict[str, Any]:
    from dermaclass.models import read_bundle_meta

    meta = read_bundle_meta(run)
    return {
        "networks": max(1, len(meta.members)),
        "training_minutes": round(meta.training["seconds"] / 60, 2),
        "images_processed": meta.training.get("images_seen"),
        "valid_balanced_accuracy": meta.metrics_valid.get("balanced_accuracy"),
        "temperature": meta.temperature,
        # where the minutes were measured: the VM has changed speed from one day to the next
        "machine": meta.machine,
        "members": meta.members,
    }


def resolve_teacher(flag: str, *, seed: int, use: dict[tuple[str, int], Path], runs_dir: Path) -> str:
    """``{teacher:VARIANT}`` in a variant's flags: that variant's bundle at the same seed (given
    with --use, or trained in ``runs_dir``), as an absolute path: a benchmark run from a
    worktree trains with ``--runs-dir`` in another checkout. A missing teacher stops the
    benchmark, by name."""
    if not (flag.startswith("{teacher:") and flag.endswith("}")):
        return flag
    variant = flag[len("{teacher:") : -1]
    teacher = use.get((variant, seed), runs_dir / f"{variant}-seed{seed}")
    if not (teacher / "model.json").is_file():
        sys.exit(
            f"{teacher}: no trained {variant} bundle at seed {seed} to distil from; run --variants {variant} first"
        )
    return str(teacher.resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["single-full", "k3-short", "k5-short"], choices=sorted(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--data", default=str(HAM))
    ap.add_argument("--split-file", default=str(SPLIT))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_ensemble"))
    ap.add_argument("--quick", action="store_true", help="smoke run: one seed, tiny budget, ensemble_quick.json")
    ap.add_argument(
        "--use",
        nargs="*",
        default=[],
        metavar="VARIANT:SEED=BUNDLE",
        help="measure this existing bundle as that variant and seed instead of training it (e.g. the "
        "bundled model, trained with the default recipe at seed 42: "
        "single-full:42=models/ham10000-effnet-lite0)",
    )
    ap.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the listed variants' recorded runs again (their bundles, no training), e.g. after a "
        "new figure was added to the measurement",
    )
    args = ap.parse_args()
    use = {}
    for spec in args.use:
        key, _, path = spec.partition("=")
        name, _, seed = key.partition(":")
        if name not in VARIANTS or not seed.isdigit() or not (Path(path) / "model.json").is_file():
            ap.error(f"--use {spec}: expected VARIANT:SEED=BUNDLE with a known variant and a bundle folder")
        use[(name, int(seed))] = Path(path)
    if args.quick:
        args.seeds = args.seeds[:1]
    runs_dir = Path(args.runs_dir) / ("quick" if args.quick else "")
    runs_dir.mkdir(parents=True, exist_ok=True)
    result_file = RESULTS / f"ensemble{'_quick' if args.quick else ''}.json"
    sets = {k: v for k, v in EXTERNAL.items() if v.is_dir()}
    old = json.loads(result_file.read_text()) if result_file.is_file() else {}
    rows: list[dict] = old.get("runs", [])
    # Measured runs of a design that was withdrawn, each with why (kept, not re-run).
    superseded: list[dict] = old.get("superseded", [])
    command = " ".join(["python", "benchmarks/bench_ensemble.py", *sys.argv[1:]])
    # Every invocation that added rows (runs of other variants or seeds are kept).
    commands = list(dict.fromkeys([*old.get("commands", [old["command"]] if "command" in old else []), command]))

    def save() -> None:
        rows.sort(key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
        write_json(
            result_file,
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "command": command,
                "commands": commands,
                "split_file": repo_relative(args.split_file),
                "variants": {k: VARIANTS[k] for k in VARIANTS},
                "runs": rows,
                "superseded": superseded,
                "summary": summarise_rows(rows, reference="single-full"),
            },
        )
        plot_tradeoff(rows, result_file.with_name(result_file.stem + "_tradeoff.png"))

    for seed in args.seeds:
        for name in args.variants:
            done = [r for r in rows if r["variant"] == name and r["seed"] == seed]
            if done and args.remeasure:
                # recorded relative to the checkout that held it: this one, or --runs-dir's
                where = ROOT / done[0]["run"]
                where = where if where.is_dir() else runs_dir / Path(done[0]["run"]).name
                done[0].update(measure_run(where, sets, split_file=Path(args.split_file)))
                print(f"{name:16} seed {seed}: measured again", flush=True)
                save()
            if done:
                continue
            flags = VARIANTS[name]
            if args.quick:  # the tiny budget, keeping the variant's ensemble flags
                flags = [*QUICK, *(flags[flags.index("--members") :] if "--members" in flags else [])]
            run = use.get((name, seed), runs_dir / f"{name}-seed{seed}")
            flags = [resolve_teacher(f, seed=seed, use=use, runs_dir=runs_dir) for f in flags]
            wall = train_run(
                run, data=args.data, seed=seed, split_file=args.split_file, flags=flags,
                log=runs_dir / f"{name}-seed{seed}.log", resume=True,
            )  # fmt: skip
            row = {
                "variant": name,
                "seed": seed,
                "flags": [repo_relative(f) if f.startswith("/") else f for f in flags],
                "run": repo_relative(run),
                **run_facts(run),
                **({"reused": "an existing bundle trained with these flags (--use)"} if (name, seed) in use else {}),
                "wall_minutes": wall,
                **measure_run(run, sets, split_file=Path(args.split_file)),
            }
            rows.append(row)
            ext = "  ".join(f"{k} {v['balanced_accuracy']:.4f}" for k, v in row["external"].items())
            print(
                f"{name:16} seed {seed}: HAM test {row['test']['balanced_accuracy']:.4f}  {ext}  "
                f"({row['training_minutes']:.1f} min training)",
                flush=True,
            )
            save()
    save()
    summary = summarise_rows(rows, reference="single-full")
    print("\nbalanced accuracy, mean ± sd over seeds (flip TTA, as each bundle serves)")
    for name, s in summary.items():
        wheres = [w for w in s if isinstance(s[w], dict) and "balanced_accuracy" in s[w]]
        print(
            f"{name:16} {s['seeds']} seeds  "
            + "  ".join(f"{w} {fmt(s[w]['balanced_accuracy'])}" for w in wheres)
            + f"  {fmt(s['training_minutes'])} min"
        )
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()

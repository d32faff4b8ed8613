"""Benchmark: where the melanoma flag fails on PH2, by the kind of nevus.

PH2 (another clinic's dermoscopy, 200 images) labels its 160 nevi as common or atypical
(dysplastic). Atypical nevi are the hard negatives a dermatologist also hesitates over, so the
melanoma flag's specificity and P(mel)'s AUROC are reported against each kind separately:
whether a bundle's false melanoma flags on PH2 are mostly atypical nevi (the flag is "wrong"
where a clinician would look twice) or common nevi too (the model misreads this clinic's
images). Every bundle serves as it ships (its TTA, calibration and stored melanoma threshold,
fitted on HAM10000's valid split or an ensemble's out-of-fold predictions). Nothing is fitted
on PH2: the ``best_specificity_at`` figures read PH2's own ROC to show what the best threshold
*could* give there, i.e. the ranking's ceiling, not a threshold anyone should use.

It also compares the lesions' share of the frame (the expert masks of both sets, no model):
whether PH2's nevi are framed like HAM10000's, so that a scale shift could explain the flags.

Prints a table and writes benchmarks/results/ph2.json.

    python benchmarks/bench_ph2.py [--model NAME=BUNDLE ...]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import EXTERNAL, HAM, RESULTS, ROOT, repo_relative
from dermaclass.fileio import write_json

PH2 = EXTERNAL["ph2"]
KINDS = ("common_nevus", "atypical_nevus")


def default_models() -> dict[str, Path]:
    """The bundled model and every trained bench_ensemble bundle that is on disk."""
    found = {"bundled": ROOT / "models" / "ham10000-effnet-lite0"}
    for run in sorted((ROOT / "runs" / "bench_ensemble").glob("*-seed*")):
        if (run / "model.json").is_file():
            found[run.name] = run
    return found


def kind_figures(p_mel: np.ndarray, kinds: np.ndarray, *, threshold: float, sensitivities: tuple[float, ...]) -> dict:
    """P(mel) AUROC of melanoma against each nevus kind (and all nevi), the stored flag's rate
    on each kind, and PH2's own ROC read at ``sensitivities`` (the ceiling of any threshold)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    mel = kinds == "melanoma"
    flag = p_mel >= threshold
    out: dict[str, Any] = {
        "n": {k: int((kinds == k).sum()) for k in (*KINDS, "melanoma")},
        "flag_sensitivity": float(flag[mel].mean()),
        "flag_specificity": {},
        "mel_auroc": {},
        "best_specificity_at": {},
    }
    for name, neg in {**{k: kinds == k for k in KINDS}, "all_nevi": ~mel}.items():
        out["flag_specificity"][name] = float((~flag[neg]).mean())
        y, s = np.r_[np.ones(mel.sum()), np.zeros(neg.sum())], np.r_[p_mel[mel], p_mel[neg]]
        out["mel_auroc"][name] = float(roc_auc_score(y, s))
        fpr, tpr, _ = roc_curve(y, s)
        out["best_specificity_at"][name] = {
            f"{t:.2f}": float(1 - fpr[np.argmax(tpr >= t)]) if (tpr >= t).any() else None for t in sensitivities
        }
    return out


def measure(bundle: Path) -> dict[str, Any]:
    from bench_ensemble import load_set

    from dermaclass.serving.predictor import Predictor, combine

    pred = Predictor(bundle, backend="torch")
    items, images = load_set(PH2, sizes=pred.input_sizes, split_file=None)
    meta = pd.read_csv(PH2 / "labels.csv", dtype=str).set_index("image_id")["ph2_diagnosis"]
    kinds = items["image"].astype(str).map(meta).to_numpy()
    if pd.isna(kinds).any():
        raise SystemExit(f"{PH2 / 'labels.csv'}: no ph2_diagnosis for {int(pd.isna(kinds).sum())} images")
    probs = pred.checked(pred.calibrated(combine([lo for lo, _ in pred.member_outputs(images)])))
    k = pred.classes.index("mel")
    threshold = float(pred.operating_points["mel"]["threshold"])
    return {
        "bundle": repo_relative(bundle),
        "networks": max(1, len(pred.members)),
        "threshold": threshold,
        **kind_figures(probs[:, k], kinds, threshold=threshold, sensitivities=(0.85, 0.90)),
        # what the served answer (the most probable class) is, per kind: which class takes the nevi
        "answers": {
            kind: {c: round(float(np.mean(probs[kinds == kind].argmax(1) == i)), 3) for i, c in enumerate(pred.classes)}
            for kind in (*KINDS, "melanoma")
        },
    }


def lesion_area() -> dict[str, dict[str, Any]]:
    """Quartiles of the lesion mask's share of the image, per PH2 kind and per HAM10000 class."""
    from PIL import Image

    def share(path: Path) -> float:
        with Image.open(path) as im:
            return float((np.asarray(im.convert("L")) > 127).mean())

    def quartiles(v: pd.Series) -> dict[str, Any]:
        return {
            "n": int(len(v)),
            **{q: round(float(v.quantile(x)), 3) for q, x in (("q1", 0.25), ("median", 0.5), ("q3", 0.75))},
        }

    ph2 = pd.read_csv(PH2 / "labels.csv", dtype=str)
    ph2["share"] = [share(PH2 / "masks" / f"{i}_lesion.png") for i in ph2["image_id"]]
    ham = pd.read_csv(HAM / "HAM10000_metadata.csv", dtype=str)
    ham["share"] = [share(HAM / "masks" / f"{i}_segmentation.png") for i in ham["image_id"]]
    return {
        "ph2": {k: quartiles(g) for k, g in ph2.groupby("ph2_diagnosis")["share"]},
        "ham10000": {k: quartiles(g) for k, g in ham.groupby("dx")["share"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="*", default=[], metavar="NAME=BUNDLE", help="default: every bundle found")
    args = ap.parse_args()
    models = {k: Path(v) for k, v in (s.split("=", 1) for s in args.model)} if args.model else default_models()
    rows = {}
    print(
        f"{'bundle':22} {'AUROC common/atypical/all':27} {'flag sens':>9}  {'flag spec common/atypical':26} "
        "best spec at sens 0.85 (common/atypical)"
    )
    for name, bundle in models.items():
        r = rows[name] = measure(bundle)
        answers = "; ".join(
            f"{kind}: " + ", ".join(f"{c} {v:.2f}" for c, v in sorted(a.items(), key=lambda x: -x[1]) if v >= 0.05)
            for kind, a in r["answers"].items()
        )
        a, f, b = r["mel_auroc"], r["flag_specificity"], r["best_specificity_at"]
        print(
            f"{name:22} {a['common_nevus']:.3f} / {a['atypical_nevus']:.3f} / {a['all_nevi']:.3f}   "
            f"{r['flag_sensitivity']:9.2f}  {f['common_nevus']:.2f} / {f['atypical_nevus']:.2f}{'':16} "
            f"{b['common_nevus']['0.85']:.2f} / {b['atypical_nevus']['0.85']:.2f}\n{'':22} answers: {answers}",
            flush=True,
        )
    area = lesion_area()
    print("lesion share of the frame, median [q1, q3]:")
    for where, groups in area.items():
        print(
            f"  {where}: "
            + "; ".join(f"{k} {v['median']:.2f} [{v['q1']:.2f}, {v['q3']:.2f}]" for k, v in groups.items())
        )
    out = RESULTS / "ph2.json"
    write_json(
        out,
        {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "command": "python benchmarks/bench_ph2.py " + " ".join(f"--model {m}" for m in args.model),
            "data": repo_relative(PH2),
            "models": rows,
            "lesion_area": area,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

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

Part ``framing`` tests that explanation on HAM10000's own test split, where the answers are
known: each test image is cropped around its lesion (its expert mask's centroid, the image's
aspect kept) so that the lesion fills ``--shares`` of the frame, as PH2's melanomas do, and
the bundle reads the crop as it reads any image. If melanomas framed tight are read as
keratoses, and P(mel) ranks them lower, the framing alone moves the answers. Images whose
lesion already fills that share are left as they are. Nothing is fitted; this is a diagnosis.

Prints a table and writes benchmarks/results/ph2.json.

    python benchmarks/bench_ph2.py [--model NAME=BUNDLE ...] [--part ph2 framing] [--shares 0.5 0.67]
"""

from __future__ import annotations

import argparse
import json
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
    """Every bundle in models/ and every trained bench_ensemble bundle that is on disk."""
    found = {p.parent.name: p.parent for p in sorted((ROOT / "models").glob("*/model.json"))}
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

    from dermaclass.serving.predictor import Predictor

    pred = Predictor(bundle, backend="torch")
    items, images = load_set(PH2, sizes=pred.input_sizes, split_file=None)
    meta = pd.read_csv(PH2 / "labels.csv", dtype=str).set_index("image_id")["ph2_diagnosis"]
    kinds = items["image"].astype(str).map(meta).to_numpy()
    if pd.isna(kinds).any():
        raise SystemExit(f"{PH2 / 'labels.csv'}: no ph2_diagnosis for {int(pd.isna(kinds).sum())} images")
    probs = pred.probabilities(images)
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


def frame_box(mask: np.ndarray, share: float) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) crop, of the image's aspect, centred on the mask's centroid
    and kept inside the image, in which the lesion (``mask`` > 0) would fill ``share`` of the
    frame; the whole image when the lesion already fills that much (or there is no lesion)."""
    h, w = mask.shape
    lesion = mask > 0
    s0 = float(lesion.mean())
    if s0 == 0 or s0 >= share:
        return 0, 0, w, h
    scale = (s0 / share) ** 0.5
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    ys, xs = np.nonzero(lesion)
    left = int(np.clip(round(xs.mean() - cw / 2), 0, w - cw))
    top = int(np.clip(round(ys.mean() - ch / 2), 0, h - ch))
    return left, top, left + cw, top + ch


def framing(bundle: Path, shares: tuple[float, ...]) -> dict[str, Any]:
    """HAM10000's test split read as it is and cropped so that each lesion fills ``shares`` of
    the frame: per share, balanced accuracy, per-class sensitivity, P(mel) AUROC (one against
    the rest, and against nevi), what melanomas are answered, and the share actually reached."""
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from common import SPLIT
    from dermaclass.data import read_split
    from dermaclass.evaluate.metrics import classification_metrics
    from dermaclass.serving.predictor import Predictor

    pred = Predictor(bundle, backend="torch")
    split = read_split(SPLIT)
    test = set(split.loc[split["split"] == "test", "image"].astype(str))
    meta = pd.read_csv(HAM / "HAM10000_metadata.csv", dtype=str)
    meta = meta[meta["image_id"].isin(test)].reset_index(drop=True)
    y = meta["dx"].map({c: i for i, c in enumerate(pred.classes)}).to_numpy()
    mel, nv = pred.classes.index("mel"), pred.classes.index("nv")
    sources = [
        (
            Image.open(HAM / "images" / f"{i}.jpg").convert("RGB"),
            np.asarray(Image.open(HAM / "masks" / f"{i}_segmentation.png").convert("L")) > 127,
        )
        for i in meta["image_id"]
    ]
    out: dict[str, Any] = {"n": int(len(meta)), "shares": {}}
    for share in (None, *shares):
        views: dict[tuple[int, int], list[np.ndarray]] = {s: [] for s in pred.input_sizes}
        reached, cropped = [], 0
        for image, mask in sources:
            box = frame_box(mask, share or 0.0)  # share 0: every lesion fills it, the whole image
            cropped += box != (0, 0, *mask.shape[::-1])
            reached.append(float(mask[box[1] : box[3], box[0] : box[2]].mean()))
            for size, im in pred.preprocess_all(image.crop(box)).items():
                views[size].append(im)
        probs = pred.probabilities(views)
        m = classification_metrics(y, probs, pred.classes)
        is_mel, is_nv = y == mel, y == nv
        answers = probs[is_mel].argmax(1)
        out["shares"]["as is" if share is None else f"{share:.2f}"] = {
            "cropped": int(cropped),
            "lesion_share_median": round(float(np.median(reached)), 3),
            "balanced_accuracy": m["balanced_accuracy"],
            "sensitivity": {c: m["per_class"][c]["sensitivity"] for c in pred.classes},
            "mel_auroc": float(roc_auc_score(is_mel, probs[:, mel])),
            "mel_auroc_vs_nv": float(roc_auc_score(is_mel[is_mel | is_nv], probs[is_mel | is_nv, mel])),
            "melanomas_answered": {c: round(float(np.mean(answers == i)), 3) for i, c in enumerate(pred.classes)},
        }
    return {"bundle": repo_relative(bundle), "networks": max(1, len(pred.members)), **out}


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


def _largest(shares: dict[str, float]) -> str:
    """The classes with at least 5 % of the answers, largest first."""
    return ", ".join(f"{c} {v:.2f}" for c, v in sorted(shares.items(), key=lambda x: -x[1]) if v >= 0.05)


def print_ph2(rows: dict[str, dict], area: dict[str, dict]) -> None:
    print(
        f"{'bundle':22} {'AUROC common/atypical/all':27} {'flag sens':>9}  {'flag spec common/atypical':26} "
        "best spec at sens 0.85 (common/atypical)"
    )
    for name, r in rows.items():
        answers = "; ".join(f"{kind}: {_largest(a)}" for kind, a in r["answers"].items())
        a, f, b = r["mel_auroc"], r["flag_specificity"], r["best_specificity_at"]
        print(
            f"{name:22} {a['common_nevus']:.3f} / {a['atypical_nevus']:.3f} / {a['all_nevi']:.3f}   "
            f"{r['flag_sensitivity']:9.2f}  {f['common_nevus']:.2f} / {f['atypical_nevus']:.2f}{'':16} "
            f"{b['common_nevus']['0.85']:.2f} / {b['atypical_nevus']['0.85']:.2f}\n{'':22} answers: {answers}"
        )
    print("lesion share of the frame, median [q1, q3]:")
    for where, groups in area.items():
        print(
            f"  {where}: "
            + "; ".join(f"{k} {v['median']:.2f} [{v['q1']:.2f}, {v['q3']:.2f}]" for k, v in groups.items())
        )


def print_framing(rows: dict[str, dict]) -> None:
    print("HAM10000 test, each lesion cropped to fill a share of the frame:")
    print(
        f"{'bundle':22} {'share':>6} {'reached':>7} {'cropped':>7} {'BA':>6} {'mel sens':>8} {'mel AUROC':>9} "
        f"{'vs nv':>6}  melanomas answered"
    )
    for name, r in rows.items():
        for share, f in r["shares"].items():
            ans = _largest(f["melanomas_answered"])
            print(
                f"{name:22} {share:>6} {f['lesion_share_median']:7.2f} {f['cropped']:7d} {f['balanced_accuracy']:6.3f} "
                f"{f['sensitivity']['mel']:8.3f} {f['mel_auroc']:9.3f} {f['mel_auroc_vs_nv']:6.3f}  {ans}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="*", default=[], metavar="NAME=BUNDLE", help="default: every bundle found")
    ap.add_argument("--part", nargs="+", choices=("ph2", "framing"), default=["ph2", "framing"])
    ap.add_argument(
        "--shares",
        nargs="+",
        type=float,
        default=[0.5, 0.67],
        help="lesion shares of the frame for part framing (0.67: PH2's melanomas' median, measured by part ph2)",
    )
    args = ap.parse_args()
    models = {k: Path(v) for k, v in (s.split("=", 1) for s in args.model)} if args.model else default_models()
    out = RESULTS / "ph2.json"
    # Parts run on their own keep the other part's figures (the file is one record per part).
    record = json.loads(out.read_text()) if out.is_file() else {}
    record.update(
        {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "data": repo_relative(PH2),
        }
    )
    command = "python benchmarks/bench_ph2.py" + (" --model " + " ".join(args.model) if args.model else "")
    if "ph2" in args.part:
        rows = {name: measure(bundle) for name, bundle in models.items()}
        area = lesion_area()
        print_ph2(rows, area)
        record.update({"command": command + " --part ph2", "models": rows, "lesion_area": area})
    if "framing" in args.part:
        shares = tuple(args.shares)
        rows = {name: framing(bundle, shares) for name, bundle in models.items()}
        print_framing(rows)
        record["framing"] = {
            "command": command + " --part framing --shares " + " ".join(map(str, shares)),
            "models": rows,
        }
    write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

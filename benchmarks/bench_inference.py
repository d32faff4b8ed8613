"""Benchmark: single-image latency (torch vs onnxruntime), OOD separation, Grad-CAM pointing.

On a model bundle and the HAM10000 test split of its ``split.csv``:

1. latency: one preprocessed image through the Predictor, torch and onnxruntime (an ONNX
   export is made in a temporary copy of the bundle), median and p90 over ``--repeats``
   calls after warm-up, with the threads given; plus images/second for a batch of 64;
2. OOD separation: the energy score (the bundle's referral score) on HAM10000 test images
   against images that are clearly not dermoscopy: patches of scikit-learn's two sample
   photographs (a building, a flower) at several scales, and synthetic images (noise,
   flat colours, gradients, stripes). Prints the AUROC of the score for in- vs
   out-of-distribution and the share of each referred by the bundle's threshold;
3. Grad-CAM pointing: for ``--n-cam`` test images, the share of the heatmap's mass inside
   the lesion mask (masks/<id>_segmentation.png, cropped exactly as the image), the
   pointing game (is the heatmap's peak inside the lesion?), and the mask's own area share
   (what a uniform heatmap would score) for reference.

Prints a table and writes benchmarks/results/inference.json. Nothing is asserted.

    python benchmarks/bench_inference.py --model models/ham10000-effnet-lite0 [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dermaclass.data.images import fit_to_size, load_rgb
from dermaclass.evaluate.metrics import energy_score, softmax
from dermaclass.fileio import write_json
from dermaclass.inference import Predictor, export_onnx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data" / "ham10000"


def latency(pred: Predictor, image: np.ndarray, repeats: int) -> dict:
    for _ in range(5):
        pred.logits([image])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred.logits([image])
        times.append((time.perf_counter() - t) * 1000)
    batch = [image] * 64
    pred.logits(batch)
    t = time.perf_counter()
    pred.logits(batch)
    per_s = 64 / (time.perf_counter() - t)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "batch64_images_per_s": per_s}


def ood_images(size: tuple[int, int], n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Clearly non-dermoscopic images at the input size, with their kind."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out, kinds = [], []
    w, h = size
    for i in range(n):
        k = i % 6
        if k < 2:  # a patch of a real photograph (building / flower), random scale
            photo = photos[k]
            ph, pw = photo.shape[:2]
            s = rng.uniform(0.25, 1.0)
            cw, ch = int(pw * s), int(ph * s * 0.75)
            x0, y0 = rng.integers(0, pw - cw + 1), rng.integers(0, max(1, ph - ch + 1))
            img = fit_to_size(Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]), size)
            kinds.append("photo")
        elif k == 2:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            kinds.append("noise")
        elif k == 3:
            img = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)).copy()
            kinds.append("flat")
        elif k == 4:
            ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 256, 3)[None, None, :]
            img = np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8).copy()
            kinds.append("gradient")
        else:
            period = int(rng.integers(4, 16))
            stripes = ((np.arange(w) // period) % 2).astype(np.uint8)[None, :, None] * 255
            img = np.broadcast_to(stripes, (h, w, 3)).copy()
            kinds.append("stripes")
        out.append(img)
    return out, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ham10000-effnet-lite0"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--n-ood", type=int, default=300)
    ap.add_argument("--n-cam", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.n_ood, args.n_cam = 20, 60, 40
    from sklearn.metrics import roc_auc_score

    data = Path(args.data)
    model = Path(args.model)
    split = pd.read_csv(model / "split.csv")
    test_ids = split.loc[split["split"] == "test", "image"].astype(str).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(model, copy, ignore=shutil.ignore_patterns("report", "*.onnx"))
        export = export_onnx(copy)
        torch_pred = Predictor(copy, backend="torch", threads=args.threads)
        onnx_pred = Predictor(copy, backend="onnx", threads=args.threads)
        first = torch_pred.preprocess(data / "images" / f"{Path(test_ids[0]).stem}.jpg")
        lat = {"torch": latency(torch_pred, first, args.repeats), "onnxruntime": latency(onnx_pred, first, args.repeats)}

    pred = Predictor(model, backend="torch", threads=args.threads)
    size = pred.input_size
    ids = [Path(i).stem for i in test_ids]
    ham = [pred.preprocess(data / "images" / f"{i}.jpg") for i in ids]
    ood, kinds = ood_images(size, args.n_ood)
    z_in, z_out = pred.logits(ham), pred.logits(ood)
    s_in, s_out = energy_score(z_in), energy_score(z_out)
    top_in = softmax(z_in, pred.temperature).max(axis=1)
    top_out = softmax(z_out, pred.temperature).max(axis=1)
    thr = pred.ood_threshold
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    ood_res = {
        "score": "energy (logsumexp of logits)",
        "n_in": len(s_in), "n_out": len(s_out),
        "out_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "auroc_in_vs_out": float(roc_auc_score(y, np.r_[s_in, s_out])),
        "threshold": thr,
        "in_referred_by_threshold": float(np.mean(s_in < thr)) if thr is not None else None,
        "out_referred_by_threshold": float(np.mean(s_out < thr)) if thr is not None else None,
        "out_referred_by_kind": {k: float(np.mean([s < thr for s, kk in zip(s_out, kinds) if kk == k]))
                                 for k in sorted(set(kinds))} if thr is not None else None,
        # the whole referral rule of the app: low top probability OR a low energy score
        "auroc_top_probability": float(roc_auc_score(y, np.r_[top_in, top_out])),
        "in_referred_total": float(np.mean((top_in < pred.refer_below) | (s_in < (thr if thr is not None else -np.inf)))),
        "out_referred_total": float(np.mean((top_out < pred.refer_below) | (s_out < (thr if thr is not None else -np.inf)))),
        "out_referred_total_by_kind": {
            k: float(np.mean([(t < pred.refer_below) or (thr is not None and s < thr)
                              for t, s, kk in zip(top_out, s_out, kinds) if kk == k])) for k in sorted(set(kinds))},
    }

    rng = np.random.default_rng(0)
    cam_ids = [ids[i] for i in rng.choice(len(ids), size=min(args.n_cam, len(ids)), replace=False)]
    mass, pointing, area = [], [], []
    for i in cam_ids:
        img = load_rgb(data / "images" / f"{i}.jpg")
        mask_path = data / "masks" / f"{i}_segmentation.png"
        if not mask_path.is_file():
            continue
        mask = fit_to_size(Image.open(mask_path).convert("RGB"), size)[..., 0] > 127
        heat, _ = pred.gradcam(np.asarray(img))
        total = heat.sum()
        if total <= 0 or not mask.any():
            continue
        mass.append(float(heat[mask].sum() / total))
        pointing.append(bool(mask.flat[int(np.argmax(heat))]))
        area.append(float(mask.mean()))
    cam = {"n": len(mass), "mass_inside_lesion_mean": float(np.mean(mass)), "mass_inside_lesion_median": float(np.median(mass)),
           "pointing_game_hit_rate": float(np.mean(pointing)), "lesion_area_share_mean": float(np.mean(area)),
           "note": "a uniform heatmap would put lesion_area_share of its mass inside the lesion"}

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
              "model": str(model), "input_size": list(size), "onnx_max_abs_diff": export["max_abs_diff"],
              "latency": lat, "ood": ood_res, "gradcam": cam, "quick": args.quick}
    print(f"single image latency, {args.threads} threads: torch {lat['torch']['median_ms']:.1f} ms "
          f"(p90 {lat['torch']['p90_ms']:.1f}), onnxruntime {lat['onnxruntime']['median_ms']:.1f} ms "
          f"(p90 {lat['onnxruntime']['p90_ms']:.1f}); batch 64: torch {lat['torch']['batch64_images_per_s']:.0f} img/s, "
          f"onnxruntime {lat['onnxruntime']['batch64_images_per_s']:.0f} img/s; ONNX max |diff| {export['max_abs_diff']:.1e}")
    print(f"OOD (energy): AUROC {ood_res['auroc_in_vs_out']:.3f} on {len(s_in)} HAM10000 test vs {len(s_out)} non-dermoscopic; "
          f"referred by the bundle threshold: test {ood_res['in_referred_by_threshold']}, non-dermoscopic "
          f"{ood_res['out_referred_by_threshold']} ({ood_res['out_referred_by_kind']}); whole referral rule (top "
          f"probability < {pred.refer_below:.0%} or low energy): test {ood_res['in_referred_total']:.1%}, "
          f"non-dermoscopic {ood_res['out_referred_total']:.1%} ({ood_res['out_referred_total_by_kind']})")
    print(f"Grad-CAM on {cam['n']} test images: {cam['mass_inside_lesion_mean']:.1%} of the mass inside the lesion "
          f"(lesion covers {cam['lesion_area_share_mean']:.1%} of the image); pointing game {cam['pointing_game_hit_rate']:.1%}")
    out = RESULTS / ("inference_quick.json" if args.quick else "inference.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

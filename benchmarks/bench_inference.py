"""Benchmark: every serving backend side by side (issue 16): torch, onnxruntime, OpenVINO
float32, OpenVINO at bfloat16 inference precision (CPUs with native bfloat16) and OpenVINO int8.

On a model bundle (a temporary copy, so the bundle itself is untouched): the ONNX and
OpenVINO exports are made and checked as `dermaclass export` makes them; the int8 model is
calibrated on 300 images of the bundle's train split (never test images) and its valid-split
check is recorded (here it is measured whatever the drop; the export command refuses a drop
above 0.01); bfloat16 gets the same valid-split check. For each backend, with the threads given: single-image latency (one
preprocessed HAM10000 test image, median and p90 over ``--repeats`` calls after warm-up),
images/second for a batch of 64, the size of what it loads, and balanced accuracy with the
bundle's test-time augmentation on the HAM10000 test split and on every image of the
external sets (over the classes each has). The referral and class-activation-map figures
are bench_refer.py's.

Prints a table and writes benchmarks/results/inference.json. Nothing is asserted.

    python benchmarks/bench_inference.py --model models/ham10000-effnet-lite0 [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXTERNAL  # noqa: E402

from dermaclass.config import load_config  # noqa: E402
from dermaclass.evaluate.metrics import classification_metrics  # noqa: E402
from dermaclass.evaluate.run import split_images  # noqa: E402
from dermaclass.export import check_bf16_bundle, cpu_has_bf16, export_onnx, export_openvino, quantize_bundle  # noqa: E402
from dermaclass.fileio import write_json  # noqa: E402
from dermaclass.inference import Predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data" / "ham10000"
BACKENDS = {"torch": ["model.safetensors"], "onnx": ["model.onnx"], "openvino": ["model.xml", "model.bin"],
            "openvino-bf16": ["model.xml", "model.bin"], "openvino-int8": ["model-int8.xml", "model-int8.bin"]}


def latency(pred: Predictor, image: np.ndarray, repeats: int) -> dict:
    """One forward pass (no TTA: the figure a backend is judged on), then the bundle's flip TTA
    (four passes, as the app serves), then a batch of 64."""
    def timed(tta: bool, n: int) -> list[float]:
        for _ in range(5):
            pred.logits([image], tta=tta)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            pred.logits([image], tta=tta)
            times.append((time.perf_counter() - t) * 1000)
        return times

    single, with_tta = timed(False, repeats), timed(True, max(10, repeats // 4))
    batch = [image] * 64
    pred.logits(batch, tta=False)
    t = time.perf_counter()
    pred.logits(batch, tta=False)
    per_s = 64 / (time.perf_counter() - t)
    return {"median_ms": float(np.median(single)), "p90_ms": float(np.percentile(single, 90)),
            "tta_median_ms": float(np.median(with_tta)), "batch64_images_per_s": per_s}


def balanced_accuracy(pred: Predictor, labels: list[str], images) -> float | None:  # noqa: ANN001
    probs = pred.probabilities(images)  # the bundle's TTA, as the app serves it
    y = np.array([pred.classes.index(c) for c in labels])
    return classification_metrics(y, probs, pred.classes)["balanced_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ham10000-effnet-lite0"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-calibration", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="20 repeats, 40 calibration images, no accuracy figures")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.n_calibration = 20, 40

    data = Path(args.data)
    model = Path(args.model)
    cfg = load_config()
    split = pd.read_csv(model / "split.csv")
    test_ids = split.loc[split["split"] == "test", "image"].astype(str).tolist()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(model, copy, ignore=shutil.ignore_patterns("report", "*.onnx", "*.xml", "*.bin"))
        exports = {"onnx": export_onnx(copy), "openvino": export_openvino(copy)}
        t = time.perf_counter()
        exports["openvino-int8"] = quantize_bundle(copy, data, cfg=cfg, n_calibration=args.n_calibration, max_drop=1.0)
        exports["openvino-int8"]["seconds"] = round(time.perf_counter() - t, 1)
        if cpu_has_bf16():
            exports["openvino-bf16"] = check_bf16_bundle(copy, data, cfg=cfg, max_drop=1.0)
        sets = {}
        if not args.quick:
            sets["ham10000_test"] = split_images(copy, data, splits=("test",), cfg=cfg)["test"]
            for name, folder in EXTERNAL.items():
                if folder.is_dir():
                    sets[name] = split_images(copy, folder, splits=("all",), cfg=cfg)["all"]
        for backend, files in BACKENDS.items():
            if backend != "torch" and backend not in exports:
                continue  # bfloat16 on a CPU without it
            pred = Predictor(copy, backend=backend, threads=args.threads)
            assert pred.backend == backend, (backend, pred.backend)
            first = pred.preprocess(data / "images" / f"{Path(test_ids[0]).stem}.jpg")
            rows[backend] = {**latency(pred, first, args.repeats),
                             "size_mb": round(sum((copy / f).stat().st_size for f in files) / 1e6, 2),
                             "balanced_accuracy": {k: balanced_accuracy(pred, labels, images)
                                                   for k, (labels, images) in sets.items()}}
            lat = rows[backend]
            print(f"{backend:14} {lat['median_ms']:6.2f} ms (p90 {lat['p90_ms']:.2f}; flip TTA {lat['tta_median_ms']:.1f}); batch 64 "
                  f"{lat['batch64_images_per_s']:5.0f} img/s; {lat['size_mb']:.1f} MB; balanced accuracy "
                  + ", ".join(f"{k} {v:.4f}" for k, v in lat["balanced_accuracy"].items()), flush=True)

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
              "command": " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]),
              "model": str(model.resolve().relative_to(ROOT)) if model.resolve().is_relative_to(ROOT) else str(model),
              "input_size": list(pred.input_size), "tta": "flips4" if pred.tta else None,
              "exports": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in exports.items()},
              "backends": rows, "quick": args.quick}
    out = RESULTS / ("inference_quick.json" if args.quick else "inference.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

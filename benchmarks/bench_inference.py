"""Benchmark: single-image latency and batch throughput, torch against onnxruntime.

On a model bundle: one preprocessed HAM10000 test image through the Predictor, torch and
onnxruntime (an ONNX export is made in a temporary copy of the bundle), median and p90 over
``--repeats`` calls after warm-up, with the threads given; plus images/second for a batch of
64. The referral and class-activation-map figures are bench_refer.py's.

Prints a line and writes benchmarks/results/inference.json. Nothing is asserted.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ham10000-effnet-lite0"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 20

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

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads},
              "model": str(model), "input_size": list(torch_pred.input_size), "onnx_max_abs_diff": export["max_abs_diff"],
              "latency": lat, "quick": args.quick}
    print(f"single image latency, {args.threads} threads: torch {lat['torch']['median_ms']:.1f} ms "
          f"(p90 {lat['torch']['p90_ms']:.1f}), onnxruntime {lat['onnxruntime']['median_ms']:.1f} ms "
          f"(p90 {lat['onnxruntime']['p90_ms']:.1f}); batch 64: torch {lat['torch']['batch64_images_per_s']:.0f} img/s, "
          f"onnxruntime {lat['onnxruntime']['batch64_images_per_s']:.0f} img/s; ONNX max |diff| {export['max_abs_diff']:.1e}")
    out = RESULTS / ("inference_quick.json" if args.quick else "inference.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

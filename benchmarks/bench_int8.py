"""Benchmark: int8 calibration settings, compared on the valid split only.

NNCF post-training quantisation of the bundle's float OpenVINO IR under each setting: how
the calibration images are drawn from the train split (at random, or class-balanced with
``export.calibration_pick``), how many, and NNCF's fast or full bias correction. Each int8
model is compared with the float model on the valid split, with the bundle's test-time
augmentation: top-1 agreement with float and the mean total-variation distance between the
two probability vectors (label-free, so finer than a balanced-accuracy drop of a few images),
and balanced accuracy. The export's setting is chosen here, on these figures; the test split
and the external sets are bench_inference.py's, measured once for the chosen setting.

Prints a table and writes benchmarks/results/int8.json. Nothing is asserted.

    python benchmarks/bench_int8.py [--model models/ham10000-effnet-lite0] [--quick]
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
import openvino as ov
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HAM, RESULTS, ROOT, repo_relative  # noqa: E402
from dermaclass.config import load_config  # noqa: E402
from dermaclass.evaluate.run import split_images  # noqa: E402
from dermaclass.fileio import write_json  # noqa: E402
from dermaclass.serving.export import calibration_pick, export_openvino, logits_balanced_accuracy, quantize_ir  # noqa: E402
from dermaclass.serving.predictor import Predictor  # noqa: E402

# name -> (draw, images, fast bias correction); the first is the export's setting before the int8 settings were compared.
SETTINGS: dict[str, tuple[str, int, bool]] = {
    "random-300-fast": ("random", 300, True),
    "random-1000-fast": ("random", 1000, True),
    "balanced-300-fast": ("balanced", 300, True),
    "random-300-full": ("random", 300, False),
    "balanced-300-full": ("balanced", 300, False),
    "balanced-600-full": ("balanced", 600, False),
    "random-1000-full": ("random", 1000, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ham10000-effnet-lite0"))
    ap.add_argument("--data", default=str(HAM))
    ap.add_argument("--only", nargs="*", help="setting names (default: all)")
    ap.add_argument("--quick", action="store_true", help="two settings at 40 images: a smoke run")
    args = ap.parse_args()
    settings = {k: v for k, v in SETTINGS.items() if not args.only or k in args.only}
    if args.quick:
        settings = {"random-40-fast": ("random", 40, True), "balanced-40-full": ("balanced", 40, False)}
    cfg = load_config()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(args.model, bundle, ignore=shutil.ignore_patterns("report", "*.onnx", "*.xml", "*.bin"))
        export_openvino(bundle)
        parts = split_images(bundle, args.data, splits=("train", "valid"), cfg=cfg)
        train_labels, train_images = parts["train"]
        valid_labels, valid_images = parts["valid"]
        valid = [valid_images[i] for i in range(len(valid_labels))]
        pred = Predictor(bundle, backend="openvino", threads=cfg.threads)
        float_logits = pred.logits(valid)
        float_probs = softmax(float_logits, axis=1)
        float_ba = logits_balanced_accuracy(float_logits, valid_labels, pred.classes)
        print(f"float valid balanced accuracy {float_ba:.4f} ({len(valid)} images, tta {pred.tta})", flush=True)
        for name, (draw, n, fast) in settings.items():
            pick = (
                calibration_pick(train_labels, n)
                if draw == "balanced"
                else np.sort(np.random.default_rng(0).permutation(len(train_labels))[:n])
            )
            start = time.perf_counter()
            quantized, _ = quantize_ir(pred, [train_images[int(i)] for i in pick], fast_bias_correction=fast)
            seconds = time.perf_counter() - start
            xml = Path(tmp) / f"{name}.xml"
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
            int8 = Predictor(bundle, backend="openvino", threads=cfg.threads)
            int8.use_openvino(xml, name="openvino-int8")
            logits = int8.logits(valid)
            row = {
                "setting": name,
                "draw": draw,
                "images": int(len(pick)),
                "fast_bias_correction": fast,
                "quantise_seconds": round(seconds, 1),
                "agreement_with_float": float(np.mean(logits.argmax(1) == float_logits.argmax(1))),
                "mean_probability_shift": float(np.abs(softmax(logits, axis=1) - float_probs).sum(axis=1).mean() / 2),
                "valid_balanced_accuracy": logits_balanced_accuracy(logits, valid_labels, pred.classes),
            }
            row["drop"] = float_ba - row["valid_balanced_accuracy"]
            rows.append(row)
            print(
                f"{name:20} agreement {row['agreement_with_float']:.4f}  shift {row['mean_probability_shift']:.4f}  "
                f"valid BA {row['valid_balanced_accuracy']:.4f} (drop {row['drop']:+.4f})  {seconds:.0f} s",
                flush=True,
            )
    out = RESULTS / f"int8{'_quick' if args.quick else ''}.json"
    write_json(
        out,
        {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "command": " ".join(["python", "benchmarks/bench_int8.py", *sys.argv[1:]]),
            "model": repo_relative(args.model),
            "checked_on": f"valid split, {len(valid_labels)} images",
            "valid_balanced_accuracy_float": float_ba,
            "settings": rows,
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

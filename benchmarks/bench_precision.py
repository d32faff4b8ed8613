"""Benchmark: can speed be bought back for accuracy? Training throughput of float32 against
bfloat16 autocast (and, optionally, ``torch.compile``) on this CPU.

The same fastai pass as bench_throughput.py (``train.build_learner`` + ``learn.fit(1)`` on
HAM10000 training images from the decode cache, only the training phase timed), once per
setting per round, the order rotating over ``--rounds`` to average out drift. A setting is
worth adopting only if it is faster here *and* does not cost accuracy: the accuracy side is
``bench_levers.py --lever precision`` (same seeds, external sets).

Prints images/s per setting and the ratios to float32, writes benchmarks/results/precision.json.

    python benchmarks/bench_precision.py [--n 1536] [--rounds 3] [--compile] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from bench_throughput import fastai_pass

from common import HAM, RESULTS
from dermaclass.config import load_config
from dermaclass.fileio import write_json


def cpu_flags() -> list[str]:
    """The CPU's bfloat16/AMX/AVX-512 flags (what decides whether bfloat16 can be fast)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f in ("avx512f", "avx512_vnni"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HAM))
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes of compilation)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 256, 1
    import tempfile

    from dermaclass.train import prepare_data

    torch.set_num_threads(args.threads)
    base = load_config(batch_size=args.batch_size, threads=args.threads, imbalance="none")
    data = prepare_data(base, args.data)
    rows = np.sort(
        np.random.default_rng(0).choice(data.train_rows, size=min(args.n, len(data.train_rows)), replace=False)
    )
    settings = {"float32": (base, False), "bfloat16": (base.replace(precision="bfloat16"), False)}
    if args.compile:
        settings["float32+compile"] = (base, True)
    speeds: dict[str, list[float]] = {k: [] for k in settings}
    errors: dict[str, str] = {}
    names = list(settings)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, comp) in settings.items():  # warm-up (and compilation) outside the timing
            t0 = time.perf_counter()
            try:
                fastai_pass(cfg, data, rows[: cfg.batch_size * 4], Path(tmp) / f"warm-{name}", compile_model=comp)
            except Exception as exc:  # torch.compile can fail on a CPU toolchain: record, do not hide
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(
                f"warm-up {name}: {time.perf_counter() - t0:.1f} s" + (f" ({errors[name]})" if name in errors else ""),
                flush=True,
            )
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if name in errors:
                    continue
                cfg, comp = settings[name]
                speeds[name].append(fastai_pass(cfg, data, rows, Path(tmp) / f"r{r}-{name}", compile_model=comp))
                print(f"round {r + 1} {name}: {speeds[name][-1]:.1f} images/s", flush=True)
    mean = {k: float(np.mean(v)) for k, v in speeds.items() if v}
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu_flags": cpu_flags(),
        },
        "model": base.arch,
        "input_size": list(base.image_size),
        "batch_size": base.batch_size,
        "images": int(len(rows)),
        "rounds": args.rounds,
        "images_per_s": mean,
        "runs": speeds,
        "errors": errors,
        "over_float32": {k: v / mean["float32"] for k, v in mean.items()},
    }
    for k, v in mean.items():
        print(f"{k:18} {v:7.1f} images/s  ({v / mean['float32']:.2f}x float32)")
    out = RESULTS / ("precision_quick.json" if args.quick else "precision.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

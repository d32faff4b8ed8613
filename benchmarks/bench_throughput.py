"""Benchmark: training throughput of our fastai pipeline against a bare PyTorch loop.

Same model (the default EfficientNet-Lite0 from timm with fastai's head), input size, batch
size, threads, optimiser family and data (HAM10000 training images read from the decode
cache, the same albumentations pipeline, channels_last), measured in the same run:

- fastai: ``train.build_learner`` + ``learn.fit(1)`` on the real DataLoaders (our
  ``ReadCached`` / ``Albumentations`` / ``Normalize`` transforms, fastai's loop and
  callbacks); only the training phase is timed (a callback reads the clock at
  ``before_train`` / ``after_train``), validation excluded;
- bare: a torch ``DataLoader`` over the same cached arrays with the same augmentation, a
  hand-written step loop (the one place a batch loop belongs: it is the yardstick).

Prints images/second for both and their ratio, stored under ``fastai_over_bare`` in
benchmarks/results/throughput.json (target >= 0.9). Each side runs a warm-up pass first and
the order alternates over ``--rounds`` to average out drift on a shared machine (single
passes of the same loop differ by up to 15 % here, so one round is not enough).

The same file carries the decode-cache gain (from decode_cache.json, bench_decode_cache.py)
and inference throughput and single-image latency for torch against onnxruntime (from
inference.json, bench_inference.py), each with the file it came from; ``make bench`` runs
those two first.

    python benchmarks/bench_throughput.py [--n 1536] [--rounds 4] [--quick] [--out throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dermaclass import models
from dermaclass.config import load_config
from dermaclass.data.augment import train_pipeline
from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class _Timer:
    """fastai callback: wall time of the training phase only."""

    def __new__(cls):
        from fastai.callback.core import Callback

        class Timer(Callback):
            order = 100

            def before_train(self):
                self.t0 = time.perf_counter()

            def after_train(self):
                self.seconds = time.perf_counter() - self.t0

        return Timer()


def fastai_pass(cfg, data, rows: np.ndarray, run_dir: Path, *, compile_model: bool = False) -> float:
    from dermaclass.train import build_learner, stage_dataloaders

    dls = stage_dataloaders(cfg, data, rows, cfg.batch_size)
    learn = build_learner(cfg, data, run_dir, dls=dls)
    learn.unfreeze()
    if compile_model:
        learn.model = torch.compile(learn.model)
    timer = _Timer()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=[timer])
    n = (len(rows) // cfg.batch_size) * cfg.batch_size  # fastai drops the last partial training batch
    return n / timer.seconds


def bare_pass(cfg, data, rows: np.ndarray) -> float:
    norm = models.normalization(cfg.arch)
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    pipeline = train_pipeline(cfg.augment, cfg.image_size)
    vocab = {c: i for i, c in enumerate(data.vocab)}
    labels = [vocab[label] for label in data.items["label"].to_numpy()[rows]]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            arr = data.images[int(rows[i])]
            if pipeline is not None:
                arr = pipeline(image=arr)["image"]
            return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), labels[i]

    model = models.build_model(cfg.arch, len(data.vocab), pretrained=True).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.wd)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(DS(), batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=0)
    model.train()
    start = time.perf_counter()
    n = 0
    for xb, yb in loader:
        x = ((xb.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        loss_fn(model(x), yb).backward()
        opt.step()
        n += len(xb)
    return n / (time.perf_counter() - start)


def sibling_figures() -> dict:
    """The decode-cache and inference figures measured by their own scripts, with their source."""
    out: dict = {}
    cache, infer = RESULTS / "decode_cache.json", RESULTS / "inference.json"
    if cache.is_file():
        c = json.loads(cache.read_text())
        out["decode_cache"] = {
            "from": cache.name,
            **{
                k: {
                    "epoch_time_saved_pct": v["epoch_time_saved_pct"],
                    "train_images_per_s_jpeg": v["train_images_per_s_jpeg"],
                    "train_images_per_s_cache": v["train_images_per_s_cache"],
                }
                for k, v in c.items()
                if isinstance(v, dict) and "epoch_time_saved_pct" in v
            },
        }
    if infer.is_file():
        i = json.loads(infer.read_text())
        out["inference"] = {
            "from": infer.name,
            **{
                k: {
                    "single_image_median_ms": v["end_to_end_ms"]["median"],
                    "single_image_p90_ms": v["end_to_end_ms"]["p90"],
                    "network_median_ms": v["network_ms"]["median"],
                    "batch64_images_per_s": v["batch64_images_per_s"]["median"],
                }
                for k, v in i.get("backends", {}).items()
                if "end_to_end_ms" in v
            },
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "ham10000"))
    ap.add_argument("--n", type=int, default=1536, help="training images per measured pass")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--out",
        default="throughput.json",
        help="results file name in benchmarks/results (e.g. to record how fast the machine of a given day "
        "trains, before spending hours of training minutes on it)",
    )
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 256, 1
    import tempfile

    from dermaclass.train import prepare_data

    torch.set_num_threads(args.threads)
    cfg = load_config(batch_size=args.batch_size, threads=args.threads, imbalance="none")
    data = prepare_data(cfg, args.data)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(data.train_rows, size=min(args.n, len(data.train_rows)), replace=False))
    warm = rows[: max(cfg.batch_size * 4, 128)]
    fastai_s, bare_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fastai_pass(cfg, data, warm, Path(tmp) / "warm")
        bare_pass(cfg, data, warm)
        for r in range(args.rounds):
            order = ("fastai", "bare") if r % 2 == 0 else ("bare", "fastai")
            for which in order:
                if which == "fastai":
                    fastai_s.append(fastai_pass(cfg, data, rows, Path(tmp) / f"r{r}"))
                else:
                    bare_s.append(bare_pass(cfg, data, rows))
                print(
                    f"round {r + 1} {which}: {(fastai_s if which == 'fastai' else bare_s)[-1]:.1f} images/s", flush=True
                )
    fa, ba = float(np.mean(fastai_s)), float(np.mean(bare_s))
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "model": cfg.arch,
        "input_size": list(cfg.image_size),
        "batch_size": cfg.batch_size,
        "images": int(len(rows)),
        "augment": cfg.augment,
        "rounds": args.rounds,
        "fastai_images_per_s": fa,
        "bare_images_per_s": ba,
        "fastai_over_bare": fa / ba,
        "fastai_runs": fastai_s,
        "bare_runs": bare_s,
        **sibling_figures(),
    }
    print(f"fastai {fa:.1f} images/s, bare loop {ba:.1f} images/s: fastai_over_bare = {fa / ba:.3f}")
    out = RESULTS / (args.out.replace(".json", "_quick.json") if args.quick else args.out)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

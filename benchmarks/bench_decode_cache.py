"""Benchmark: what the decode cache saves per training epoch on this machine.

Measures, on the same images and in the same run:
1. data only: seconds per pass to decode JPEG + resize each image (what every epoch pays
   without the cache) against reading the cached uint8 array;
2. the one-off cost of building the cache (parallel decode on all cores);
3. a real training epoch (EfficientNet-Lite0 from timm, forward + backward + SGD step,
   channels_last, batch 64, 2 threads), fed through a torch DataLoader once from JPEG files
   and once from the cache, so the gain includes everything an epoch does.

The shared HAM10000 copy is downsampled to 200x150, which is cheap to decode; clinic
exports are 600x450 (HAM10000's originals) or camera-sized. ``--upscale 3`` repeats the
measurement on copies re-encoded at 3x (600x450, JPEG quality 90), labelled as emulated.

Prints a table and writes benchmarks/results/decode_cache.json.

    python benchmarks/bench_decode_cache.py [--n 2048] [--size 128,96] [--upscale 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dermaclass.data import DecodeCache, load_dataset
from dermaclass.data.cache import decode_resized
from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class _Images(torch.utils.data.Dataset):
    """Items as CHW uint8 tensors, either decoded from files or read from the cache."""

    def __init__(self, source, size: tuple[int, int]) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.source[i]
        arr = decode_resized(item, self.size) if isinstance(item, str) else item
        return torch.from_numpy(arr).permute(2, 0, 1)


def _data_pass(get, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        get(i)
    return time.perf_counter() - start


def _train_epoch(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for xb in loader:
        x = (xb.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
        y = torch.zeros(len(x), dtype=torch.long)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def _upscaled_copies(paths: list[str], factor: int, folder: Path) -> list[str]:
    """JPEG copies at ``factor`` x the resolution, to emulate full-size clinic exports."""
    from PIL import Image

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        big = img.resize((img.width * factor, img.height * factor), Image.Resampling.BICUBIC)
        target = folder / Path(p).name
        big.save(target, quality=90)
        out.append(str(target))
    return out


def _measure(paths: list[str], size: tuple[int, int], cache_root: str, model, batch_size: int) -> dict:
    n = len(paths)
    start = time.perf_counter()
    cached = DecodeCache(cache_root, size).ensure(paths)
    build_s = time.perf_counter() - start
    decode_s = _data_pass(lambda i: decode_resized(paths[i], size), n)
    read_s = _data_pass(lambda i: cached[i], n)
    _train_epoch(model, _Images(cached, size), batch_size)  # warm-up (allocator, kernels)
    epoch_jpeg = _train_epoch(model, _Images(paths, size), batch_size)
    epoch_cache = _train_epoch(model, _Images(cached, size), batch_size)
    return {
        "decode_ms_per_image": round(1000 * decode_s / n, 3),
        "cache_read_ms_per_image": round(1000 * read_s / n, 3),
        "data_pass_speedup": round(decode_s / read_s, 1),
        "cache_build_s": round(build_s, 2),
        "train_epoch_s_jpeg": round(epoch_jpeg, 2),
        "train_epoch_s_cache": round(epoch_cache, 2),
        "epoch_time_saved_pct": round(100 * (epoch_jpeg - epoch_cache) / epoch_jpeg, 1),
        "train_images_per_s_jpeg": round(n / epoch_jpeg, 1),
        "train_images_per_s_cache": round(n / epoch_cache, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "ham10000"))
    parser.add_argument("--n", type=int, default=2048, help="images per epoch measured")
    parser.add_argument("--size", default="128,96", help="width,height fed to the network")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--upscale", type=int, default=3, help="also measure on copies this many times larger (1: off)")
    parser.add_argument("--quick", action="store_true", help="256 images: a smoke run")
    args = parser.parse_args()
    n = 256 if args.quick else args.n
    size = tuple(int(v) for v in args.size.split(","))
    torch.set_num_threads(args.threads)

    import timm

    items = load_dataset(args.data).items.sample(n=n, random_state=0)
    paths = items["path"].tolist()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    model = model.to(memory_format=torch.channels_last)
    result: dict = {
        "machine": {
            "cores": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "images": n,
        "size": list(size),
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["shared_200x150"] = _measure(paths, size, tmp + "/a", model, args.batch_size)
        if args.upscale > 1:
            folder = Path(tmp) / "big"
            folder.mkdir()
            big = _upscaled_copies(paths, args.upscale, folder)
            result[f"emulated_{200 * args.upscale}x{150 * args.upscale}"] = _measure(
                big, size, tmp + "/b", model, args.batch_size
            )
    print(
        f"decode cache, {n} images at {size[0]}x{size[1]}, batch {args.batch_size}, "
        f"{args.threads} threads on {os.cpu_count()} cores"
    )
    for name, r in result.items():
        if not isinstance(r, dict) or "decode_ms_per_image" not in r:
            continue
        print(f"\n{name} sources{'':16}{'JPEG files':>12}{'cache':>12}")
        print(f"{'  data only, ms/image':38}{r['decode_ms_per_image']:>12.3f}{r['cache_read_ms_per_image']:>12.3f}")
        print(f"{'  training epoch, s':38}{r['train_epoch_s_jpeg']:>12.2f}{r['train_epoch_s_cache']:>12.2f}")
        print(f"{'  training images/s':38}{r['train_images_per_s_jpeg']:>12.1f}{r['train_images_per_s_cache']:>12.1f}")
        print(f"  epoch time saved: {r['epoch_time_saved_pct']} %; one-off cache build: {r['cache_build_s']:.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / ("decode_cache_quick.json" if args.quick else "decode_cache.json"), result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

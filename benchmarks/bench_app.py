"""Benchmark: the Gradio app under load on loopback.

Launches the app on a free loopback port (in this process, as ``dermaclass serve`` does),
then runs N concurrent gradio_client clients for a bounded time, each calling the
``/diagnose`` endpoint (prediction + Grad-CAM) on HAM10000 test images in turn. Records
per-request latency, p50/p99, requests/second and errors, and writes
benchmarks/results/app.json. Nothing is asserted.

    python benchmarks/bench_app.py --model models/ham10000-effnet-lite0 [--clients 4] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dermaclass.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data" / "ham10000"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ham10000-effnet-lite0"))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds = 2, 15

    from gradio_client import Client, handle_file

    from dermaclass.ui import build_app

    split = pd.read_csv(Path(args.model) / "split.csv")
    images = [
        Path(args.data) / "images" / f"{Path(i).stem}.jpg"
        for i in split.loc[split["split"] == "test", "image"].astype(str)
    ][:200]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(args.model, review_dir=Path(os.environ.get("TMPDIR", "/tmp")) / "dermaclass-bench-review")
    app.queue(default_concurrency_limit=2).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True
    )
    url = f"http://127.0.0.1:{port}/"
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds

    def worker(k: int) -> None:
        client = Client(url, verbose=False)
        i = k
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                client.predict(handle_file(str(images[i % len(images)])), False, api_name="/diagnose")
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            i += args.clients

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    app.close()
    lat = np.asarray(latencies) * 1000
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": args.model,
        "clients": args.clients,
        "seconds": round(wall, 1),
        "requests": len(lat),
        "errors": len(errors),
        "error_examples": errors[:5],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "requests_per_s": len(lat) / wall,
        "endpoint": "/diagnose (prediction + Grad-CAM)",
    }
    print(
        f"{args.clients} clients, {wall:.0f} s: {len(lat)} requests, {len(errors)} errors; "
        f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, {result['requests_per_s']:.2f} req/s"
    )
    out = RESULTS / ("app_quick.json" if args.quick else "app.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

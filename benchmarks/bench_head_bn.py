"""Benchmark: a variance floor on the head's batch norms, measured on trained bundles, no retraining.

Why: fastai's head (``create_head``: pool, flatten, BatchNorm1d, dropout, linear, ReLU,
BatchNorm1d, dropout, linear) normalises each unit by its running variance. A unit that was
almost never on in training keeps a running variance near zero (1e-8 to 1e-45 in the first
head batch norm of most trained networks here), so its gain is up to weight / sqrt(eps) = 300-900.
An image that turns such a unit on then gets logits of 1e5: in 3 of 6 short-budget ensembles
the first member's last epoch had a valid loss of 4.9, 13.2 and 423 (bench_ensemble; one
member, k5-short seed 42 m0, has a second-head-norm unit at running variance 1e-8 and logits
of 3.4e5 on a few nevi). A floor on the running variance (in eval mode the only place it is
used) changes nothing for images that leave such units off, and bounds the rest.

For every network of each bundle given: the pooled features (the first head batch norm's
input) of its held-out images (a member's own fold, a single network's valid split) and of
the HAM10000 test split, under the bundle's flip TTA (the four flips' logits averaged, as it
serves), computed once; then the head as trained and with every ``--floors`` value applied
to both head batch norms. Per network and floor: raw NLL (the figure that ran away),
balanced accuracy of the argmax, the largest |logit|, and the share of images whose top
class changed. For an ensemble also its served HAM test balanced accuracy by its own rule
and calibration with the floored members. The as-trained head must reproduce the
Predictor's logits (checked, so the replay is the model as served).

    python benchmarks/bench_head_bn.py --bundles runs/bench_ensemble/k5-short-seed42 ... [--floors 1e-3 1e-2 1e-1]

Writes benchmarks/results/head_bn.json (a re-run adds bundles not yet measured).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common import HAM, RESULTS, SPLIT, repo_relative
from dermaclass.fileio import write_json

#: the head's batch norms in fastai's create_head (model[1]): after flatten, and after the ReLU
HEAD_NORMS = (2, 6)


def floored_head(head: Any, floor: float) -> Any:
    """A copy of the head (from its first batch norm on) with every batch norm's running
    variance floored at ``floor`` (0 = as trained), as ``--head-norm-floor`` trains it."""
    from dermaclass.train.callbacks import floor_head_norms

    return floor_head_norms(copy.deepcopy(head[HEAD_NORMS[0] :]), floor).eval()


def pooled_views(pred: Any, images: list[np.ndarray], *, check: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features (4, N, D) of each flip, served logits of the first ``check`` images) of
    one network: the first head batch norm's input, captured by a hook while the Predictor
    serves each flip."""
    import torch

    from dermaclass.serving.predictor import FLIP_VIEWS

    norm = pred.model[1][HEAD_NORMS[0]]
    if not isinstance(norm, torch.nn.BatchNorm1d):
        raise SystemExit(
            f"{pred.bundle}: model[1][{HEAD_NORMS[0]}] is {type(norm).__name__}, not the head's batch norm"
        )
    captured: list[np.ndarray] = []
    hook = norm.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach().numpy().copy()))
    try:
        views = []
        for flip in FLIP_VIEWS:
            captured.clear()
            pred.forward([np.ascontiguousarray(flip(im)) for im in images], tta=False)
            views.append(np.concatenate(captured))
        captured.clear()
        served, _ = pred.forward(images[:check], tta=True)
    finally:
        hook.remove()
    return np.stack(views), served


def head_logits(head: Any, views: np.ndarray) -> np.ndarray:
    """The head's logits, averaged over the flips as the bundle serves them."""
    import torch

    with torch.no_grad():
        return np.mean([head(torch.from_numpy(v)).numpy() for v in views], axis=0).astype(np.float64)


def network_figures(y: np.ndarray, logits: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Raw NLL, balanced accuracy of the argmax, largest |logit|, share of changed top classes."""
    from scipy.special import log_softmax
    from sklearn.metrics import balanced_accuracy_score

    nll = -log_softmax(logits, axis=1)[np.arange(len(y)), y]
    return {
        "nll": float(nll.mean()),
        "nll_max": float(nll.max()),
        "balanced_accuracy": float(balanced_accuracy_score(y, logits.argmax(1))),
        "max_abs_logit": float(np.abs(logits).max()),
        "top_changed": float(np.mean(logits.argmax(1) != base.argmax(1))),
    }


@functools.cache
def ham_items() -> Any:
    """HAM10000's validated items, read once per process (every network reads two parts of it)."""
    from dermaclass.config import load_config
    from dermaclass.data import validate_sources

    items, _ = validate_sources([HAM], **load_config().source_settings())
    return items.reset_index(drop=True)


def load_images(split_file: Path, part: str, size: tuple[int, int]) -> tuple[Any, list[np.ndarray]]:
    """HAM10000 items of one part of a split file and their decode-cache images at ``size``."""
    from dermaclass.config import load_config
    from dermaclass.data import DecodeCache, read_split
    from dermaclass.evaluate.run import select_split

    cfg = load_config()
    items, _ = select_split(ham_items(), read_split(split_file), part, source=str(HAM))
    items = items.reset_index(drop=True)
    cache = DecodeCache(cfg.cache_dir, size).ensure(items["path"].tolist(), items["hash"].tolist())
    return items, [cache[i] for i in range(len(items))]


def measure_bundle(bundle: Path, floors: list[float], *, split_file: Path, limit: int | None = None) -> dict[str, Any]:
    from dermaclass.serving.predictor import Predictor

    pred = Predictor(bundle, backend="torch")
    classes = pred.classes
    networks = pred.networks
    folders = [n.bundle for n in networks]
    out: dict[str, Any] = {"bundle": repo_relative(bundle), "networks": {}, "ensemble_test": {}}
    test_logits: dict[float, list[np.ndarray]] = {f: [] for f in [0.0, *floors]}
    y_test = None
    for net, folder in zip(networks, folders):
        name = folder.name if pred.members else "network"
        row: dict[str, Any] = {}
        for part, split in (("held_out", folder / "split.csv"), ("test", split_file)):
            items, images = load_images(split, "valid" if part == "held_out" else "test", net.input_size)
            items, images = items.iloc[:limit], images[:limit]
            y = np.array([classes.index(v) for v in items["label"].astype(str)])
            views, served = pooled_views(net, images)
            base = head_logits(floored_head(net.model[1], 0.0), views)
            if not np.allclose(base[: len(served)], served, atol=1e-3 * max(1.0, np.abs(served).max())):
                raise SystemExit(f"{folder}: the replayed head does not reproduce the served logits")
            row[part] = {"n": int(len(y))}
            for floor in [0.0, *floors]:
                lo = base if floor == 0 else head_logits(floored_head(net.model[1], floor), views)
                row[part][f"{floor:g}"] = network_figures(y, lo, base)
                if part == "test":
                    test_logits[floor].append(lo)
            if part == "test":
                y_test = y
        out["networks"][name] = row
        held = row["held_out"]
        print(
            f"  {name}: held-out NLL "
            + "  ".join(f"{k} {v['nll']:.3f}" for k, v in held.items() if isinstance(v, dict))
            + f"  (max |logit| as trained {held['0']['max_abs_logit']:.3g})",
            flush=True,
        )
    if pred.members:
        from sklearn.metrics import balanced_accuracy_score

        for floor, los in test_logits.items():
            served, _ = pred.served([(lo, None) for lo in los])
            out["ensemble_test"][f"{floor:g}"] = float(
                balanced_accuracy_score(y_test, pred.calibrated(served).argmax(1))
            )
    return out


def main() -> None:
    import warnings

    # a held-out fold can lack a class the head predicts (df, vasc): balanced accuracy is still defined
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", nargs="+", required=True, help="bundle folders (an ensemble or one network)")
    ap.add_argument("--floors", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--split-file", default=str(SPLIT), help="the split whose test part is HAM test")
    ap.add_argument("--out", default="head_bn.json")
    ap.add_argument("--limit", type=int, help="smoke run: the first N images of each part (results not for reporting)")
    args = ap.parse_args()
    result_file = RESULTS / args.out
    old = json.loads(result_file.read_text()) if result_file.is_file() else {}
    rows = {r["bundle"]: r for r in old.get("bundles", [])}
    command = " ".join(["python", "benchmarks/bench_head_bn.py", *sys.argv[1:]])
    for b in args.bundles:
        bundle = Path(b)
        if repo_relative(bundle) in rows:
            print(f"{bundle}: measured already (delete its entry to measure again)")
            continue
        print(f"{bundle}:", flush=True)
        rows[repo_relative(bundle)] = measure_bundle(
            bundle, args.floors, split_file=Path(args.split_file), limit=args.limit
        )
        write_json(
            result_file,
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "commands": list(dict.fromkeys([*old.get("commands", []), command])),
                "floors": args.floors,
                "bundles": list(rows.values()),
            },
        )
        if rows[repo_relative(bundle)]["ensemble_test"]:
            print(
                "  ensemble HAM test balanced accuracy: "
                + "  ".join(f"floor {k} {v:.4f}" for k, v in rows[repo_relative(bundle)]["ensemble_test"].items())
            )


if __name__ == "__main__":
    main()

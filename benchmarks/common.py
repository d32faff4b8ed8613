"""Shared pieces of the training benchmarks: where the data is, and how a finished run is measured.

Every training benchmark measures a run the same way: the HAM10000 test split of the shared
split file, and every image of the three external dermoscopy sets (derm7pt, isic2017, PH2) (``external`` key), which
are used to compare recipes only, never to fit anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT / ".." / "shared" / "data"
HAM = SHARED / "ham10000"
# PH2 (200 images from a Portuguese hospital, nevus and melanoma only): its balanced accuracy is
# the mean of two sensitivities; its melanoma AUROC and flag rates say more.
EXTERNAL = {"derm7pt": SHARED / "derm7pt", "isic2017": SHARED / "isic2017", "ph2": SHARED / "ph2"}
# The bundled model's lesion-grouped split: every benchmark run trains and tests on it.
SPLIT = ROOT / "models" / "ham10000-effnet-lite0" / "split.csv"


def train_run(
    run: Path,
    *,
    data: str | Path,
    seed: int,
    split_file: str | Path,
    flags: list[str],
    log: Path | None = None,
    resume: bool = False,
) -> float | None:
    """Train ``run`` with ``dermaclass train`` on the benchmark's split, unless it already holds
    a bundle. A folder left by an interrupted run is resumed (``resume``) or trained again from
    the start (``--force``). Output goes to ``log`` (appended) or nowhere. Returns the wall-clock
    minutes, or None when an earlier invocation trained it (its time is in model.json)."""
    import subprocess
    import sys
    import time

    if (run / "model.json").is_file():
        return None
    cmd = [sys.executable, "-m", "dermaclass", "train", str(data), "--out", str(run), "--seed", str(seed)]
    cmd += ["--split-file", str(split_file), *flags]
    if run.is_dir() and any(run.iterdir()):
        cmd.append("--resume" if resume else "--force")
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "a") if log else open(os.devnull, "w") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=out)
    return round((time.perf_counter() - start) / 60, 2)


def _checkout_root(path: Path) -> Path | None:
    """The top of the checkout of *this* repository that holds ``path`` (this one, or another
    worktree or clone sharing its git directory), or None."""
    import subprocess

    def git_dirs(where: Path) -> list[str]:
        # [common git directory, top of the checkout], one per line (paths may hold spaces)
        r = subprocess.run(["git", "-C", str(where), "rev-parse", "--path-format=absolute", "--git-common-dir",
                            "--show-toplevel"], capture_output=True, text=True)  # fmt: skip
        return r.stdout.splitlines() if r.returncode == 0 else []

    where = path if path.is_dir() else path.parent
    while not where.exists():
        where = where.parent
    mine, theirs = git_dirs(ROOT), git_dirs(where)
    return Path(theirs[1]).resolve() if mine and theirs and mine[0] == theirs[0] else None


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it is inside it (as results files record
    paths), else as given: ``--model``, ``--runs-dir`` and ``--split-file`` may point elsewhere.

    Long benchmarks run from a detached worktree with ``--runs-dir`` in the main checkout: a
    path in any checkout of this repository is recorded relative to that checkout, so results
    copied between checkouts name the same files."""
    resolved = Path(path).resolve()
    for top in (ROOT.resolve(), _checkout_root(resolved)):
        if top is not None and resolved.is_relative_to(top):
            return str(resolved.relative_to(top))
    return str(path)


def measure(run: Path, *, split_file: Path, data: Path = HAM, tta: bool = False, n_boot: int = 200) -> dict[str, Any]:
    """HAM test + external figures of a finished run folder (``headline`` dicts)."""
    from dermaclass.config import load_config
    from dermaclass.evaluate.external import evaluate_external, headline
    from dermaclass.evaluate.run import evaluate_bundle

    cfg = load_config()
    test = evaluate_bundle(
        run, data, split_file=split_file, cfg=cfg, n_boot=n_boot, thumbnails=False, gallery=0, tta=tta
    )
    sets = {k: v for k, v in EXTERNAL.items() if v.is_dir()}
    return {"test": headline(test.report), "external": evaluate_external(run, sets, cfg=cfg, tta=tta, n_boot=n_boot)}


def run_facts(run: Path) -> dict[str, Any]:
    """Cost and validation figures a run recorded in its model.json."""
    from dermaclass.models import read_bundle_meta

    meta = read_bundle_meta(run)
    return {
        "valid_balanced_accuracy": meta.metrics_valid["balanced_accuracy"],
        "images_processed": meta.training["images_seen"],
        "full_data_epochs": meta.training["epochs_equivalent"],
        "training_minutes": round(meta.training["seconds"] / 60, 2),
        "lrs": [s.get("lr") for s in meta.stages],
        "temperature": meta.temperature,
    }


def mean_sd(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    return {
        "mean": float(np.mean(v)) if v else None,
        "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "n": len(v),
    }


def summarise_rows(rows: list[dict], *, group: str = "variant", reference: str | None = None) -> dict[str, dict]:
    """Per variant: mean +- sd over seeds of balanced accuracy (HAM test, each external set),
    macro AUROC, minutes; and the same-seed differences against ``reference``."""

    def ba(r: dict, where: str) -> float | None:
        m = r["test"] if where == "test" else r["external"].get(where, {})
        return m.get("balanced_accuracy")

    wheres = ["test", *sorted({k for r in rows for k in r.get("external", {})})]
    ref = {r["seed"]: r for r in rows if r[group] == reference} if reference else {}
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r[group] for r in rows):
        mine = [r for r in rows if r[group] == name]
        s: dict[str, Any] = {"seeds": len(mine)}
        for w in wheres:
            s[w] = {
                "balanced_accuracy": mean_sd([ba(r, w) for r in mine]),
                "macro_auroc": mean_sd(
                    [(r["test"] if w == "test" else r["external"].get(w, {})).get("macro_auroc") for r in mine]
                ),
            }
            if ref:
                d = [
                    ba(r, w) - ba(ref[r["seed"]], w)
                    for r in mine
                    if r["seed"] in ref and ba(r, w) is not None and ba(ref[r["seed"]], w) is not None
                ]
                s[w][f"minus_{reference}"] = {**mean_sd(d), "per_seed": d}
        s["nv_sensitivity_test"] = mean_sd([r["test"]["per_class"].get("nv", {}).get("sensitivity") for r in mine])
        s["training_minutes"] = mean_sd([r.get("training_minutes") for r in mine])
        s["images_processed"] = mean_sd([r.get("images_processed") for r in mine])
        out[name] = s
    return out


def fmt(ms: dict[str, float | None]) -> str:
    if ms.get("mean") is None:
        return "-"
    return f"{ms['mean']:.3f}" + (f" ± {ms['sd']:.3f}" if ms.get("sd") is not None else "")

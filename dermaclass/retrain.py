"""Retrain a model bundle on a clinic's new data and compare it with the bundle in use.

The clinic's loop: a bundle is in use; new labelled images arrive (e.g. corrections saved
from the app into ``review/``). ``retrain`` trains a new bundle with the parent's recipe and
settings, starting from its weights, on the parent's data plus the new folders, keeping the
parent's lesion-grouped split (old images keep their side; new lesions are assigned), so
that the parent's test split stays a fair yardstick. It then evaluates the new bundle, and
both bundles on the parent's test split, and compares them per class (sensitivity drops are
flagged for review before the new model replaces the old one).

The training itself composes ``dermaclass.train`` (seed 001's stepwise subsets, seed 003's
SGDR and differential LRs, as the parent recorded). This is decision support, not a
diagnostic device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dermaclass import train as training
from dermaclass.config import Config, load_config
from dermaclass.errors import DataError
from dermaclass.evaluate.run import evaluate_bundle
from dermaclass.models import read_bundle_meta
from dermaclass.report import compare_reports, write_compare, write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retrained:
    """What a retraining produced: the run, what the split reuse did, and the comparison."""

    result: training.TrainResult
    cfg: Config
    split_file: Path
    split_reuse: dict[str, int]
    new_classes: list[str]
    comparison: dict[str, Any]
    compare_dir: Path

    @property
    def sensitivity_drops(self) -> list[str]:
        return list(self.comparison.get("sensitivity_drops") or [])


def retrain(
    bundle: str | Path,
    data: Sequence[str | Path],
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_prepared: Callable[[Config, training.TrainData], None] | None = None,
    on_start: Callable[[Config, int], None] | None = None,
) -> Retrained:
    """Train a new bundle in ``out_dir`` from ``bundle`` on ``data`` (the original source first,
    then new folders) and compare both on the parent's test split.

    ``on_prepared(config, data)`` is called once the data are decoded (the CLI reports the
    split there), and ``on_start`` is ``train``'s (the plan, as the run trains it).
    """
    bundle, out_dir = Path(bundle), Path(out_dir)
    parent = read_bundle_meta(bundle)
    split_file = bundle / "split.csv"
    if not split_file.is_file():
        raise DataError(
            f"{bundle}: no split.csv beside the bundle; retrain needs the parent's split to keep its test set"
        )
    known = {f.name for f in fields(Config)}
    inherited = {k: v for k, v in parent.config.items() if k in known}
    cfg = training.inherit_bundle(
        load_config(**{**inherited, "init_bundle": str(bundle), "split_file": str(split_file)})
    )
    training.check_run_dir(out_dir, force=force)
    prepared = training.prepare_data(cfg, list(data), progress=progress)
    if on_prepared is not None:
        on_prepared(cfg, prepared)
    fit = training.train_ensemble if cfg.members > 1 else training.train
    result = fit(cfg, prepared, out_dir, force=force, on_start=on_start)
    training.write_summary(result)
    write_report(evaluate_bundle(out_dir, list(data), cfg=cfg, n_boot=n_boot), out_dir / "report", force=force)
    cmp_dir = out_dir / "compare"
    for name, model in (("parent", bundle), ("new", out_dir)):
        ev = evaluate_bundle(model, list(data), split="test", split_file=split_file, cfg=cfg, n_boot=n_boot)
        write_report(ev, cmp_dir / name, force=force)
    comparison = compare_reports(cmp_dir / "parent", cmp_dir / "new", n_boot=n_boot)
    write_compare(comparison, cmp_dir, force=force)
    new_classes = [c for c in prepared.vocab if c not in parent.classes]
    if comparison.get("sensitivity_drops"):
        log.warning(
            "%s: sensitivity drop in %s on the parent's test split", out_dir, ", ".join(comparison["sensitivity_drops"])
        )
    return Retrained(
        result=result,
        cfg=cfg,
        split_file=split_file,
        split_reuse=dict(prepared.split_reuse),
        new_classes=new_classes,
        comparison=comparison,
        compare_dir=cmp_dir,
    )

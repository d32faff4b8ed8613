"""``dermaclass train``, ``retrain`` and ``lr-find``: seed 001/002/003 training from the shell."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dermaclass.cli.common import (
    EXIT_CODES,
    DataOptions,
    DataPath,
    Opt,
    app,
    data_options,
    err,
    friendly,
    main_first,
    out,
    progress_bar,
    rank,
)
from dermaclass.config import Config, load_config
from dermaclass.errors import Exit

#: The Config fields `dermaclass train` takes as flags (help, type and default: cli.FLAG_HELP and Config).
TRAIN_FLAGS = (
    "recipe",
    "arch",
    "weights",
    "init_bundle",
    "pretrained",
    "image_size",
    "batch_size",
    "lr",
    "lr_suggestion",
    "warm_epoch",
    "head_epochs",
    "epochs",
    "n_cycles",
    "cycle_len",
    "cycle_mult",
    "lr_ratio",
    "wd",
    "stage_fractions",
    "stage_sizes",
    "lr_rule",
    "weight_sharing",
    "imbalance",
    "histo_weight",
    "augment",
    "colour_constancy",
    "tta",
    "label_smoothing",
    "keep",
    "head_norm_floor",
    "ema_decay",
    "average_cycles",
    "mix",
    "mix_alpha",
    "sam_rho",
    "precision",
    "early_stop_patience",
    "operating_classes",
    "target_sensitivity",
    "prior_class",
    "prior_sensitivity",
    "ood",
    "members",
    "member_archs",
    "ensemble_calibration",
    "ensemble_combine",
    "distill_from",
    "distill_alpha",
    "distill_temperature",
    "split_file",
    "seed",
    "threads",
)


@app.command("train", epilog=EXIT_CODES)
@friendly
@data_options(*TRAIN_FLAGS)
def train_cmd(
    data: Annotated[
        list[Path],
        typer.Argument(help="One or more datasets (the first keeps its image ids; e.g. an export plus review/)."),
    ],
    out_dir: Annotated[Path, Opt("--out", help="Run folder: config, split, history, plots and the model bundle.")],
    lr_find: Annotated[
        bool,
        Opt(
            "--lr-find",
            help="Pick each stage's LR by a range test (fastai lr_find, --lr-suggestion) instead of a fixed --lr",
        ),
    ] = False,
    force: Annotated[bool, Opt("--force", help="Replace an existing run folder / bundle.")] = False,
    resume: Annotated[
        bool, Opt("--resume", help="Continue the interrupted run in --out (its config and split).")
    ] = False,
    data_opts: DataOptions = None,
) -> None:
    """Train a model bundle on a clinic's image folder (default recipe: stepwise subsets, SGDR stages)."""
    from dermaclass import train as training

    cfg = data_opts.config()
    if lr_find:
        if data_opts.get("lr") is not None:
            raise typer.BadParameter("give either --lr or --lr-find, not both", param_hint="--lr-find")
        cfg = cfg.replace(lr=None)
    logging.getLogger("dermaclass").setLevel(logging.INFO)
    if resume:
        # The interrupted run's own settings and split, whatever the flags say now.
        saved = out_dir / "config.yaml"
        if not saved.is_file():
            from dermaclass.train import TrainingError

            raise TrainingError(f"{out_dir}: no config.yaml, so no run to resume there")
        cfg = load_config(saved, split_file=str(out_dir / "split.csv"))
        if cfg.members == 1:
            training.Resume.read(out_dir)
        elif not (out_dir / training.MEMBERS_DIR).is_dir():
            from dermaclass.train import TrainingError

            raise TrainingError(
                f"{out_dir}: the ensemble stopped before its first member's first epoch ended, so "
                "there is nothing to resume; start it again"
            )
        out.print(f"resuming {out_dir} with its saved config", highlight=False)
    else:
        cfg = training.inherit_bundle(cfg)
        if rank() == 0:
            training.check_run_dir(out_dir, force=force)
    progress, update = progress_bar("decoding")
    with main_first(), progress:
        prepared = training.prepare_data(cfg, data, progress=update)
    if cfg.members > 1:
        _train_ensemble(cfg, prepared, out_dir, force=force, resume=resume)
        return
    if rank() != 0:  # other data-parallel ranks train silently; rank 0 reports
        training.train(cfg, prepared, out_dir, force=force, resume=resume)
        return
    counts = prepared.items["split"].value_counts()
    out.print(
        f"data: {len(prepared.items):,} images, {len(prepared.vocab)} classes; split "
        + ", ".join(f"{s} {int(counts.get(s, 0)):,}" for s in ("train", "valid", "test")),
        highlight=False,
    )
    # the plan as it trains: small data get a smaller batch (or exit 5)
    result = training.train(cfg, prepared, out_dir, force=force, resume=resume, on_start=_print_plan)
    training.write_summary(result)
    m = result.metrics
    out.print(
        f"[bold]valid balanced accuracy {m['balanced_accuracy']:.4f}[/], macro-F1 {m['macro_f1']:.4f} "
        f"(accuracy {m['accuracy']:.4f}); {result.seconds / 60:.1f} min, {result.images_seen:,} images seen",
        highlight=False,
    )
    out.print(f"bundle: {out_dir / 'model.safetensors'} + model.json", highlight=False)


def _train_ensemble(cfg: Config, prepared, out_dir: Path, *, force: bool, resume: bool) -> None:  # noqa: ANN001
    from dermaclass import train as training
    from dermaclass.models import read_bundle_meta

    plan = training.check_ensemble(cfg)
    counts = prepared.items["split"].value_counts()
    held_out = cfg.ensemble_calibration == "valid"  # the folds cut the train split only
    pool = int(counts.get("train", 0) + (0 if held_out else counts.get("valid", 0)))
    out.print(
        f"data: {len(prepared.items):,} images, {len(prepared.vocab)} classes; test {int(counts.get('test', 0)):,}, "
        + (
            f"train {pool:,} in {cfg.members} cross-fitting folds, valid {int(counts.get('valid', 0)):,} held out "
            "from every member"
            if held_out
            else f"train+valid pool {pool:,} in {cfg.members} cross-fitting folds"
        ),
        highlight=False,
    )
    for m in plan:
        out.print(
            f"member {m.name}: {m.arch} at {m.image_size[0]}x{m.image_size[1]}, seed {m.seed}, held-out fold {m.fold}",
            highlight=False,
        )
    result = training.train_ensemble(cfg, prepared, out_dir, force=force, resume=resume, on_start=_print_plan)
    training.write_summary(result)
    meta = read_bundle_meta(out_dir)
    for m in meta.members:
        out.print(
            f"{m['path']}: valid (its fold) balanced accuracy {m['valid_balanced_accuracy']:.4f}", highlight=False
        )
    r = result.metrics
    what = (
        "valid balanced accuracy {ba}[/], macro-F1 {f1} (the ensemble as it serves, on the valid split held out "
        "from every member"
        if held_out
        else "out-of-fold balanced accuracy {ba}[/], macro-F1 {f1} (one member per image"
    )
    out.print(
        "[bold]"
        + what.format(ba=f"{r['balanced_accuracy']:.4f}", f1=f"{r['macro_f1']:.4f}")
        + f"; the ensemble is judged on test: `dermaclass evaluate`); {result.seconds / 60:.1f} min",
        highlight=False,
    )
    out.print(
        f"bundle: {out_dir / 'model.json'} + {len(meta.members)} members in {out_dir / training.MEMBERS_DIR}",
        highlight=False,
    )


@app.command("retrain", epilog=EXIT_CODES)
@friendly
def retrain_cmd(
    bundle: Annotated[Path, typer.Argument(help="The model bundle in use (its run folder, with split.csv).")],
    data: Annotated[list[Path], typer.Argument(help="The data: the original source first, then new folders.")],
    out_dir: Annotated[Path, Opt("--out", help="Run folder of the new model.")],
    n_boot: Annotated[int, Opt("--n-boot")] = 1000,
    force: Annotated[bool, Opt("--force")] = False,
) -> None:
    """Retrain a bundle on new data with its recipe and split, then compare old and new on the old test split."""
    from dermaclass.report import drop_alert
    from dermaclass.retrain import retrain

    def announce(cfg: Config, prepared) -> None:  # noqa: ANN001 - TrainData
        reuse = prepared.split_reuse
        out.print(
            f"split reused from {bundle / 'split.csv'}: {reuse.get('kept', 0):,} images kept their split, "
            f"{reuse.get('followed', 0):,} joined their lesion's split, {reuse.get('assigned', 0):,} new assigned",
            highlight=False,
        )

    logging.getLogger("dermaclass").setLevel(logging.INFO)
    progress, update = progress_bar("decoding")
    with progress:
        done = retrain(
            bundle, data, out_dir, n_boot=n_boot, force=force, progress=update, on_prepared=announce,
            on_start=_print_plan,
        )  # fmt: skip
    if done.new_classes:
        out.print(f"classes added: {', '.join(done.new_classes)}", highlight=False)
    comparison = done.comparison
    o = comparison["overall"]["balanced_accuracy"]
    out.print(
        f"on the parent's test split ({comparison['new']['data']['n']:,} images): balanced accuracy "
        f"{o['old']:.4f} -> {o['new']:.4f} ({o['delta']:+.4f}); comparison: {done.compare_dir / 'compare.html'}",
        highlight=False,
    )
    alert = drop_alert(comparison)
    if alert:
        err.print(f"[bold red]{escape(alert)}[/]", highlight=False)
        raise typer.Exit(Exit.SENSITIVITY_DROP)


def _print_plan(cfg: Config, n_train: int) -> None:
    from dermaclass import schedules
    from dermaclass.train import plan_for

    if cfg.recipe != "stepwise":
        sg = schedules.sgdr_epochs(cfg.n_cycles, cfg.cycle_len, cfg.cycle_mult)
        detail = (
            f"{cfg.head_epochs} head + {cfg.epochs} one-cycle epochs"
            if cfg.recipe == "baseline"
            else f"{cfg.head_epochs} head + {sg} SGDR epochs ({cfg.n_cycles} cycles, len {cfg.cycle_len}, x{cfg.cycle_mult})"
        )
        out.print(
            f"recipe {cfg.recipe}: {n_train:,} images, batch {cfg.batch_size}, "
            f"lr {'range test' if cfg.lr is None else cfg.lr}; {detail}",
            highlight=False,
        )
        return
    plan = plan_for(cfg, n_train)
    table = Table(
        *schedules.format_plan(plan)[0].keys(), title=f"stepwise plan (LR rule {cfg.lr_rule})", title_justify="left"
    )
    for row in schedules.format_plan(plan):
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)
    out.print(f"cost: {schedules.training_cost(plan):.2f} full-data epochs", highlight=False)


@app.command("lr-find", epilog=EXIT_CODES)
@friendly
@data_options("arch", "batch_size", "warm_epoch", "warm_lr", "lr_find_iters", "image_size", "split_file")
def lr_find_cmd(
    data: DataPath,
    out_dir: Annotated[Path, Opt("--out", help="Folder for the plot and lr_find.json.")],
    unfrozen: Annotated[bool, Opt("--unfrozen", help="Range-test the whole net, not the head alone.")] = False,
    data_opts: DataOptions = None,
) -> None:
    """LR range test (fastai lr_find): all four suggestions, the plot, and the chosen one."""
    from dermaclass import train as training
    from dermaclass.fileio import write_json
    from dermaclass.train.lr_find import range_test

    cfg = data_opts.config()
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = training.prepare_data(cfg, data)
    learn = training.build_learner(
        cfg, prepared, out_dir, dls=training.stage_dataloaders(cfg, prepared, prepared.train_rows, cfg.batch_size)
    )
    if unfrozen:
        learn.unfreeze()
    test = range_test(learn, out_dir, "unfrozen" if unfrozen else "head", **cfg.range_test_settings())
    write_json(out_dir / "lr_find.json", {**test.to_dict(), "warm_epoch": cfg.warm_epoch, "config": cfg.to_dict()})
    for k, v in test.suggestions.items():
        out.print(f"{k:8} {v:.2e}" if v else f"{k:8} -", highlight=False)
    out.print(
        f"chosen ({test.rule}): {test.chosen:.2e}" + (f"  note: {test.note}" if test.note else ""), highlight=False
    )
    out.print(f"plot: {out_dir / test.plot}" if test.plot else "no plot", highlight=False)

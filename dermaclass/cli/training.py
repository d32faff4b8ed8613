"""``dermaclass train``, ``retrain`` and ``lr-find``: seed 001/002/003 training from the shell."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dermaclass.cli import (
    EXIT_CODES, DataOptions, DataPath, Opt, data_options, _main_first, _progress, _rank, app, err, friendly, out,
)
from dermaclass.config import Config, load_config


@app.command("train", epilog=EXIT_CODES)
@friendly
@data_options
def train_cmd(
    data: Annotated[list[Path], typer.Argument(help="One or more datasets (the first keeps its image ids; e.g. an export plus review/).")],
    out_dir: Annotated[Path, Opt("--out", help="Run folder: config, split, history, plots and the model bundle.")],
    recipe: Annotated[str | None, Opt("--recipe", help="baseline | sgdr | stepwise [default: stepwise]")] = None,
    arch: Annotated[str | None, Opt("--arch", help="Any timm architecture; tf_efficientnet_lite0/1/2 have offline ImageNet weights [default: tf_efficientnet_lite0]")] = None,
    weights: Annotated[Path | None, Opt("--weights", help="Local body weights (.safetensors / .pth state dict).")] = None,
    init_bundle: Annotated[Path | None, Opt("--from", help="Start from this model bundle (its classes kept, new ones added).")] = None,
    pretrained: Annotated[bool | None, Opt("--pretrained/--no-pretrained", help="ImageNet weights [default: on]")] = None,
    image_size: Annotated[str | None, Opt("--image-size", help="width,height [default: 128,96]")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="b (stepwise: b, 2b, 3b, 4b, b) [default: 32]")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Fixed base LR [default: 1e-2]")] = None,
    lr_find: Annotated[bool, Opt("--lr-find", help="Pick each stage's LR by a range test (fastai lr_find, "
                                 "--lr-suggestion) instead of a fixed --lr")] = False,
    lr_suggestion: Annotated[str | None, Opt("--lr-suggestion", help="valley | slide | minimum | steep")] = None,
    warm_epoch: Annotated[bool | None, Opt("--warm-epoch/--no-warm-epoch", help="With --lr-find: one epoch at a small LR (--warm-lr) before each range test")] = None,
    head_epochs: Annotated[int | None, Opt("--head-epochs", help="Coarse head-only epochs [default: 1]")] = None,
    epochs: Annotated[int | None, Opt("--epochs", help="baseline: unfrozen epochs [default: 3]")] = None,
    n_cycles: Annotated[int | None, Opt("--n-cycles", help="SGDR cycles [default: 3]")] = None,
    cycle_len: Annotated[int | None, Opt("--cycle-len", help="SGDR first cycle length [default: 1]")] = None,
    cycle_mult: Annotated[int | None, Opt("--cycle-mult", help="SGDR cycle-length multiplier, >= 2 [default: 2]")] = None,
    lr_ratio: Annotated[float | None, Opt("--lr-ratio", help="Differential LRs slice(lr/ratio, lr) [default: 100]")] = None,
    stage_fractions: Annotated[str | None, Opt("--stage-fractions", help="Stepwise: the nested share of the training images each stage trains on [default: 0.2,0.4,0.6,0.8,1.0]")] = None,
    stage_sizes: Annotated[str | None, Opt("--stage-sizes", help="Progressive resizing: one WIDTHxHEIGHT per stepwise "
                                           "stage, the last = --image-size (e.g. 96x72,112x84,128x96,128x96,128x96) "
                                           "[default: every stage at --image-size]")] = None,
    lr_rule: Annotated[str | None, Opt("--lr-rule", help="eq9 | constant | linear [default: linear]")] = None,
    weight_sharing: Annotated[bool | None, Opt("--weight-sharing/--no-weight-sharing", help="Carry weights between stages")] = None,
    imbalance: Annotated[str | None, Opt("--imbalance", help="none | weights | sqrt-weights | sampler | focal | logit-adjusted [default: sampler]")] = None,
    augment: Annotated[str | None, Opt("--augment", help="none | basic | augmix [default: basic]")] = None,
    colour_constancy: Annotated[str | None, Opt("--colour-constancy", help="none | shades-of-gray: the same colour "
                                                "normalisation at training and inference [default: none]")] = None,
    tta: Annotated[str | None, Opt("--tta", help="none | flips: the test-time augmentation the bundle serves "
                                  "with (calibrated with it) [default: flips]")] = None,
    label_smoothing: Annotated[float | None, Opt("--label-smoothing", help="Cross-entropy label smoothing, 0 = off [default: 0]")] = None,
    keep: Annotated[str | None, Opt("--keep", help="best (best validation balanced accuracy) | last (end of "
                                    "training) [default: best]")] = None,
    ema_decay: Annotated[float | None, Opt("--ema-decay", help="Keep an exponential moving average of the weights "
                                            "(e.g. 0.998) and bundle it; 0 = off [default: 0]")] = None,
    precision: Annotated[str | None, Opt("--precision", help="float32 | bfloat16 (autocast; faster only on CPUs "
                                          "with native bfloat16) [default: float32]")] = None,
    early_stop_patience: Annotated[int | None, Opt("--early-stop-patience", help="0 = off")] = None,
    operating_classes: Annotated[str | None, Opt("--operating-classes", help="Classes that get a sensitivity threshold [default: mel]")] = None,
    target_sensitivity: Annotated[float | None, Opt("--target-sensitivity", help="Validation sensitivity of the threshold [default: 0.9]")] = None,
    ood: Annotated[str | None, Opt("--ood", help="mahalanobis | knn | energy: the out-of-distribution score that refers "
                                   "images unlike the training data [default: mahalanobis]")] = None,
    split_file: Annotated[Path | None, Opt("--split-file", help="Reuse this split (new images are added).")] = None,
    seed: Annotated[int | None, Opt("--seed")] = None,
    threads: Annotated[int | None, Opt("--threads", help="torch threads (0 = all cores)")] = None,
    force: Annotated[bool, Opt("--force", help="Replace an existing run folder / bundle.")] = False,
    resume: Annotated[bool, Opt("--resume", help="Continue the interrupted run in --out (its config and split).")] = False,
    data_opts: DataOptions = None,
) -> None:
    """Train a model bundle on a clinic's image folder (default recipe: stepwise subsets, SGDR stages)."""
    from dermaclass import train as training

    cfg = data_opts.config(recipe=recipe, arch=arch, weights=weights, init_bundle=init_bundle, pretrained=pretrained, image_size=image_size,
                  batch_size=batch_size, lr=lr, lr_suggestion=lr_suggestion, warm_epoch=warm_epoch,
                  head_epochs=head_epochs, epochs=epochs, n_cycles=n_cycles, cycle_len=cycle_len, cycle_mult=cycle_mult,
                  lr_ratio=lr_ratio, stage_fractions=stage_fractions, stage_sizes=stage_sizes, lr_rule=lr_rule, weight_sharing=weight_sharing,
                  imbalance=imbalance, augment=augment, colour_constancy=colour_constancy, tta=tta,
                  label_smoothing=label_smoothing, keep=keep, ema_decay=ema_decay, precision=precision, early_stop_patience=early_stop_patience, split_file=split_file,
                  operating_classes=operating_classes, target_sensitivity=target_sensitivity, ood=ood,
                  seed=seed, threads=threads)
    if lr_find:
        if lr is not None:
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
        training.read_progress(out_dir)
        out.print(f"resuming {out_dir} with its saved config", highlight=False)
    else:
        cfg = training.inherit_bundle(cfg)
        if _rank() == 0:
            training.check_run_dir(out_dir, force=force)
    progress, update = _progress("decoding")
    with _main_first(), progress:
        prepared = training.prepare_data(cfg, data, progress=update)
    if _rank() != 0:  # other data-parallel ranks train silently; rank 0 reports
        training.train(cfg, prepared, out_dir, force=force, resume=resume)
        return
    counts = prepared.items["split"].value_counts()
    out.print(f"data: {len(prepared.items):,} images, {len(prepared.vocab)} classes; split "
              + ", ".join(f"{s} {int(counts.get(s, 0)):,}" for s in ("train", "valid", "test")), highlight=False)
    if not resume:
        cfg = training.fit_batch_size(cfg, len(prepared.train_rows))  # small data: a smaller batch, or exit 5
    _print_plan(cfg, len(prepared.train_rows))
    result = training.train(cfg, prepared, out_dir, force=force, resume=resume)
    training.write_summary(result)
    m = result.metrics
    out.print(f"[bold]valid balanced accuracy {m['balanced_accuracy']:.4f}[/], macro-F1 {m['macro_f1']:.4f} "
              f"(accuracy {m['accuracy']:.4f}); {result.seconds / 60:.1f} min, {result.images_seen:,} images seen",
              highlight=False)
    out.print(f"bundle: {out_dir / 'model.safetensors'} + model.json", highlight=False)


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
    from dermaclass.retrain import retrain

    def announce(cfg: Config, prepared) -> None:  # noqa: ANN001 - TrainData
        reuse = prepared.split_reuse
        out.print(f"split reused from {bundle / 'split.csv'}: {reuse.get('kept', 0):,} images kept their split, "
                  f"{reuse.get('followed', 0):,} joined their lesion's split, {reuse.get('assigned', 0):,} new assigned",
                  highlight=False)
        _print_plan(cfg, len(prepared.train_rows))

    logging.getLogger("dermaclass").setLevel(logging.INFO)
    progress, update = _progress("decoding")
    with progress:
        done = retrain(bundle, data, out_dir, n_boot=n_boot, force=force, progress=update, on_prepared=announce)
    if done.new_classes:
        out.print(f"classes added: {', '.join(done.new_classes)}", highlight=False)
    comparison = done.comparison
    o = comparison["overall"]["balanced_accuracy"]
    out.print(f"on the parent's test split ({comparison['new']['data']['n']:,} images): balanced accuracy "
              f"{o['old']:.4f} -> {o['new']:.4f} ({o['delta']:+.4f}); comparison: {done.compare_dir / 'compare.html'}",
              highlight=False)
    if done.sensitivity_drops:
        err.print(f"[bold red]SENSITIVITY DROP[/] in {', '.join(done.sensitivity_drops)}: review before "
                  "replacing the model in use.", highlight=False)
        raise typer.Exit(6)


def _print_plan(cfg: Config, n_train: int) -> None:
    from dermaclass import schedules
    from dermaclass.train import plan_for

    if cfg.recipe != "stepwise":
        sg = schedules.sgdr_epochs(cfg.n_cycles, cfg.cycle_len, cfg.cycle_mult)
        detail = (f"{cfg.head_epochs} head + {cfg.epochs} one-cycle epochs" if cfg.recipe == "baseline"
                  else f"{cfg.head_epochs} head + {sg} SGDR epochs ({cfg.n_cycles} cycles, len {cfg.cycle_len}, x{cfg.cycle_mult})")
        out.print(f"recipe {cfg.recipe}: {n_train:,} images, batch {cfg.batch_size}, "
                  f"lr {'range test' if cfg.lr is None else cfg.lr}; {detail}", highlight=False)
        return
    plan = plan_for(cfg, n_train)
    table = Table(*schedules.format_plan(plan)[0].keys(), title=f"stepwise plan (LR rule {cfg.lr_rule})",
                  title_justify="left")
    for row in schedules.format_plan(plan):
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)
    out.print(f"cost: {schedules.training_cost(plan):.2f} full-data epochs", highlight=False)


@app.command("lr-find", epilog=EXIT_CODES)
@friendly
@data_options
def lr_find_cmd(
    data: DataPath,
    out_dir: Annotated[Path, Opt("--out", help="Folder for the plot and lr_find.json.")],
    arch: Annotated[str | None, Opt("--arch")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size")] = None,
    warm_epoch: Annotated[bool | None, Opt("--warm-epoch/--no-warm-epoch", help="One epoch at --warm-lr before the range test")] = None,
    warm_lr: Annotated[float | None, Opt("--warm-lr")] = None,
    unfrozen: Annotated[bool, Opt("--unfrozen", help="Range-test the whole net, not the head alone.")] = False,
    iters: Annotated[int | None, Opt("--iters", help="Batches in the range test [default: 60]")] = None,
    image_size: Annotated[str | None, Opt("--image-size")] = None,
    split_file: Annotated[Path | None, Opt("--split-file")] = None,
    data_opts: DataOptions = None,
) -> None:
    """LR range test (fastai lr_find): all four suggestions, the plot, and the chosen one."""
    from dermaclass import train as training
    from dermaclass.fileio import write_json
    from dermaclass.lr_find import range_test

    cfg = data_opts.config(arch=arch, batch_size=batch_size, warm_epoch=warm_epoch, warm_lr=warm_lr,
                           lr_find_iters=iters, image_size=image_size, split_file=split_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = training.prepare_data(cfg, data)
    learn = training.build_learner(cfg, prepared, out_dir, dls=training.stage_dataloaders(cfg, prepared, prepared.train_rows,
                                                                                    cfg.batch_size))
    if unfrozen:
        learn.unfreeze()
    test = range_test(learn, cfg, out_dir, "unfrozen" if unfrozen else "head")
    write_json(out_dir / "lr_find.json", {**test.to_dict(), "warm_epoch": cfg.warm_epoch, "config": cfg.to_dict()})
    for k, v in test.suggestions.items():
        out.print(f"{k:8} {v:.2e}" if v else f"{k:8} -", highlight=False)
    out.print(f"chosen ({test.rule}): {test.chosen:.2e}" + (f"  note: {test.note}" if test.note else ""), highlight=False)
    out.print(f"plot: {out_dir / test.plot}" if test.plot else "no plot", highlight=False)



"""The ``dermaclass`` command line (typer + rich): the ML engineer's side of the tool.

Only this module prints; library modules log. Every command resolves its settings through
``config.load_config`` (defaults < ``--config FILE`` < flags) and turns a DermaclassError into
one clear line on stderr and a documented exit code, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dermaclass import DISCLAIMER, __version__
from dermaclass.config import Config, load_config
from dermaclass.errors import DermaclassError

EXIT_CODES = (
    "Exit codes: 0 success; 1 problems found with --strict; 2 usage or configuration error; "
    "3 the data cannot be read (missing folder, unreadable manifest, no usable images); "
    "4 a model cannot be built or loaded (unknown architecture, unreachable weights, bad bundle); "
    "5 training cannot run on this data (e.g. an empty split); "
    "6 report compare found a class whose sensitivity dropped beyond its interval."
)

app = typer.Typer(
    name="dermaclass",
    help=f"Dermoscopic skin-lesion classifier that a clinic retrains on its own data.\n\n{DISCLAIMER}",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect, validate and split a clinic's image folder.", no_args_is_help=True, epilog=EXIT_CODES)
app.add_typer(data_app, name="data")
report_app = typer.Typer(help="Review and compare evaluation reports.", no_args_is_help=True, epilog=EXIT_CODES)
app.add_typer(report_app, name="report")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Turn the errors a user can fix into one red line and the matching exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DermaclassError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except FileExistsError as exc:
            err.print(f"[bold red]error:[/] {exc} (pass --force to replace it)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"dermaclass {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-v info, -vv debug).")] = 0,
) -> None:
    """Dermoscopic skin-lesion classifier (decision support, not a diagnostic device)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---- shared options ------------------------------------------------------------------
DataPath = Annotated[Path, typer.Argument(help="Dataset folder: one folder per class, or a CSV manifest beside the images.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of settings; flags override it.")]
ManifestOpt = Annotated[Path | None, typer.Option("--manifest", help="CSV manifest (default: the one CSV at the root).")]
ImageColOpt = Annotated[str | None, typer.Option("--image-col", help="Manifest column with image ids or paths.")]
LabelColOpt = Annotated[str | None, typer.Option("--label-col", help="Manifest column with labels.")]
GroupColOpt = Annotated[str | None, typer.Option("--group-col", help="Manifest column with lesion/patient ids.")]
ClassNamesOpt = Annotated[
    Path | None, typer.Option("--class-names", help="Your class list: JSON/YAML mapping code->name, or CSV code,name.")
]
MinOpt = Annotated[int | None, typer.Option("--min-per-class", help="Report classes with fewer images. [default: 10]")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Decoding processes (0 = all cores).")]


def _config(config: Path | None, **flags: Any) -> Config:
    return load_config(config, **{k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()})


def _progress(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True,
        disable=not err.is_terminal,
    )
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _validate(path: Path, cfg: Config):
    from dermaclass.data import validate_source

    progress, update = _progress("decoding")
    with progress:
        return validate_source(cfg, path, progress=update)


def _print_validation(stats: dict[str, Any], *, limit: int = 40) -> None:
    group = stats["group_label"]
    out.print(
        f"[bold]{stats['root']}[/] ({stats['layout']} layout): [bold]{stats['images']:,}[/] usable images of "
        f"{stats['files_checked']:,} checked, {stats['classes']} classes, {stats['groups']:,} {group}, "
        f"imbalance ratio {stats['imbalance_ratio']:g}",
        highlight=False,
    )
    table = Table("code", "class", "images", group, "share", title="Classes", title_justify="left")
    for c in stats["per_class"]:
        table.add_row(c["label"], c["name"], f"{c['images']:,}", f"{c['groups']:,}", f"{c['fraction'] * 100:.1f} %")
    out.print(table)
    modes = ", ".join(f"{m}: {n:,}" for m, n in stats["image_modes"].items())
    sizes = ", ".join(f"{s['size']} ({s['images']:,})" for s in stats["sizes"]["most_common"][:3])
    out.print(f"modes: {modes}; sizes: {sizes}; smallest {stats['sizes']['smallest']}, largest {stats['sizes']['largest']}")
    for note in stats["notes"]:
        out.print(f"[dim]note: {note}[/]", highlight=False)
    problems = stats["problems"]
    if not problems["total"]:
        out.print("[green]no problems found[/]")
        return
    table = Table("problem", "file", "detail", "action", title=f"{problems['total']:,} problems", title_justify="left")
    for p in problems["list"][:limit]:
        table.add_row(p["kind"], p["file"], p["detail"], p["action"])
    out.print(table)
    if problems["total"] > limit:
        out.print(f"... {problems['total'] - limit:,} more; --json lists them all")
    out.print("by kind: " + ", ".join(f"{k} {n:,}" for k, n in problems["by_kind"].items()))


@data_app.command("validate", epilog=EXIT_CODES)
@friendly
def data_validate(
    path: DataPath,
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    image_col: ImageColOpt = None,
    label_col: LabelColOpt = None,
    group_col: GroupColOpt = None,
    class_names: ClassNamesOpt = None,
    min_per_class: MinOpt = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when any problem is found.")] = False,
) -> None:
    """Decode every image and report classes, groups, image modes/sizes and every problem, by file.

    Bad files are skipped and listed; --strict makes any problem an error (exit code 1).
    """
    cfg = _config(config, manifest=manifest, image_col=image_col, label_col=label_col, group_col=group_col,
                  class_names=class_names, min_per_class=min_per_class, workers=workers)
    stats = _validate(path, cfg).to_dict()
    if as_json:
        typer.echo(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        _print_validation(stats)
    if strict and stats["problems"]["total"]:
        err.print(f"[bold red]strict:[/] {stats['problems']['total']} problems found", highlight=False)
        raise typer.Exit(1)


@data_app.command("split", epilog=EXIT_CODES)
@friendly
def data_split(
    path: DataPath,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the split CSV (image, label, group, split).")],
    split_file: Annotated[
        Path | None, typer.Option("--split-file", help="Previous split to extend: old images keep their split.")
    ] = None,
    fractions: Annotated[str | None, typer.Option("--fractions", help="train,valid,test [default: 0.7,0.15,0.15]")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed. [default: 42]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    image_col: ImageColOpt = None,
    label_col: LabelColOpt = None,
    group_col: GroupColOpt = None,
    class_names: ClassNamesOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Split into train/valid/test, stratified by label and grouped by lesion/patient (no group on two sides)."""
    from dermaclass.data import assign_split, make_split, read_split, write_split

    cfg = _config(config, manifest=manifest, image_col=image_col, label_col=label_col, group_col=group_col,
                  class_names=class_names, workers=workers, split_fractions=fractions, seed=seed, split_file=split_file)
    reuse = Path(cfg.split_file) if cfg.split_file else None
    if out_file.exists() and not force and (reuse is None or reuse.resolve() != out_file.resolve()):
        raise FileExistsError(f"{out_file}: already exists; a split defines the test set")
    validation = _validate(path, cfg)
    if reuse is not None:
        split, counts = assign_split(validation.items, read_split(reuse), fractions=cfg.split_fractions, seed=cfg.seed)
        out.print("reused " + str(reuse) + ": " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), highlight=False)
    else:
        split = make_split(validation.items, fractions=cfg.split_fractions, seed=cfg.seed)
    write_split(split, out_file)
    table = Table("label", "train", "valid", "test", title=f"{out_file}", title_justify="left")
    counts = split.groupby(["label", "split"]).size().unstack(fill_value=0)
    for label, row in counts.iterrows():
        table.add_row(str(label), *(f"{int(row.get(s, 0)):,}" for s in ("train", "valid", "test")))
    totals = split["split"].value_counts()
    table.add_row("[bold]total[/]", *(f"{int(totals.get(s, 0)):,}" for s in ("train", "valid", "test")))
    out.print(table)
    crossing = int((split.groupby("group")["split"].nunique() > 1).sum())
    out.print(f"groups in more than one split: {crossing}", highlight=False)


@data_app.command("card", epilog=EXIT_CODES)
@friendly
def data_card(
    path: DataPath,
    split_file: Annotated[Path | None, typer.Option("--split-file", help="Add per-split counts from this split.")] = None,
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    image_col: ImageColOpt = None,
    label_col: LabelColOpt = None,
    group_col: GroupColOpt = None,
    class_names: ClassNamesOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Print the statistics section of a data card in Markdown (see data_cards/TEMPLATE.md)."""
    from dermaclass.data import read_split, render_card

    cfg = _config(config, manifest=manifest, image_col=image_col, label_col=label_col, group_col=group_col,
                  class_names=class_names, workers=workers)
    stats = _validate(path, cfg).to_dict()
    split_counts = None
    if split_file is not None:
        split = read_split(split_file)
        split_counts = {
            s: {**split[split["split"] == s]["label"].value_counts().to_dict(), "total": int((split["split"] == s).sum())}
            for s in ("train", "valid", "test")
        }
    typer.echo(render_card(stats, split_counts=split_counts), nl=False)


# ---- training ---------------------------------------------------------------------------
Opt = typer.Option


@app.command("train", epilog=EXIT_CODES)
@friendly
def train_cmd(
    data: Annotated[list[Path], typer.Argument(help="One or more datasets (the first keeps its image ids; e.g. an export plus review/).")],
    out_dir: Annotated[Path, Opt("--out", help="Run folder: config, split, history, plots and the model bundle.")],
    config: ConfigOpt = None,
    recipe: Annotated[str | None, Opt("--recipe", help="baseline | sgdr | stepwise [default: stepwise]")] = None,
    arch: Annotated[str | None, Opt("--arch", help="Any timm architecture [default: tf_efficientnet_lite0]")] = None,
    weights: Annotated[Path | None, Opt("--weights", help="Local body weights (.safetensors / .pth state dict).")] = None,
    init_bundle: Annotated[Path | None, Opt("--from", help="Start from this model bundle (its classes kept, new ones added).")] = None,
    pretrained: Annotated[bool | None, Opt("--pretrained/--no-pretrained", help="ImageNet weights [default: on]")] = None,
    image_size: Annotated[str | None, Opt("--image-size", help="width,height [default: 128,96]")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size", help="b (stepwise: b, 2b, 3b, 4b, b) [default: 32]")] = None,
    lr: Annotated[float | None, Opt("--lr", help="Fixed base LR [default: LR range test per stage]")] = None,
    lr_suggestion: Annotated[str | None, Opt("--lr-suggestion", help="valley | slide | minimum | steep")] = None,
    warm_epoch: Annotated[bool | None, Opt("--warm-epoch/--no-warm-epoch", help="Seed 002: 1 epoch at a small LR before each range test")] = None,
    head_epochs: Annotated[int | None, Opt("--head-epochs", help="Coarse head-only epochs [default: 1]")] = None,
    epochs: Annotated[int | None, Opt("--epochs", help="baseline: unfrozen epochs [default: 3]")] = None,
    n_cycles: Annotated[int | None, Opt("--n-cycles", help="SGDR cycles [default: 3]")] = None,
    cycle_len: Annotated[int | None, Opt("--cycle-len", help="SGDR first cycle length [default: 1]")] = None,
    cycle_mult: Annotated[int | None, Opt("--cycle-mult", help="SGDR cycle-length multiplier, >= 2 [default: 2]")] = None,
    lr_ratio: Annotated[float | None, Opt("--lr-ratio", help="Differential LRs slice(lr/ratio, lr) [default: 100]")] = None,
    stage_fractions: Annotated[str | None, Opt("--stage-fractions", help="[default: 0.2,0.4,0.6,0.8,1.0]")] = None,
    lr_rule: Annotated[str | None, Opt("--lr-rule", help="eq9 | constant | linear [default: linear]")] = None,
    weight_sharing: Annotated[bool | None, Opt("--weight-sharing/--no-weight-sharing", help="Carry weights between stages")] = None,
    imbalance: Annotated[str | None, Opt("--imbalance", help="none | weights | sqrt-weights | sampler | focal [default: sampler]")] = None,
    augment: Annotated[str | None, Opt("--augment", help="none | basic | augmix [default: basic]")] = None,
    early_stop_patience: Annotated[int | None, Opt("--early-stop-patience", help="0 = off")] = None,
    operating_classes: Annotated[str | None, Opt("--operating-classes", help="Classes that get a sensitivity threshold [default: mel]")] = None,
    target_sensitivity: Annotated[float | None, Opt("--target-sensitivity", help="Validation sensitivity of the threshold [default: 0.9]")] = None,
    split_file: Annotated[Path | None, Opt("--split-file", help="Reuse this split (new images are added).")] = None,
    seed: Annotated[int | None, Opt("--seed")] = None,
    threads: Annotated[int | None, Opt("--threads", help="torch threads (0 = all cores)")] = None,
    force: Annotated[bool, Opt("--force", help="Replace an existing run folder / bundle.")] = False,
    resume: Annotated[bool, Opt("--resume", help="Continue the interrupted run in --out (its config and split).")] = False,
    manifest: ManifestOpt = None,
    image_col: ImageColOpt = None,
    label_col: LabelColOpt = None,
    group_col: GroupColOpt = None,
    class_names: ClassNamesOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Train a model bundle on a clinic's image folder (default recipe: stepwise, seed 001)."""
    from dermaclass import train as training

    cfg = _config(config, recipe=recipe, arch=arch, weights=weights, init_bundle=init_bundle, pretrained=pretrained, image_size=image_size,
                  batch_size=batch_size, lr=lr, lr_suggestion=lr_suggestion, warm_epoch=warm_epoch,
                  head_epochs=head_epochs, epochs=epochs, n_cycles=n_cycles, cycle_len=cycle_len, cycle_mult=cycle_mult,
                  lr_ratio=lr_ratio, stage_fractions=stage_fractions, lr_rule=lr_rule, weight_sharing=weight_sharing,
                  imbalance=imbalance, augment=augment, early_stop_patience=early_stop_patience, split_file=split_file,
                  operating_classes=operating_classes, target_sensitivity=target_sensitivity,
                  seed=seed, threads=threads, manifest=manifest, image_col=image_col, label_col=label_col,
                  group_col=group_col, class_names=class_names, workers=workers)
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
    from dataclasses import fields

    from dermaclass import train as training
    from dermaclass.evaluate.run import evaluate_bundle
    from dermaclass.models import read_bundle_meta
    from dermaclass.report import compare_reports, write_compare, write_report

    parent = read_bundle_meta(bundle)
    split_file = bundle / "split.csv"
    if not split_file.is_file():
        from dermaclass.errors import DataError

        raise DataError(f"{bundle}: no split.csv beside the bundle; retrain needs the parent's split to keep its test set")
    known = {f.name for f in fields(Config)}
    inherited = {k: v for k, v in (parent.get("config") or {}).items() if k in known}
    cfg = load_config(**{**inherited, "init_bundle": str(bundle), "split_file": str(split_file)})
    cfg = training.inherit_bundle(cfg)
    logging.getLogger("dermaclass").setLevel(logging.INFO)
    training.check_run_dir(out_dir, force=force)
    progress, update = _progress("decoding")
    with progress:
        prepared = training.prepare_data(cfg, data, progress=update)
    reuse = prepared.split_reuse
    out.print(f"split reused from {split_file}: {reuse.get('kept', 0):,} images kept their split, "
              f"{reuse.get('followed', 0):,} joined their lesion's split, {reuse.get('assigned', 0):,} new assigned",
              highlight=False)
    _print_plan(cfg, len(prepared.train_rows))
    result = training.train(cfg, prepared, out_dir, force=force)
    training.write_summary(result)
    new_classes = [c for c in prepared.vocab if c not in parent["classes"]]
    if new_classes:
        out.print(f"classes added: {', '.join(new_classes)}", highlight=False)
    write_report(evaluate_bundle(out_dir, data, cfg=cfg, n_boot=n_boot), out_dir / "report", force=force)
    cmp_dir = out_dir / "compare"
    for name, model in (("parent", bundle), ("new", out_dir)):
        ev = evaluate_bundle(model, data, split="test", split_file=split_file, cfg=cfg, n_boot=n_boot)
        write_report(ev, cmp_dir / name, force=force)
    comparison = compare_reports(cmp_dir / "parent", cmp_dir / "new", n_boot=n_boot)
    write_compare(comparison, cmp_dir, force=force)
    o = comparison["overall"]["balanced_accuracy"]
    out.print(f"on the parent's test split ({comparison['new']['data']['n']:,} images): balanced accuracy "
              f"{o['old']:.4f} -> {o['new']:.4f} ({o['delta']:+.4f}); comparison: {cmp_dir / 'compare.html'}",
              highlight=False)
    if comparison["sensitivity_drops"]:
        err.print(f"[bold red]SENSITIVITY DROP[/] in {', '.join(comparison['sensitivity_drops'])}: review before "
                  "replacing the model in use.", highlight=False)
        raise typer.Exit(6)


def _rank() -> int:
    from fastai.torch_core import rank_distrib

    return rank_distrib()


@contextlib.contextmanager
def _main_first():
    """Under ``accelerate launch``: rank 0 validates and fills the decode cache first, the others then read it."""
    from fastai.torch_core import num_distrib

    if num_distrib() > 1:
        import torch
        from accelerate import PartialState

        with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
            yield
    else:
        yield


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
def lr_find_cmd(
    data: DataPath,
    out_dir: Annotated[Path, Opt("--out", help="Folder for the plot and lr_find.json.")],
    config: ConfigOpt = None,
    arch: Annotated[str | None, Opt("--arch")] = None,
    batch_size: Annotated[int | None, Opt("--batch-size")] = None,
    warm_epoch: Annotated[bool | None, Opt("--warm-epoch/--no-warm-epoch", help="Seed 002: 1 epoch at --warm-lr first")] = None,
    warm_lr: Annotated[float | None, Opt("--warm-lr")] = None,
    unfrozen: Annotated[bool, Opt("--unfrozen", help="Range-test the whole net, not the head alone.")] = False,
    iters: Annotated[int | None, Opt("--iters", help="Batches in the range test [default: 60]")] = None,
    image_size: Annotated[str | None, Opt("--image-size")] = None,
    split_file: Annotated[Path | None, Opt("--split-file")] = None,
    manifest: ManifestOpt = None,
    class_names: ClassNamesOpt = None,
) -> None:
    """LR range test (fastai lr_find): all four suggestions, the plot, and the chosen one."""
    from dermaclass import train as training
    from dermaclass.fileio import write_json
    from dermaclass.lr_find import range_test

    cfg = _config(config, arch=arch, batch_size=batch_size, warm_epoch=warm_epoch, warm_lr=warm_lr,
                  lr_find_iters=iters, image_size=image_size, split_file=split_file, manifest=manifest,
                  class_names=class_names)
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


@app.command("evaluate", epilog=EXIT_CODES)
@friendly
def evaluate_cmd(
    model: Annotated[Path, typer.Argument(help="Model bundle folder (model.safetensors + model.json).")],
    data: DataPath,
    out_dir: Annotated[Path, Opt("--out", help="Folder for predictions.csv, report.json, report.html, PNGs.")],
    split: Annotated[str, Opt("--split", help="test | valid | train | all")] = "test",
    split_file: Annotated[Path | None, Opt("--split-file", help="[default: the split.csv beside the bundle]")] = None,
    n_boot: Annotated[int, Opt("--n-boot", help="Bootstrap resamples for the intervals.")] = 1000,
    thumbnails: Annotated[bool, Opt("--thumbnails/--no-thumbnails", help="Embed thumbnails of the most confident "
                                    "errors (--no-thumbnails for a report published without the dataset's images)")] = True,
    seed: Annotated[int, Opt("--seed")] = 0,
    force: Annotated[bool, Opt("--force", help="Replace an existing report.")] = False,
    config: ConfigOpt = None,
    manifest: ManifestOpt = None,
    image_col: ImageColOpt = None,
    label_col: LabelColOpt = None,
    group_col: GroupColOpt = None,
    class_names: ClassNamesOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Evaluate a model bundle on a labelled split: predictions, figures with intervals, HTML report."""
    from dermaclass.evaluate.run import evaluate_bundle
    from dermaclass.report import REPORT_FILES, write_report

    if split not in ("test", "valid", "train", "all"):
        raise typer.BadParameter(f"--split must be test, valid, train or all, not {split!r}")
    cfg = _config(config, manifest=manifest, image_col=image_col, label_col=label_col, group_col=group_col,
                  class_names=class_names, workers=workers)
    if not force and any((out_dir / f).exists() for f in REPORT_FILES):
        raise FileExistsError(f"{out_dir}: a report is already there")
    progress, update = _progress("decoding")
    with progress:
        ev = evaluate_bundle(model, data, split=split, split_file=split_file, cfg=cfg, n_boot=n_boot, seed=seed,
                             thumbnails=thumbnails, progress=update)
    write_report(ev, out_dir, force=force)
    r = ev.report
    iv = r["intervals"]["overall"]

    def ci(k: str) -> str:
        return f" [{iv[k][0]:.3f}, {iv[k][1]:.3f}]" if iv.get(k) else ""

    out.print(f"{r['data']['split']} split: {r['n']:,} images, {r['data']['groups']:,} groups", highlight=False)
    out.print(f"[bold]balanced accuracy {r['balanced_accuracy']:.4f}{ci('balanced_accuracy')}[/]; macro-F1 "
              f"{r['macro_f1']:.4f}{ci('macro_f1')}; macro AUROC {r['macro_auroc'] or float('nan'):.4f}; "
              f"accuracy {r['accuracy']:.4f}", highlight=False)
    table = Table("class", "support", "sensitivity", "specificity", "AUROC")
    for c in r["classes"]:
        m = r["per_class"][c]
        table.add_row(c, str(m["support"]), *(f"{m[k]:.3f}" if m[k] is not None else "n/c"
                                             for k in ("sensitivity", "specificity", "auroc")))
    out.print(table)
    for c, op in r["operating_points"].items():
        out.print(f"operating point {c}: P >= {op['threshold']:.4f} -> sensitivity {op['sensitivity'] or 0:.3f}, "
                  f"specificity {op['specificity'] or 0:.3f} (target {op['target_sensitivity']:.2f} on valid)",
                  highlight=False)
    out.print(f"report: {out_dir / 'report.html'}", highlight=False)


@report_app.command("compare", epilog=EXIT_CODES)
@friendly
def report_compare(
    old: Annotated[Path, typer.Argument(help="The evaluate output folder of the model in use.")],
    new: Annotated[Path, typer.Argument(help="The evaluate output folder of the candidate model.")],
    out_dir: Annotated[Path, Opt("--out", help="Folder for compare.json, compare.html and the difference PNG.")],
    n_boot: Annotated[int, Opt("--n-boot")] = 1000,
    seed: Annotated[int, Opt("--seed")] = 0,
    force: Annotated[bool, Opt("--force", help="Compare reports on different test sets / replace outputs.")] = False,
) -> None:
    """What a retraining changed: deltas with paired intervals; exit 6 when a sensitivity drops."""
    from dermaclass.report import compare_reports, write_compare

    result = compare_reports(old, new, force=force, n_boot=n_boot, seed=seed)
    write_compare(result, out_dir, force=force)
    table = Table("figure", "old", "new", "delta", "interval")
    for k, v in result["overall"].items():
        iv = v["delta_interval"]
        table.add_row(k, *(f"{v[x]:.4f}" if v[x] is not None else "n/c" for x in ("old", "new")),
                      f"{v['delta']:+.4f}" if v["delta"] is not None else "n/c",
                      f"[{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else "")
    out.print(table)
    for c, v in result["per_class"].items():
        s = v["sensitivity"]
        if s["delta"] is not None:
            mark = "  [bold red]DROP[/]" if v["sensitivity_drop"] else ""
            out.print(f"{c:6} sensitivity {s['old']:.3f} -> {s['new']:.3f} ({s['delta']:+.3f}){mark}", highlight=False)
    out.print(f"comparison: {out_dir / 'compare.html'}", highlight=False)
    if result["sensitivity_drops"]:
        err.print(f"[bold red]SENSITIVITY DROP[/] in {', '.join(result['sensitivity_drops'])}: the new model misses more "
                  "of these lesions than resampling explains; review before replacing the old model.", highlight=False)
        raise typer.Exit(6)


@report_app.command("card", epilog=EXIT_CODES)
@friendly
def report_card(
    model: Annotated[Path, typer.Argument(help="Model bundle folder.")],
    report: Annotated[Path | None, Opt("--report", help="Its test-split evaluate folder [default: BUNDLE/report]")] = None,
    name: Annotated[str | None, Opt("--name", help="Model name [default: the folder name]")] = None,
    data_card: Annotated[str | None, Opt("--data-card", help="Path of the data card to cite.")] = None,
    force: Annotated[bool, Opt("--force")] = False,
) -> None:
    """Write BUNDLE/MODEL_CARD.md from model.json and the test report."""
    from dermaclass.fileio import write_text
    from dermaclass.models import read_bundle_meta
    from dermaclass.report import model_card_markdown

    meta = read_bundle_meta(model)
    folder = report or model / "report"
    rep = json.loads((folder / "report.json").read_text(encoding="utf-8")) if (folder / "report.json").is_file() else None
    if rep is None:
        err.print(f"no report at {folder}: the card will have no test figures", highlight=False)
    target = model / "MODEL_CARD.md"
    if target.exists() and not force:
        raise FileExistsError(f"{target}: a model card is already there")
    write_text(target, model_card_markdown(meta, rep, name=name or model.name, data_card=data_card))
    out.print(f"wrote {target}", highlight=False)


def _default_bundle(model: Path | None) -> Path:
    from dermaclass.ui import DEFAULT_BUNDLE

    path = model or DEFAULT_BUNDLE
    if not (path / "model.json").is_file():
        from dermaclass.models import ModelError

        raise ModelError(f"{path}: no model bundle here" + ("" if model else " (the bundled default model); pass --model BUNDLE"))
    return path


@app.command("predict", epilog=EXIT_CODES)
@friendly
def predict_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Annotated[Path | None, Opt("--model", help="Model bundle [default: the bundled model]")] = None,
    top_k: Annotated[int, Opt("--top-k")] = 3,
    tta: Annotated[bool, Opt("--tta", help="Average over flips.")] = False,
    as_json: Annotated[bool, Opt("--json", help="One JSON object per image.")] = False,
) -> None:
    """Predict images: calibrated probabilities, operating-point flags, and referral."""
    from dermaclass.data.images import ImageDecodeError
    from dermaclass.inference import Predictor

    pred = Predictor.from_bundle(_default_bundle(model))
    failed = 0
    for path in images:
        try:
            r = pred.predict(path, top_k=top_k, tta=tta)
        except ImageDecodeError as exc:
            failed += 1
            err.print(f"[bold red]error:[/] {exc.detail}", highlight=False)
            continue
        if as_json:
            out.print_json(json.dumps({"image": str(path), **r}))
            continue
        tops = ", ".join(f"{t['name']} ({t['class']}) {t['probability']:.1%}" for t in r["top_k"])
        flags = "".join(f"  [{c} flagged]" for c, f in r["flags"].items() if f["flagged"])
        refer = f"  [bold yellow]{r['referral']['message']}[/]: {'; '.join(r['referral']['reasons'])}" if r["referral"]["refer"] else ""
        out.print(f"{path}: {tops}{flags}{refer}", highlight=False)
    if not as_json:
        out.print(f"[dim]{DISCLAIMER}[/]", highlight=False)
    if failed:
        raise typer.Exit(3)


@app.command("export", epilog=EXIT_CODES)
@friendly
def export_cmd(
    model: Annotated[Path, typer.Argument(help="Model bundle folder.")],
    onnx: Annotated[bool, Opt("--onnx", help="Write model.onnx beside the weights (checked against torch).")] = True,
    force: Annotated[bool, Opt("--force")] = False,
) -> None:
    """Export a bundle for onnxruntime; predictions then use it automatically."""
    from dermaclass.inference import export_onnx

    info = export_onnx(model, force=force)
    out.print(f"wrote {info['path']} (max |logit difference| vs torch {info['max_abs_diff']:.1e})", highlight=False)


@app.command("serve", epilog=EXIT_CODES)
@friendly
def serve_cmd(
    model: Annotated[Path | None, Opt("--model", help="Model bundle [default: the bundled model]")] = None,
    host: Annotated[str, Opt("--host", help="Interface; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, Opt("--port")] = 7860,
    review_dir: Annotated[Path, Opt("--review-dir", help="Where corrections are saved (CSV-manifest layout).")] = Path("review"),
) -> None:
    """Open the Gradio app (decision support, not a diagnostic device)."""
    from dermaclass.ui import launch

    launch(_default_bundle(model), host=host, port=port, review_dir=review_dir)


def main() -> None:
    """Console-script entry point."""
    app()

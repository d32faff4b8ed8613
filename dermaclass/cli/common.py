"""What every ``dermaclass`` command shares: the typer apps, the consoles, option types, the
config flags and their help, progress bars and the error handling (``friendly``).

The command modules (``data``, ``training``, ``reports``, ``serving``) import from here and
register themselves on ``app``; the package's ``__init__`` imports them. Only the CLI prints;
library modules log.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dermaclass import DISCLAIMER, __version__
from dermaclass.config import Config, load_config
from dermaclass.errors import DermaclassError, Exit, exit_codes_help

EXIT_CODES = exit_codes_help()  # every command's epilog, from errors.EXIT_CODES

app = typer.Typer(
    name="dermaclass",
    help=f"Dermoscopic skin-lesion classifier that a clinic retrains on its own data.\n\n{DISCLAIMER}",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help texts are plain text: "[default: ...]" must not be read as Rich markup and vanish.
    rich_markup_mode=None,
)
data_app = typer.Typer(
    help="Inspect, validate and split a clinic's image folder.",
    no_args_is_help=True,
    epilog=EXIT_CODES,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")
report_app = typer.Typer(
    help="Review and compare evaluation reports.", no_args_is_help=True, epilog=EXIT_CODES, rich_markup_mode=None
)
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
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except FileExistsError as exc:
            err.print(
                f"[bold red]error:[/] {escape(str(exc))} (pass --force to replace it)", highlight=False, soft_wrap=True
            )
            raise typer.Exit(Exit.USAGE) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"dermaclass {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-v info, -vv debug).")
    ] = 0,
) -> None:
    """Dermoscopic skin-lesion classifier (decision support, not a diagnostic device)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---- shared options ------------------------------------------------------------------
DataPath = Annotated[
    Path, typer.Argument(help="Dataset folder: one folder per class, or a CSV manifest beside the images.")
]
BundlePath = Annotated[Path, typer.Argument(help="Model bundle folder (model.safetensors + model.json).")]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto | torch | onnx | openvino | openvino-bf16 | "
        "openvino-int8: what runs the network (auto: the fastest float export the "
        "bundle has; bf16 and int8 only when asked, after `export --bf16/--int8`)",
    ),
]
BundleSplitOpt = Annotated[Path | None, typer.Option("--split-file", help="[default: the split.csv beside the bundle]")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of settings; flags override it.")]
ManifestOpt = Annotated[
    Path | None, typer.Option("--manifest", help="CSV manifest (default: the one CSV at the root).")
]
ImageColOpt = Annotated[str | None, typer.Option("--image-col", help="Manifest column with image ids or paths.")]
LabelColOpt = Annotated[str | None, typer.Option("--label-col", help="Manifest column with labels.")]
GroupColOpt = Annotated[str | None, typer.Option("--group-col", help="Manifest column with lesion/patient ids.")]
ClassNamesOpt = Annotated[
    Path | None, typer.Option("--class-names", help="Your class list: JSON/YAML mapping code->name, or CSV code,name.")
]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Decoding processes (0 = all cores).")]


def _config(config: Path | None, **flags: Any) -> Config:
    return load_config(config, **{k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()})


# The options every command that reads a dataset takes, declared once (they were repeated in
# six commands and had drifted: lr-find lacked three of them).
DATA_OPTIONS: dict[str, Any] = {
    "config": ConfigOpt,
    "manifest": ManifestOpt,
    "image_col": ImageColOpt,
    "label_col": LabelColOpt,
    "group_col": GroupColOpt,
    "class_names": ClassNamesOpt,
    "workers": WorkersOpt,
}


class DataOptions(dict):
    """The shared dataset options a command received (``config`` and the data-layer flags)."""

    def config(self, **flags: Any) -> Config:
        """The resolved configuration: defaults < --config YAML < these data flags and ``flags``."""
        given = {k: v for k, v in self.items() if k != "config"}
        return _config(self.get("config"), **{**given, **flags})


# The Config fields that commands take as flags: only the help text is written here. The type,
# the choices and the default come from Config itself, so a default lives in one place and
# `--help` shows the one in force (help strings that repeated them had drifted).
FLAG_HELP: dict[str, str] = {
    "recipe": "Training recipe",
    "arch": "Any timm architecture; tf_efficientnet_lite0/1/2 have offline ImageNet weights",
    "weights": "Local body weights (.safetensors / .pth state dict)",
    "init_bundle": "Start from this model bundle (its classes kept, new ones added)",
    "pretrained": "ImageNet weights",
    "image_size": "Network input width,height",
    "batch_size": "b (stepwise: b, 2b, 3b, 4b, b)",
    "lr": "Fixed base LR",
    "lr_suggestion": "With --lr-find: which range-test suggestion picks the LR",
    "lr_find_iters": "Batches in each range test",
    "warm_epoch": "With --lr-find: one epoch at --warm-lr before each range test (seed 002)",
    "warm_lr": "LR of the warm epoch",
    "head_epochs": "Coarse head-only epochs",
    "epochs": "baseline: unfrozen one-cycle epochs",
    "n_cycles": "SGDR cycles",
    "cycle_len": "SGDR first cycle length in epochs",
    "cycle_mult": "SGDR cycle-length multiplier, >= 2",
    "lr_ratio": "Differential LRs slice(lr/ratio, lr)",
    "wd": "Weight decay (fastai's AdamW, decoupled)",
    "stage_fractions": "Stepwise: the nested share of the training images each stage trains on",
    "stage_sizes": "Progressive resizing: one WIDTHxHEIGHT per stepwise stage, the last = --image-size "
    "(e.g. 96x72,112x84,128x96,128x96,128x96); none = every stage at --image-size",
    "lr_rule": "LR per stepwise stage",
    "weight_sharing": "Carry weights between stepwise stages",
    "imbalance": "How the class imbalance is handled",
    "augment": "Training augmentation",
    "colour_constancy": "Colour normalisation, the same at training and inference",
    "tta": "The test-time augmentation the bundle serves with (calibrated with it)",
    "label_smoothing": "Cross-entropy label smoothing, 0 = off",
    "keep": "best (best validation balanced accuracy) or last (end of training) weights",
    "head_norm_floor": "Floor on the running variance of the head's batch norms (a unit almost never on in training "
    "cannot blow up the logits); 0 = off (the default 0.1 changed no full-budget network's accuracy)",
    "ema_decay": "Keep an exponential moving average of the weights (e.g. 0.998) and bundle it; 0 = off",
    "average_cycles": "Bundle the average of the weights at the last N SGDR cycle ends (SWA; batch-norm statistics "
    "recomputed); 0 = off",
    "histo_weight": "Sampling weight of histopathology-confirmed images (dx_type histo) against the rest; 1 = off",
    "mix": "Batch mixing: fastai's MixUp or CutMix callback",
    "mix_alpha": "Beta(alpha, alpha) of --mix; none = fastai's default (MixUp 0.4, CutMix 1.0)",
    "sam_rho": "Sharpness-aware minimisation radius (seed 002 uses 0.05; about 2x the time); 0 = off",
    "precision": "bfloat16 autocast is faster only on CPUs with native bfloat16",
    "early_stop_patience": "Epochs without balanced-accuracy gain before stopping; 0 = off",
    "operating_classes": "Classes that get a sensitivity threshold",
    "target_sensitivity": "Validation sensitivity of the threshold",
    "prior_class": "The class whose sensitivity the prior shift sets",
    "prior_sensitivity": "Prior shift (logit adjustment towards the train prior, tau fitted on valid): the validation "
    "sensitivity --prior-class must reach; 0 = off",
    "ood": "The out-of-distribution score that refers images unlike the training data",
    "members": "Train a deep ensemble of this many cross-fitted networks (member k holds out fold k of the "
    "train+valid pool); 1 = one network",
    "member_archs": "Per-member ARCH@WxH or @WxH, cycled (e.g. tf_efficientnet_lite0@128x96,"
    "tf_efficientnet_lite1@160x120); none = every member --arch at --image-size",
    "ensemble_calibration": "What an ensemble's calibration is fitted on: its members' out-of-fold predictions "
    "over the train+valid pool, or the valid split held out from every member",
    "ensemble_combine": "How an ensemble's networks are combined: the mean of their logits (the default), the "
    "mean of their probabilities each calibrated by the ensemble's calibration (better for short-budget members; "
    "one network's extreme logits weigh at most 1/K), or the mean of their raw probabilities, then calibrated",
    "distill_from": "Distil this ensemble bundle into one network: soft targets from its out-of-fold predictions "
    "(train it on the same split with --ensemble-calibration valid, so that it never saw the valid split)",
    "distill_alpha": "Weight of the teacher's soft targets in the loss (distillation)",
    "distill_temperature": "Temperature that softens teacher and student (distillation)",
    "split_file": "Reuse this split (new images are added)",
    "split_fractions": "train,valid,test shares",
    "min_per_class": "Report classes with fewer images",
    "ood_keep": "Share of the valid split the out-of-distribution cut-off passes",
    "seed": "Seed of the split and the training",
    "threads": "torch threads (0 = all cores)",
}
FLAG_DECLS = {
    "init_bundle": "--from",
    "lr_find_iters": "--iters",
    "split_fractions": "--fractions",
    "ood_keep": "--keep",
}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def config_flag(name: str) -> Any:
    """The typer option of Config field ``name``: its type, choices and default read from Config."""
    import types
    import typing

    hint = typing.get_type_hints(Config)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    base = args[0]
    flag = FLAG_DECLS.get(name, "--" + name.replace("_", "-"))
    choices = typing.get_args(base) if typing.get_origin(base) is Literal else ()
    if base is bool:
        kind: Any = bool | None
        flag = f"{flag}/--no-{flag[2:]}"
    elif base in (int, float):
        kind = base | None
    else:  # strings, choices, and tuples written as comma-separated text (config._coerce parses them)
        kind = str | None
    text = FLAG_HELP[name] + (f": {' | '.join(choices)}" if choices else "")
    return Annotated[kind, typer.Option(flag, help=f"{text} [default: {_shown(getattr(Config(), name))}]")]


def data_options(*args: Any) -> Any:
    """Add the shared dataset options (``DATA_OPTIONS``), and the flags of the Config fields
    named, to a command's signature as typer reads it, and hand them all to the command as one
    ``data_opts: DataOptions`` argument (``data_opts.config(**more)`` resolves the layers).

    ``@data_options`` alone, or ``@data_options("recipe", "lr", ...)``.
    """
    if len(args) == 1 and callable(args[0]):
        return _with_options(args[0], ())
    return lambda fn: _with_options(fn, args)


def _with_options(fn: Callable[..., Any], config_fields: tuple[str, ...]) -> Callable[..., Any]:
    import inspect

    sig = inspect.signature(fn, eval_str=True)  # typer reads a given __signature__ as it is: no strings
    own = [p for p in sig.parameters.values() if p.name != "data_opts"]
    options = {**DATA_OPTIONS, **{name: config_flag(name) for name in config_fields}}
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=None)
        for name, kind in options.items()
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opts = DataOptions({name: kwargs.pop(name, None) for name in options})
        return fn(*args, data_opts=opts, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return wrapper


def progress_bar(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def validate_path(path: Path, cfg: Config):
    from dermaclass.data import validate_source

    progress, update = progress_bar("decoding")
    with progress:
        return validate_source(path, progress=update, **cfg.source_settings())


def print_validation(stats: dict[str, Any], *, limit: int = 40) -> None:
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
    out.print(
        f"modes: {modes}; sizes: {sizes}; smallest {stats['sizes']['smallest']}, largest {stats['sizes']['largest']}"
    )
    for note in stats["notes"]:
        out.print(f"[dim]note: {note}[/]", highlight=False)
    problems = stats["problems"]
    if not problems["total"]:
        out.print("[green]no problems found[/]")
        return
    if out.is_terminal:
        table = Table(
            "problem", "file", "detail", "action", title=f"{problems['total']:,} problems", title_justify="left"
        )
        for p in problems["list"][:limit]:
            table.add_row(escape(p["kind"]), escape(p["file"]), escape(p["detail"]), escape(p["action"]))
        out.print(table)
    else:  # piped or redirected: one tab-separated line per problem, never cut to a terminal's width
        out.print(f"{problems['total']:,} problems (problem, file, detail, action):", highlight=False)
        for p in problems["list"][:limit]:
            out.print(
                "\t".join((p["kind"], p["file"], p["detail"], p["action"])),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    if problems["total"] > limit:
        out.print(f"... {problems['total'] - limit:,} more; --json lists them all")
    out.print("by kind: " + ", ".join(f"{k} {n:,}" for k, n in problems["by_kind"].items()))


Opt = typer.Option


def rank() -> int:
    from fastai.torch_core import rank_distrib

    return rank_distrib()


@contextlib.contextmanager
def main_first():
    """Under ``accelerate launch``: rank 0 validates and fills the decode cache first, the others then read it."""
    from fastai.torch_core import num_distrib

    if num_distrib() > 1:
        import torch
        from accelerate import PartialState

        with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
            yield
    else:
        yield


def default_bundle(model: Path | None) -> Path:
    from dermaclass.models import DEFAULT_BUNDLE

    path = model or DEFAULT_BUNDLE
    if not (path / "model.json").is_file():
        from dermaclass.models import ModelError

        raise ModelError(
            f"{path}: no model bundle here" + ("" if model else " (the bundled default model); pass --model BUNDLE")
        )
    return path

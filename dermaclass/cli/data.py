"""``dermaclass data validate|split|card``: the clinic data layer from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dermaclass.cli.common import (
    EXIT_CODES,
    DataOptions,
    DataPath,
    data_app,
    data_options,
    err,
    friendly,
    out,
    print_validation,
    validate_path,
)
from dermaclass.errors import Exit


@data_app.command("validate", epilog=EXIT_CODES)
@friendly
@data_options("min_per_class")
def data_validate(
    path: DataPath,
    data_opts: DataOptions = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 when any problem is found.")] = False,
) -> None:
    """Decode every image and report classes, groups, image modes/sizes and every problem, by file.

    Bad files are skipped and listed; --strict makes any problem an error (exit code 1).
    """
    cfg = data_opts.config()
    stats = validate_path(path, cfg).to_dict()
    if as_json:
        typer.echo(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print_validation(stats)
    if strict and stats["problems"]["total"]:
        err.print(f"[bold red]strict:[/] {stats['problems']['total']} problems found", highlight=False)
        raise typer.Exit(Exit.PROBLEMS_FOUND)


@data_app.command("split", epilog=EXIT_CODES)
@friendly
@data_options("split_fractions", "seed")
def data_split(
    path: DataPath,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the split CSV (image, label, group, split).")],
    split_file: Annotated[
        Path | None, typer.Option("--split-file", help="Previous split to extend: old images keep their split.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    data_opts: DataOptions = None,
) -> None:
    """Split into train/valid/test, stratified by label and grouped by lesion/patient (no group on two sides)."""
    from dermaclass.data import assign_split, make_split, read_split, write_split

    cfg = data_opts.config(split_file=split_file)
    reuse = Path(cfg.split_file) if cfg.split_file else None
    if out_file.exists() and not force and (reuse is None or reuse.resolve() != out_file.resolve()):
        raise FileExistsError(f"{out_file}: already exists; a split defines the test set")
    validation = validate_path(path, cfg)
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
    from dermaclass.data.splits import MIN_PER_CLASS, thin_classes

    for part, thin in thin_classes(split).items():
        err.print(
            f"[yellow]warning:[/] {part} has fewer than {MIN_PER_CLASS} images of "
            + ", ".join(f"{escape(c)} ({n})" for c, n in thin.items())
            + (
                "; their figures there will be too noisy to judge"
                if part != "train"
                else "; the model can hardly learn them"
            ),
            highlight=False,
        )
    crossing = int((split.groupby("group")["split"].nunique() > 1).sum())
    out.print(f"groups in more than one split: {crossing}", highlight=False)


@data_app.command("card", epilog=EXIT_CODES)
@friendly
@data_options
def data_card(
    path: DataPath,
    split_file: Annotated[
        Path | None, typer.Option("--split-file", help="Add per-split counts from this split.")
    ] = None,
    data_opts: DataOptions = None,
) -> None:
    """Print the statistics section of a data card in Markdown (see data_cards/TEMPLATE.md)."""
    from dermaclass.data import read_split, render_card

    cfg = data_opts.config()
    stats = validate_path(path, cfg).to_dict()
    split_counts = None
    if split_file is not None:
        split = read_split(split_file)
        split_counts = {
            s: {
                **split[split["split"] == s]["label"].value_counts().to_dict(),
                "total": int((split["split"] == s).sum()),
            }
            for s in ("train", "valid", "test")
        }
    typer.echo(render_card(stats, split_counts=split_counts), nl=False)

"""``dermaclass evaluate`` and ``report compare|card``: the reports people review."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dermaclass.cli.common import (
    EXIT_CODES,
    BundlePath,
    BundleSplitOpt,
    DataOptions,
    DataPath,
    Opt,
    app,
    data_options,
    err,
    friendly,
    out,
    progress_bar,
    report_app,
)
from dermaclass.errors import Exit


@app.command("evaluate", epilog=EXIT_CODES)
@friendly
@data_options
def evaluate_cmd(
    model: BundlePath,
    data: DataPath,
    out_dir: Annotated[Path, Opt("--out", help="Folder for predictions.csv, report.json, report.html, PNGs.")],
    split: Annotated[str, Opt("--split", help="test | valid | train | all")] = "test",
    split_file: BundleSplitOpt = None,
    n_boot: Annotated[int, Opt("--n-boot", help="Bootstrap resamples for the intervals.")] = 1000,
    thumbnails: Annotated[
        bool,
        Opt(
            "--thumbnails/--no-thumbnails",
            help="Embed thumbnails of the most confident "
            "errors (--no-thumbnails for a report published without the dataset's images)",
        ),
    ] = True,
    seed: Annotated[int, Opt("--seed")] = 0,
    external: Annotated[
        list[str] | None,
        Opt(
            "--external",
            help="NAME=FOLDER (repeatable): also evaluate every image of "
            "a labelled set from other clinics and report it beside this split",
        ),
    ] = None,
    tta: Annotated[
        bool | None,
        Opt(
            "--tta/--no-tta",
            help="Average the logits over the bundle's flips (four if it has none) [default: as the bundle records]",
        ),
    ] = None,
    force: Annotated[bool, Opt("--force", help="Replace an existing report.")] = False,
    data_opts: DataOptions = None,
) -> None:
    """Evaluate a model bundle on a labelled split: predictions, figures with intervals, HTML report."""
    from dermaclass.evaluate.run import evaluate_bundle
    from dermaclass.report import REPORT_FILES, write_report
    from dermaclass.report.figures import fmt, fmt_ci

    if split not in ("test", "valid", "train", "all"):
        raise typer.BadParameter(f"--split must be test, valid, train or all, not {split!r}")
    cfg = data_opts.config()
    if not force and any((out_dir / f).exists() for f in REPORT_FILES):
        raise FileExistsError(f"{out_dir}: a report is already there")
    from dermaclass.evaluate.external import evaluate_external, parse_sets

    sets = parse_sets(external or [])  # a missing folder fails before any work
    progress, update = progress_bar("decoding")
    with progress:
        ev = evaluate_bundle(
            model,
            data,
            split=split,
            split_file=split_file,
            cfg=cfg,
            n_boot=n_boot,
            seed=seed,
            thumbnails=thumbnails,
            tta=tta,
            progress=update,
        )
    if sets:
        ev.report = ev.report.with_(external=evaluate_external(model, sets, cfg=cfg, tta=tta, n_boot=n_boot, seed=seed))
    write_report(ev, out_dir, force=force)
    r = ev.report
    m, iv = r.metrics, r.overall_intervals
    out.print(f"{r.data['split']} split: {r.n:,} images, {r.data['groups']:,} groups", highlight=False)
    out.print(
        f"[bold]balanced accuracy {fmt_ci(m['balanced_accuracy'], iv.get('balanced_accuracy'), digits=4, iv_digits=3)}[/]; "
        f"macro-F1 {fmt_ci(m['macro_f1'], iv.get('macro_f1'), digits=4, iv_digits=3)}; macro AUROC "
        f"{fmt(m['macro_auroc'], digits=4)}; accuracy {fmt(m['accuracy'], digits=4)}",
        highlight=False,
    )
    table = Table("class", "support", "sensitivity", "specificity", "AUROC")
    for c in r.classes:
        pc = r.per_class[c]
        table.add_row(c, str(pc["support"]), *(fmt(pc[k]) for k in ("sensitivity", "specificity", "auroc")))
    out.print(table)
    for c, op in r.operating_points.items():
        out.print(
            f"operating point {c}: P >= {op['threshold']:.4f} -> sensitivity {op['sensitivity'] or 0:.3f}, "
            f"specificity {op['specificity'] or 0:.3f} (target {op['target_sensitivity']:.2f} on valid)",
            highlight=False,
        )
    for n, e in r.external.items():
        out.print(
            f"external {n}: {e['n']:,} images, balanced accuracy "
            f"{fmt_ci(e['balanced_accuracy'], (e.get('intervals') or {}).get('balanced_accuracy'), digits=4, iv_digits=3)}; "
            f"macro AUROC {fmt(e['macro_auroc'], digits=4)}",
            highlight=False,
        )
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
    from dermaclass.report import compare_reports, drop_alert, write_compare

    result = compare_reports(old, new, force=force, n_boot=n_boot, seed=seed)
    write_compare(result, out_dir, force=force)
    table = Table("figure", "old", "new", "delta", "interval")
    for k, v in result["overall"].items():
        iv = v["delta_interval"]
        table.add_row(
            k,
            *(f"{v[x]:.4f}" if v[x] is not None else "n/c" for x in ("old", "new")),
            f"{v['delta']:+.4f}" if v["delta"] is not None else "n/c",
            f"[{iv[0]:+.4f}, {iv[1]:+.4f}]" if iv else "",
        )
    out.print(table)
    for c, v in result["per_class"].items():
        s = v["sensitivity"]
        if s["delta"] is not None:
            mark = "  [bold red]DROP[/]" if v["sensitivity_drop"] else ""
            out.print(f"{c:6} sensitivity {s['old']:.3f} -> {s['new']:.3f} ({s['delta']:+.3f}){mark}", highlight=False)
    out.print(f"comparison: {out_dir / 'compare.html'}", highlight=False)
    alert = drop_alert(result)
    if alert:
        err.print(f"[bold red]{escape(alert)}[/]", highlight=False)
        raise typer.Exit(Exit.SENSITIVITY_DROP)


@report_app.command("card", epilog=EXIT_CODES)
@friendly
def report_card(
    model: BundlePath,
    report: Annotated[
        Path | None, Opt("--report", help="Its test-split evaluate folder [default: BUNDLE/report]")
    ] = None,
    name: Annotated[str | None, Opt("--name", help="Model name [default: the folder name]")] = None,
    data_card: Annotated[str | None, Opt("--data-card", help="Path of the data card to cite.")] = None,
    force: Annotated[bool, Opt("--force")] = False,
) -> None:
    """Write BUNDLE/MODEL_CARD.md from model.json and the test report."""
    from dermaclass.evaluate.record import read_report
    from dermaclass.fileio import write_text
    from dermaclass.models import read_bundle_meta
    from dermaclass.report import model_card_markdown

    meta = read_bundle_meta(model)
    folder = report or model / "report"
    rep = read_report(folder) if (folder / "report.json").is_file() else None
    if rep is None:
        err.print(f"no report at {folder}: the card will have no test figures", highlight=False)
    target = model / "MODEL_CARD.md"
    if target.exists() and not force:
        raise FileExistsError(f"{target}: a model card is already there")
    write_text(target, model_card_markdown(meta, rep, name=name or model.name, data_card=data_card))
    out.print(f"wrote {target}", highlight=False)

"""``dermaclass predict``, ``export`` and ``serve``: the model in use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from dermaclass import DISCLAIMER
from dermaclass.cli.common import (
    EXIT_CODES,
    BackendOpt,
    BundlePath,
    BundleSplitOpt,
    DataOptions,
    DataPath,
    Opt,
    app,
    data_options,
    default_bundle,
    err,
    friendly,
    out,
    progress_bar,
)
from dermaclass.errors import ConfigError, Exit


@app.command("predict", epilog=EXIT_CODES)
@friendly
def predict_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Annotated[Path | None, Opt("--model", help="Model bundle [default: the bundled model]")] = None,
    top_k: Annotated[int, Opt("--top-k")] = 3,
    tta: Annotated[
        bool | None, Opt("--tta/--no-tta", help="Average over flips [default: as the bundle records]")
    ] = None,
    as_json: Annotated[
        bool, Opt("--json", help='One JSON object per image (its "backend" says what served it).')
    ] = False,
    backend: BackendOpt = "auto",
) -> None:
    """Predict images: calibrated probabilities, operating-point flags, and referral."""
    from dermaclass.data.images import ImageDecodeError
    from dermaclass.serving.predictor import Predictor
    from dermaclass.serving.refer import InputProblem

    pred = Predictor(default_bundle(model), backend=backend)
    failed = 0
    for path in images:
        try:
            r = pred.predict(path, top_k=top_k, tta=tta)
        except ImageDecodeError as exc:
            failed += 1
            err.print(f"[bold red]error:[/] {escape(exc.detail)}", highlight=False)
            continue
        except InputProblem as exc:  # e.g. too small to judge: this image only, the others go on
            failed += 1
            err.print(f"[bold red]refused:[/] {escape(str(exc))}", highlight=False)
            continue
        if as_json:
            out.print_json(json.dumps({"image": str(path), **r}))
            continue
        # Every piece that can hold brackets is escaped: Rich would read "[mel flagged]" as markup and drop it.
        tops = ", ".join(f"{t['name']} ({t['class']}) {t['probability']:.1%}" for t in r["top_k"])
        flags = "".join(
            f"  [{c} flagged: P {f['probability']:.2f} >= {f['threshold']:.2f}]"
            for c, f in r["flags"].items()
            if f["flagged"]
        )
        refer = (
            f"  [bold yellow]{escape(r['referral']['message'])}[/]: {escape('; '.join(r['referral']['reasons']))}"
            if r["referral"]["refer"]
            else ""
        )
        agree = r.get("agreement") or {}
        split = (
            f"  [yellow]networks disagree: {escape(', '.join(agree['member_top']))}[/]"
            if r.get("networks", 1) > 1 and agree.get("disagree")
            else ""
        )
        out.print(
            f"{escape(str(path))}: {escape(tops)}[bold red]{escape(flags)}[/]{split}{refer}",
            highlight=False,
            soft_wrap=True,
        )
    if not as_json:
        out.print(
            f"[dim]answered by {_who(len(pred.networks))}, served by {pred.backend}"
            f"{f' with flip TTA ({pred.tta_mode})' if (pred.tta if tta is None else tta) else ''}. "
            f"{DISCLAIMER}[/]",
            highlight=False,
        )
    if failed:
        raise typer.Exit(Exit.DATA)


def _who(networks: int) -> str:
    return f"an ensemble of {networks} networks (their logits averaged)" if networks > 1 else "one network"


@app.command("export", epilog=EXIT_CODES)
@friendly
@data_options
def export_cmd(
    model: BundlePath,
    onnx: Annotated[
        bool | None,
        Opt(
            "--onnx/--no-onnx",
            help="Write model.onnx beside the weights (checked against "
            "torch) [default: on, unless --openvino or --int8 is given]",
        ),
    ] = None,
    openvino: Annotated[
        bool, Opt("--openvino", help="Write the OpenVINO IR model.xml + model.bin (float32, checked against torch).")
    ] = False,
    int8: Annotated[
        bool,
        Opt(
            "--int8",
            help="Write model-int8.xml: NNCF int8 quantisation calibrated on the train "
            "split of --calibration; refused when it loses more valid balanced accuracy against "
            "float than the limit the message states",
        ),
    ] = False,
    bf16: Annotated[
        bool,
        Opt(
            "--bf16",
            help="Check the OpenVINO IR at bfloat16 inference precision (CPUs with native "
            "bfloat16: about half the float32 latency) on the valid split of --calibration, and "
            "record it for --backend openvino-bf16 when it holds up (same limit as --int8)",
        ),
    ] = False,
    calibration: Annotated[
        Path | None, Opt("--calibration", help="The bundle's training data (with --int8 or --bf16).")
    ] = None,
    n_calibration: Annotated[
        int, Opt("--n-calibration", help="Training-split images that calibrate int8 (drawn class-balanced).")
    ] = 600,
    split_file: BundleSplitOpt = None,
    publish: Annotated[
        Path | None, Opt("--publish", help="Also copy the bundle here, fit to ship (see --float16).")
    ] = None,
    float16: Annotated[bool, Opt("--float16/--float32", help="Weights precision of the --publish copy.")] = True,
    force: Annotated[bool, Opt("--force")] = False,
    data_opts: DataOptions = None,
) -> None:
    """Export a bundle for onnxruntime or OpenVINO (predictions then use it), or publish a copy to ship."""
    from dermaclass.models import publish_bundle, read_bundle_meta

    if (int8 or bf16) and calibration is None:
        raise typer.BadParameter(
            f"{'--int8' if int8 else '--bf16'} needs --calibration DATA (the bundle's training data; "
            "its train split calibrates int8, its valid split checks)",
            param_hint="--calibration",
        )
    if onnx is None:
        onnx = not (openvino or int8 or bf16)
    if publish is not None:
        model = publish_bundle(model, publish, float16=float16, force=force)
        out.print(f"published {model} ({'float16' if float16 else 'float32'} weights, split ids only)", highlight=False)
    meta = read_bundle_meta(model)
    # An ensemble: every member is exported and checked on its own (an int8 member is checked
    # on its own held-out fold, the split.csv in its folder).
    for folder in meta.member_folders(model):
        if meta.is_ensemble:
            out.print(f"member {folder.relative_to(model)}:", highlight=False)
        _export_one(
            folder,
            onnx=onnx,
            openvino=openvino,
            int8=int8,
            bf16=bf16,
            calibration=calibration,
            n_calibration=n_calibration,
            split_file=None if meta.is_ensemble else split_file,
            force=force,
            cfg=data_opts.config(),
        )


def _export_one(
    model: Path,
    *,
    onnx: bool,
    openvino: bool,
    int8: bool,
    bf16: bool,
    calibration: Path | None,
    n_calibration: int,
    split_file: Path | None,
    force: bool,
    cfg,
) -> None:  # noqa: ANN001 - Config
    from dermaclass.serving.export import check_bf16_bundle, export_onnx, export_openvino, quantize_bundle

    if onnx:
        info = export_onnx(model, force=force)
        out.print(
            f"wrote {info['path']} (max |output difference| vs torch {info['max_abs_diff']:.1e})", highlight=False
        )
    if openvino or ((int8 or bf16) and not (model / "model.xml").is_file()):
        info = export_openvino(model, force=force)
        out.print(
            f"wrote {info['path']} (max |output difference| vs torch {info['max_abs_diff']:.1e})", highlight=False
        )
    if int8:
        progress, _ = progress_bar("decoding")
        with progress:
            info = quantize_bundle(
                model, calibration, cfg=cfg, split_file=split_file, n_calibration=n_calibration, force=force
            )
        out.print(
            f"wrote {info['path']}: valid balanced accuracy {info['valid_balanced_accuracy_int8']:.4f} "
            f"(float {info['valid_balanced_accuracy_float']:.4f}, drop {info['drop']:+.4f}; limit "
            f"{info['max_drop']:g}); serve it with --backend openvino-int8",
            highlight=False,
        )
    if bf16:
        progress, _ = progress_bar("decoding")
        with progress:
            info = check_bf16_bundle(model, calibration, cfg=cfg, split_file=split_file)
        out.print(
            f"checked bfloat16 inference of {info['path']}: valid balanced accuracy "
            f"{info['valid_balanced_accuracy_bf16']:.4f} (float {info['valid_balanced_accuracy_float']:.4f}, drop "
            f"{info['drop']:+.4f}; limit {info['max_drop']:g}); serve it with --backend openvino-bf16",
            highlight=False,
        )


@app.command("fit-ood", epilog=EXIT_CODES)
@friendly
@data_options("ood", "ood_keep")
def fit_ood_cmd(
    model: BundlePath,
    data: DataPath,
    split_file: BundleSplitOpt = None,
    force: Annotated[bool, Opt("--force", help="Replace a score the bundle already has.")] = False,
    data_opts: DataOptions = None,
) -> None:
    """Fit a bundle's out-of-distribution score on the train split of DATA (cut-off on its valid split).

    For bundles trained before the feature-space scores; `train` fits one itself.
    """
    from dermaclass.serving.refit import refit_ood

    cfg = data_opts.config()  # --ood and --keep are checked with the rest of the config (exit 2)
    r = refit_ood(model, data, split_file=split_file, cfg=cfg, force=force)
    ood = r["ood"]
    out.print(
        f"{model}: {ood['method']} score, cut-off {ood['threshold']:.4f} (passes {ood['keep']:.0%} of the valid "
        f"split); the whole referral rule refers {r['valid_referred']:.1%} of valid images",
        highlight=False,
    )


@app.command("calibrate", epilog=EXIT_CODES)
@friendly
@data_options("operating_classes", "target_sensitivity", "prior_class", "prior_sensitivity")
def calibrate_cmd(
    model: BundlePath,
    data: DataPath,
    split_file: BundleSplitOpt = None,
    force: Annotated[bool, Opt("--force", help="Replace the calibration the bundle has.")] = False,
    tta: Annotated[
        str | None,
        Opt(
            "--tta",
            help="Serve with this test-time augmentation from now on, everything refitted on its logits: "
            "none | flips2 (the image and its mirror, half the time of flips4) | flips4 [default: the bundle's]",
        ),
    ] = None,
    site: Annotated[
        bool,
        Opt(
            "--site",
            help="Refit only the flag thresholds, on every labelled image of DATA: your clinic's own images, "
            "never seen by the bundle (probabilities, referral and weights stay as they are).",
        ),
    ] = False,
    data_opts: DataOptions = None,
) -> None:
    """Refit a bundle's temperature, prior shift, operating points and referral on the valid split of DATA.

    Training fits them at its end; this changes them without retraining (e.g. a new melanoma
    target sensitivity, the prior shift for nevus sensitivity, or fewer TTA views). Settings
    not given keep the bundle's own. The weights are untouched. An ensemble is refitted as it
    was trained: each member on its held-out fold, the ensemble on their out-of-fold
    predictions (DATA must hold the images it was trained on).

    With --site, DATA is instead a labelled set from your clinic that the bundle has never seen
    (at least 20 images of each flagged class): only the flag thresholds are refitted, on all of
    it, for the target sensitivity. Thresholds fitted on another clinic's images do not carry
    to yours (docs/decisions.md).
    """
    from dermaclass.config import CALIBRATION_SETTINGS
    from dermaclass.models import read_bundle_meta
    from dermaclass.serving.refit import recalibrate

    if site:
        return _site_thresholds(model, data, force=force, tta=tta, split_file=split_file, data_opts=data_opts)
    meta = read_bundle_meta(model)
    own = meta.config
    cfg = data_opts.config(**{k: own[k] for k in CALIBRATION_SETTINGS if k in own and data_opts.get(k) is None})
    if meta.is_ensemble:
        from dermaclass.train.ensemble_fit import recalibrate_ensemble

        if split_file is not None:
            raise ConfigError(
                f"{model}: an ensemble is recalibrated on the folds of its own split.csv; drop --split-file"
            )
        cal = recalibrate_ensemble(model, data, cfg=cfg, force=force, tta=tta)
    else:
        cal = recalibrate(model, data, split_file=split_file, cfg=cfg, force=force, tta=tta)
    out.print(
        f"{model}: temperature {cal['temperature']:.3f} (valid ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f})",
        highlight=False,
    )
    if shift := cal.get("prior_shift"):
        out.print(
            f"prior shift: tau {shift['tau']:.1f}, valid {shift['class']} sensitivity "
            f"{shift['valid_sensitivity_before']:.3f} -> {shift['valid_sensitivity']:.3f}",
            highlight=False,
        )
    refer = cal.get("refer") or {}
    if "valid_referred" in refer:
        out.print(f"referral rule refers {refer['valid_referred']:.1%} of valid images", highlight=False)


def _site_thresholds(
    model: Path, data: Path, *, force: bool, tta: str | None, split_file: Path | None, data_opts: DataOptions
) -> None:
    """``calibrate --site``: the flag thresholds refitted on a clinic's own labelled images."""
    from dermaclass.serving.site import fit_site_operating_points

    if tta is not None or split_file is not None:
        raise ConfigError(f"{model}: --site refits the flag thresholds only, on all of {data}; drop --tta/--split-file")
    fits = fit_site_operating_points(
        model, data, cfg=data_opts.config(), target_sensitivity=data_opts.get("target_sensitivity"), force=force
    )
    for c, f in fits.items():
        lo, hi = f["sensitivity_interval"]
        slo, shi = f["specificity_interval"]
        out.print(
            f"{model}: {c} threshold {f['threshold_before']:.4f} -> {f['threshold']:.4f}, fitted on {f['images']} images "
            f"of {data} ({f['positives']} {c}): sensitivity {f['before']['sensitivity']:.3f} -> {f['sensitivity']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], specificity {f['before']['specificity']:.3f} -> {f['specificity']:.3f} "
            f"[{slo:.3f}, {shi:.3f}] (95 % intervals)",
            highlight=False,
        )
    out.print(
        "Rates on these images are now fitted, not measured: measure the thresholds on other labelled images.",
        highlight=False,
    )


@app.command("serve", epilog=EXIT_CODES)
@friendly
def serve_cmd(
    model: Annotated[Path | None, Opt("--model", help="Model bundle [default: the bundled model]")] = None,
    host: Annotated[str, Opt("--host", help="Interface; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, Opt("--port")] = 7860,
    review_dir: Annotated[Path, Opt("--review-dir", help="Where corrections are saved (CSV-manifest layout).")] = Path(
        "review"
    ),
    backend: BackendOpt = "auto",
) -> None:
    """Open the Gradio app (decision support, not a diagnostic device)."""
    from dermaclass.ui import launch

    launch(default_bundle(model), host=host, port=port, review_dir=review_dir, backend=backend)

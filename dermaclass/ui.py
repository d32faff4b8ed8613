"""The clinician's side: a Gradio app to diagnose, explain, refer, review reports and feed back.

Tabs:
- Diagnose: upload, paste or photograph an image; calibrated probabilities with full class
  names, a class-activation map (LayerCAM) beside the image with a colour scale,
  operating-point flags, a "refer to a dermatologist" banner with plain reasons when the
  image is too small, not dermoscopy-like, unlike the training data (serving.refer), or the
  model is unsure, and a correction form
  that saves the image and the right label to the review folder (``data.review``) for the
  next retraining;
- Report: the loaded model's evaluation report (confusion matrix, per-class table with
  intervals); open another report folder; compare two (``report.compare_reports``);
- Model: the model card.

Defaults are private: 127.0.0.1:7860, Gradio analytics off, no share link. Bad uploads (not
an image, corrupt, empty, huge) get a message naming the problem, never a crash. The app is
decision support, not a diagnostic device, and says so on every tab.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no outside look-ups

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dermaclass import DISCLAIMER  # noqa: E402
from dermaclass.data.images import ImageDecodeError, load_rgb  # noqa: E402
from dermaclass.data.review import save_correction  # noqa: E402
from dermaclass.errors import DermaclassError  # noqa: E402
from dermaclass.models import DEFAULT_BUNDLE  # noqa: E402,F401 - the app's default, re-exported
from dermaclass.report.figures import fmt_ci  # noqa: E402
from dermaclass.serving.predictor import Predictor  # noqa: E402

if TYPE_CHECKING:
    from dermaclass.evaluate.record import Report

log = logging.getLogger(__name__)

MAX_BYTES = 25 * 1024 * 1024  # a dermoscopy photo is a few MB; anything bigger is not one
MAX_PIXELS = 40_000_000  # decoded pixels: a 257 KB PNG of 9400x9400 once held the server for 18 s and 4 GB
# Gradio's upload cache holds patients' images: files older than an hour are deleted, checked hourly.
DELETE_CACHE = (3600, 3600)
OVERLAY_WIDTH = 600  # the class-activation overlay is drawn on the upload at up to this width
CHANCE_MARGIN = 0.10  # a bundle within this of chance balanced accuracy (1 / classes) is flagged as weak
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
REPORT_DIR = "report"  # where `dermaclass evaluate BUNDLE DATA --out BUNDLE/report` puts the bundle's report


class UploadError(ValueError):
    """An upload the model cannot read; the message says why in plain words."""


class _LenientImage(gr.Image):
    """gr.Image that passes unreadable uploads on as a file path, so the app can say what is wrong.

    Stock gr.Image opens the upload with PIL before our code runs and shows a bare "Error"
    when that fails. ``is_template`` makes Gradio use the stock Image frontend.
    """

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except Exception:  # noqa: BLE001 - any failure here is reported by check_upload
            return str(payload.path) if payload is not None and getattr(payload, "path", None) else None


def check_upload(path: str | None) -> np.ndarray:
    """The uploaded file as an RGB array, or UploadError naming the problem."""
    if path is None:
        raise UploadError("No image yet: upload, paste or photograph a dermoscopic image.")
    p = Path(path)
    name = p.name
    try:
        size = p.stat().st_size
    except OSError:
        raise UploadError(f"{name}: the upload did not arrive; try again.") from None
    if size == 0:
        raise UploadError(f"{name}: the file is empty (0 bytes).")
    if size > MAX_BYTES:
        raise UploadError(f"{name}: {size / 2**20:.0f} MB is too large (limit {MAX_BYTES // 2**20} MB).")
    try:
        from PIL import Image

        with Image.open(p) as im:  # the header only: refuse a huge canvas before decoding it
            w, h = im.size
    except Exception:  # noqa: BLE001 - unreadable files get load_rgb's precise reason below
        w = h = 0
    if w * h > MAX_PIXELS:
        raise UploadError(
            f"{name}: {w}x{h} pixels is too large to analyse (limit {MAX_PIXELS // 10**6} megapixels); "
            "export a smaller copy."
        )
    try:
        return np.asarray(load_rgb(p))  # full decode; also refuses decompression bombs
    except ImageDecodeError as exc:
        detail = exc.detail.split(": ", 1)[1] if exc.detail.startswith(str(p)) else exc.detail
        raise UploadError(f"{name}: not a readable image ({detail}).") from None


def side_by_side(image: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """The upload (the centre crop the model saw) beside its heat overlay at the same size, and
    a colour scale, so a clinician can compare the heat with the lesion point by point."""
    import cv2
    from PIL import Image, ImageDraw

    from dermaclass.data.images import fit_to_size

    h, w = overlay.shape[:2]
    crop = fit_to_size(Image.fromarray(np.asarray(image, dtype=np.uint8)), (w, h))
    # The overlay's colour map (pytorch-grad-cam: OpenCV's JET), from high (top) to low.
    ramp = np.linspace(255, 0, h).astype(np.uint8)[:, None].repeat(16, axis=1)
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    gap, label_w, title_h = 10, 44, 18
    canvas = Image.new("RGB", (2 * w + 2 * gap + bar.shape[1] + label_w, h + title_h), "white")
    canvas.paste(Image.fromarray(crop), (0, title_h))
    canvas.paste(Image.fromarray(overlay), (w + gap, title_h))
    x_bar = 2 * w + 2 * gap
    canvas.paste(Image.fromarray(bar), (x_bar, title_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), "image (as the model saw it)", fill="black")
    draw.text((w + gap + 2, 2), "where the model looked", fill="black")
    draw.text((x_bar + bar.shape[1] + 4, title_h), "high", fill="black")
    draw.text((x_bar + bar.shape[1] + 4, title_h + h - 12), "low", fill="black")
    return np.asarray(canvas)


def _label(p: Predictor, code: str) -> str:
    name = p.name(code)
    return f"{name} ({code})" if name != code else code


def diagnose_markdown(p: Predictor, result: dict[str, Any]) -> str:
    """The banner under the prediction: referral, operating-point flags, disclaimer."""
    lines = []
    ref = result["referral"]
    if ref["refer"]:  # a distinct warning block, not a heading that reads like any other
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in ref["reasons"])
        lines.append(
            f'<div class="refer-banner" role="alert" style="border:2px solid #b91c1c;background:#fef2f2;'
            f'color:#7f1d1d;padding:0.6em 1em;border-radius:6px"><strong>⚠ {html.escape(ref["message"])}</strong>'
            f"<ul>{reasons}</ul></div>"
        )
    else:
        top = result["top_k"][0]
        lines.append(f"### Most likely: {top['name']} ({top['probability']:.0%})")
    for c, f in result["flags"].items():
        if f["flagged"]:
            lines.append(
                f"**{_label(p, c)} flagged**: probability {f['probability']:.1%} reaches the threshold "
                f"{f['threshold']:.1%} chosen for {f['target_sensitivity']:.0%} sensitivity on validation."
            )
        else:
            lines.append(f"{_label(p, c)}: {f['probability']:.1%}, below its threshold {f['threshold']:.1%}.")
    k = int(result.get("networks") or 1)
    agree = result.get("agreement") or {}
    if k > 1 and agree.get("disagree"):
        tops = ", ".join(html.escape(p.name(c)) for c in dict.fromkeys(agree["member_top"]) if c != result["top"])
        n_agree = round(agree["share"] * k)
        lo, hi = min(agree["member_probability"]), max(agree["member_probability"])
        lines.append(
            f'<div class="disagree-banner" role="status" style="border:2px solid #b45309;background:#fffbeb;'
            f'color:#78350f;padding:0.5em 1em;border-radius:6px"><strong>The networks disagree</strong>: '
            f"{n_agree} of {k} answer {html.escape(result['top_k'][0]['name'])}; the others answer "
            f"{tops}. Each network gives this answer {lo:.0%} to {hi:.0%}. Treat the result with extra "
            "caution.</div>"
        )
    elif k > 1:
        lines.append(f"All {k} networks of the ensemble give this answer.")
    tta = " with flip TTA" if result.get("tta") else ""
    who = f"an ensemble of {k} networks" if k > 1 else "one network"
    lines.append(f"<small>answered by {who}, served by {html.escape(str(result.get('backend')))}{tta}</small>")
    lines.append(f"\n*{DISCLAIMER}*")
    return "\n\n".join(lines)


def report_views(folder: str | Path) -> tuple[str, str | None, pd.DataFrame]:
    """Headline markdown, confusion-matrix PNG path and per-class table of an evaluate folder."""
    from dermaclass.evaluate.record import read_report

    folder = Path(folder)
    if not (folder / "report.json").is_file():
        raise UploadError(f"{folder}: no report.json here (run `dermaclass evaluate MODEL DATA --out {folder}`).")
    r = read_report(folder)
    iv = r.overall_intervals

    def fig(k: str) -> str:
        return fmt_ci(r.metrics.get(k), iv.get(k))

    md = (
        f"**{r.data.get('split')} split** of `{r.data.get('root')}`: {r.n} images, {r.data.get('groups')} groups; "
        f"model `{r.model.get('bundle')}`\n\n"
        f"balanced accuracy **{fig('balanced_accuracy')}** · macro-F1 {fig('macro_f1')} · "
        f"macro AUROC {fig('macro_auroc')} · accuracy {fig('accuracy')} (misleading on imbalanced data)"
    )
    for c, op in r.operating_points.items():
        md += (
            f"\n\n{c} operating point P ≥ {op['threshold']:.3f}: sensitivity {op['sensitivity']:.3f}, "
            f"specificity {op['specificity']:.3f}"
        )
    rows = []
    for c in r.classes:
        m, civ = r.per_class[c], (r.intervals.get("per_class") or {}).get(c) or {}
        rows.append(
            {
                "class": f"{r.names[c]} ({c})",
                "support": m["support"],
                "sensitivity": fmt_ci(m["sensitivity"], civ.get("sensitivity"), iv_digits=2),
                "specificity": fmt_ci(m["specificity"], civ.get("specificity"), iv_digits=2),
                "precision": fmt_ci(m["precision"]),
                "F1": fmt_ci(m["f1"]),
                "AUROC": fmt_ci(m["auroc"]),
            }
        )
    png = folder / "confusion_matrix.png"
    return md, str(png) if png.is_file() else None, pd.DataFrame(rows)


def _bundle_report(p: Predictor) -> Report | None:
    """The bundle's own test report (BUNDLE/report), or None when it has none."""
    from dermaclass.evaluate.record import read_report

    folder = p.bundle / REPORT_DIR
    if not (folder / "report.json").is_file():
        return None
    try:
        return read_report(folder)
    except DermaclassError as exc:  # the app still serves; the status line says there is no usable report
        log.warning("%s", exc)
        return None


def model_card(p: Predictor) -> str:
    """The bundle's MODEL_CARD.md when present, else the same card rendered from the bundle's
    records (and its test report when there is one): one renderer, report.card."""
    from dermaclass.report import model_card_markdown

    card = p.bundle / "MODEL_CARD.md"
    if card.is_file():
        return card.read_text(encoding="utf-8")
    return model_card_markdown(p.meta, _bundle_report(p), name=p.bundle.name)


def model_status(p: Predictor) -> tuple[str, str | None]:
    """One line naming the loaded model (name, date, test balanced accuracy), and a warning when
    it is weak (validation balanced accuracy near chance) or has no evaluation report."""
    m = p.meta
    created = str(m.created or "?")[:10]
    report = _bundle_report(p)
    test = report.balanced_accuracy if report is not None else None
    valid = m.metrics_valid.get("balanced_accuracy")
    kind = (
        (
            f"ensemble of {len(p.networks)} networks: "
            + ", ".join(f"{x['arch']} {x['input_size'][0]}x{x['input_size'][1]}" for x in m.members)
        )
        if p.members
        else m.arch
    )
    line = f"Model **{p.bundle.name}** ({kind}, {len(p.classes)} classes, trained {created}); " + (
        f"test balanced accuracy **{test:.3f}**" if test is not None else "no test report"
    )
    chance = 1 / len(p.classes)
    problems = []
    if valid is None or valid < chance + CHANCE_MARGIN:
        problems.append(
            f"its validation balanced accuracy is {'unknown' if valid is None else f'{valid:.2f}'}, "
            f"close to chance ({chance:.2f} for {len(p.classes)} classes)"
        )
    if report is None:
        problems.append(
            f"it has no evaluation report (`dermaclass evaluate {p.bundle} DATA --out {p.bundle / REPORT_DIR}`)"
        )
    warning = (
        "**⚠ Weak or unchecked model: " + "; ".join(problems) + ". Do not rely on its predictions.**"
        if problems
        else None
    )
    return line, warning


def build_app(bundle: str | Path, *, review_dir: str | Path = "review", backend: str = "auto") -> gr.Blocks:
    """The Gradio Blocks app for one model bundle."""
    predictor = Predictor(bundle, backend=backend)
    review_dir = Path(review_dir)
    choices = [(_label(predictor, c), c) for c in predictor.classes]
    bundle_report = predictor.bundle / REPORT_DIR
    status, weak = model_status(predictor)
    if weak:
        log.warning("%s: %s", predictor.bundle, weak.strip("*⚠ "))
    from dermaclass.models import weights_identity

    model_id = predictor.bundle.name + f"@{weights_identity(predictor.bundle)[:12]}"

    def diagnose(path: str | None, tta: bool, previous: dict | None = None):
        # Every new image resets the correction form: a stale label or note once went with the
        # next image. The same image diagnosed again (upload, then the button) keeps the form.
        same = bool(previous) and path is not None and previous.get("path") == path
        reset = (
            (gr.update(), gr.update(), gr.update(), gr.update())
            if same
            else (gr.update(value=None), gr.update(value=""), gr.update(value=""), "")
        )
        try:
            image = check_upload(path)
            result = predictor.predict(image, tta=tta)
            _, overlay = predictor.gradcam(image, display_width=OVERLAY_WIDTH)
            overlay = side_by_side(image, overlay)
        except UploadError as exc:
            return None, None, f"### Cannot read this upload\n\n{exc}", None, gr.update(interactive=False), *reset
        except DermaclassError as exc:
            return None, None, f"### Cannot predict\n\n{exc}", None, gr.update(interactive=False), *reset
        label = {_label(predictor, c): prob for c, prob in result["probabilities"].items()}
        state = {
            "path": path,
            "name": Path(path).name,
            "top": result["top"],
            "probability": result["top_k"][0]["probability"],
        }
        return label, overlay, diagnose_markdown(predictor, result), state, gr.update(interactive=True), *reset

    def correct(state: dict | None, label: str | None, note: str, lesion: str):
        if not state:
            return "Diagnose an image first."
        if not label:
            return "Choose the right label first."
        try:
            row = save_correction(
                review_dir,
                state["path"],
                label=label,
                predicted=state["top"],
                probability=state["probability"],
                model=model_id,
                note=note or "",
                original_name=state.get("name"),
                lesion=lesion or "",
            )
        except (OSError, DermaclassError, ImageDecodeError) as exc:
            return f"Not saved: {exc}"
        return (
            f"Saved: {row['image']} as **{_label(predictor, label)}** (model said {_label(predictor, state['top'])}). "
            f"{row['corrections']} correction(s) in `{review_dir / 'labels.csv'}`, ready for "
            f"`dermaclass train ... {review_dir}`."
        )

    def open_report(folder: str):
        try:
            return report_views(folder.strip())
        except (UploadError, OSError, ValueError, KeyError) as exc:
            return f"Cannot open: {exc}", None, pd.DataFrame()

    def compare(old: str, new: str):
        from dermaclass.report import compare_reports, difference_png, drop_alert

        try:
            c = compare_reports(old.strip(), new.strip())
        except (DermaclassError, OSError) as exc:
            return f"Cannot compare: {exc}", None, pd.DataFrame()
        o = c["overall"]["balanced_accuracy"]
        md = (
            f"balanced accuracy {o['old']:.3f} → {o['new']:.3f} ({o['delta']:+.3f}, interval "
            f"[{o['delta_interval'][0]:+.3f}, {o['delta_interval'][1]:+.3f}])"
        )
        alert = drop_alert(c)
        if alert:
            md = f"## ⚠ {alert}\n\n" + md
        rows = [
            {
                "class": k,
                "sensitivity old": fmt_ci(v["sensitivity"]["old"]),
                "new": fmt_ci(v["sensitivity"]["new"]),
                "delta": fmt_ci(v["sensitivity"]["delta"], v["sensitivity"]["delta_interval"], iv_digits=2),
                "drop": "YES" if v["sensitivity_drop"] else "",
            }
            for k, v in c["per_class"].items()
        ]
        from io import BytesIO

        from PIL import Image

        # In memory, not a temporary file left behind in /tmp (Gradio's own cache is cleaned).
        png = difference_png(
            {"confusion_matrix": c["confusion_old"]},
            {"confusion_matrix": c["confusion_new"]},
            c["classes"],
            c["class_names"],
        )
        return md, Image.open(BytesIO(png)), pd.DataFrame(rows)

    with gr.Blocks(title="dermaclass", analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
        gr.Markdown(f"# dermaclass\n**Decision support, not a diagnostic device.** {DISCLAIMER}")
        if weak:
            gr.Markdown(weak, elem_id="weak-model")  # above the tabs: seen on every tab
        state = gr.State(None)
        with gr.Tab("Diagnose"):
            gr.Markdown(status, elem_id="model-status")
            with gr.Row():
                with gr.Column():
                    image = _LenientImage(
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard", "webcam"],
                        label="Dermoscopic image",
                        height=320,
                    )
                    tta = gr.Checkbox(
                        label="Test-time augmentation (flips; slower, steadier; on when the model was calibrated with it)",
                        value=predictor.tta,
                    )
                    run = gr.Button("Diagnose", variant="primary")
                with gr.Column():
                    verdict = gr.Markdown(elem_id="verdict")
                    probs = gr.Label(num_top_classes=len(predictor.classes), label="Calibrated probabilities")
                    heat = gr.Image(
                        label="Class-activation map (LayerCAM): regions behind the top class, beside the image",
                        interactive=False,
                        height=320,
                        format="png",
                    )
            with gr.Accordion("The model is wrong? Save the right label for retraining", open=True):
                with gr.Row():
                    right = gr.Dropdown(choices=choices, label="Right label", value=None)
                    note = gr.Textbox(label="Note (optional)", max_lines=2, max_length=2000)
                    lesion = gr.Textbox(label="Lesion / patient id (optional)", max_lines=1, max_length=200)
                save = gr.Button("Save correction", interactive=False)
                saved = gr.Markdown(elem_id="saved")
            outputs = [probs, heat, verdict, state, save, right, note, lesion, saved]
            run.click(diagnose, [image, tta, state], outputs, api_name="diagnose")
            image.upload(diagnose, [image, tta, state], outputs, api_name=False)
            save.click(correct, [state, right, note, lesion], saved, api_name="correct")
        with gr.Tab("Report"):
            gr.Markdown(
                "The loaded model's evaluation on its held-out test split, by lesion. Balanced accuracy "
                "(mean per-class sensitivity) matters here: plain accuracy is dominated by nevi."
            )
            md0, png0, table0 = (
                report_views(bundle_report)
                if (bundle_report / "report.json").is_file()
                else (
                    f"No report beside the model yet: `dermaclass evaluate {predictor.bundle} DATA --out {bundle_report}`",
                    None,
                    pd.DataFrame(),
                )
            )
            rep_md = gr.Markdown(md0)
            rep_png = gr.Image(png0, label="Confusion matrix", interactive=False)
            rep_table = gr.Dataframe(table0, label="Per class (95% intervals)", interactive=False)
            with gr.Row():
                other = gr.Textbox(label="Open another report folder", placeholder="reports/NAME")
                open_btn = gr.Button("Open")
            open_btn.click(open_report, other, [rep_md, rep_png, rep_table], api_name="open_report")
            gr.Markdown("### Compare two reports (old model in use → new candidate)")
            with gr.Row():
                old = gr.Textbox(label="Old report folder")
                new = gr.Textbox(label="New report folder")
                cmp_btn = gr.Button("Compare")
            cmp_md = gr.Markdown()
            cmp_png = gr.Image(label="Confusion difference (new − old)", interactive=False)
            cmp_table = gr.Dataframe(
                pd.DataFrame(columns=["class", "sensitivity old", "new", "delta", "drop"]),
                label="Per-class sensitivity",
                interactive=False,
            )
            cmp_btn.click(compare, [old, new], [cmp_md, cmp_png, cmp_table], api_name="compare")
        with gr.Tab("Model"):
            gr.Markdown(model_card(predictor))
    return app


def launch(
    bundle: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    review_dir: str | Path = "review",
    block: bool = True,
    backend: str = "auto",
) -> gr.Blocks:
    """Serve the app (loopback by default, no share link)."""
    app = build_app(bundle, review_dir=review_dir, backend=backend)
    # quiet: Gradio's own banner suggests share=True; this app is private on purpose.
    log.warning("dermaclass app on http://%s:%d (private on purpose: no share link, analytics off)", host, port)
    app.queue(default_concurrency_limit=2).launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        show_error=True,
        max_file_size=MAX_BYTES,
        footer_links=["api"],
        quiet=True,
    )
    return app

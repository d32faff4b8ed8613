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

What each tab shows is rendered by ``ui.views``; this module wires it into Gradio.

Defaults are private: 127.0.0.1:7860, Gradio analytics off, no share link. Bad uploads (not
an image, corrupt, empty, huge) get a message naming the problem, never a crash. The app is
decision support, not a diagnostic device, and says so on every tab.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no outside look-ups

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from dermaclass import DISCLAIMER  # noqa: E402
from dermaclass.data.images import ImageDecodeError  # noqa: E402
from dermaclass.data.review import save_correction  # noqa: E402
from dermaclass.errors import DermaclassError  # noqa: E402
from dermaclass.models import DEFAULT_BUNDLE  # noqa: E402,F401 - the app's default, re-exported
from dermaclass.report.figures import fmt_ci  # noqa: E402
from dermaclass.serving.predictor import Predictor  # noqa: E402
from dermaclass.ui.views import (  # noqa: E402
    MAX_BYTES,
    REPORT_DIR,
    UploadError,
    check_upload,
    diagnose_markdown,
    label_of,
    model_card,
    model_status,
    report_views,
    side_by_side,
)

log = logging.getLogger(__name__)

# Gradio's upload cache holds patients' images: files older than an hour are deleted, checked hourly.
DELETE_CACHE = (3600, 3600)
OVERLAY_WIDTH = 600  # the class-activation overlay is drawn on the upload at up to this width
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


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


def build_app(bundle: str | Path, *, review_dir: str | Path = "review", backend: str = "auto") -> gr.Blocks:
    """The Gradio Blocks app for one model bundle."""
    predictor = Predictor(bundle, backend=backend)
    review_dir = Path(review_dir)
    choices = [(label_of(predictor, c), c) for c in predictor.classes]
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
        label = {label_of(predictor, c): prob for c, prob in result["probabilities"].items()}
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
            f"Saved: {row['image']} as **{label_of(predictor, label)}** (model said {label_of(predictor, state['top'])}). "
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

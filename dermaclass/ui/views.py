"""What the app shows, as plain functions of a Predictor, its results and its files: the upload
check, the image beside its class-activation map, the diagnosis banner (referral, flags,
the networks' agreement), the report views, the model card and the status line. No Gradio
here, so every view is tested without a server (``ui.app`` wires them into tabs).

This is decision support, not a diagnostic device: the banner ends with the disclaimer.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dermaclass import DISCLAIMER
from dermaclass.data.images import ImageDecodeError, load_rgb
from dermaclass.errors import DermaclassError
from dermaclass.report.figures import fmt_ci

if TYPE_CHECKING:
    from dermaclass.evaluate.record import Report
    from dermaclass.serving.predictor import Predictor

log = logging.getLogger(__name__)

MAX_BYTES = 25 * 1024 * 1024  # a dermoscopy photo is a few MB; anything bigger is not one
MAX_PIXELS = 40_000_000  # decoded pixels: a 257 KB PNG of 9400x9400 once held the server for 18 s and 4 GB
CHANCE_MARGIN = 0.10  # a bundle within this of chance balanced accuracy (1 / classes) is flagged as weak
REPORT_DIR = "report"  # where `dermaclass evaluate BUNDLE DATA --out BUNDLE/report` puts the bundle's report


class UploadError(ValueError):
    """An upload the model cannot read; the message says why in plain words."""


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


def label_of(p: Predictor, code: str) -> str:
    """A class as the app names it: full name and code."""
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
                f"**{label_of(p, c)} flagged**: probability {f['probability']:.1%} reaches the threshold "
                f"{f['threshold']:.1%} chosen for {f['target_sensitivity']:.0%} sensitivity on "
                f"{f.get('fitted_on') or 'validation'}."
            )
        else:
            lines.append(f"{label_of(p, c)}: {f['probability']:.1%}, below its threshold {f['threshold']:.1%}.")
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
    tta = f" with flip TTA ({html.escape(str(result['tta']))})" if result.get("tta") else ""
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

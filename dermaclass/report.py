"""Reports people review: confusion matrices, reliability diagrams, HTML, and model comparison.

Everything renders from the plain dicts of ``dermaclass.evaluate`` (MONAI's metric/handler
split): nothing here computes a figure except ``compare``, which recomputes both models'
figures from their ``predictions.csv`` with one *paired* grouped bootstrap (the same
resampled lesions for the old and the new model), so a delta's interval reflects the
models' difference and not two independent samplings.

The HTML is one self-contained file (figures and thumbnails embedded as data URIs, no
scripts, no network), readable offline in any browser. Class names come from clinic data,
so every string is escaped (Jinja2 autoescape). The confusion-matrix layout follows the
10-class dermatology matrix of seed 003: counts and row-normalised side by side, with full
class names.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import dermaclass
from dermaclass.errors import DermaclassError
from dermaclass.evaluate.metrics import (
    INTERVAL_KEYS, PER_CLASS_INTERVAL_KEYS, classification_metrics, metric_draws, percentile_interval, resample_weights,
)
from dermaclass.fileio import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

REPORT_FILES = ("predictions.csv", "report.json", "report.html", "confusion_matrix.png")


class CompareError(DermaclassError):
    """Two reports cannot be compared (different test sets or classes)."""

    exit_code = 3


# ---- figures -----------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _labels(classes: list[str], names: dict[str, str]) -> list[str]:
    return [f"{names.get(c, c)} ({c})" if names.get(c, c) != c else c for c in classes]


def _matrix_panel(ax, mat: np.ndarray, labels: list[str], *, fmt, title: str, cmap: str, vmin=None, vmax=None) -> None:
    k = len(labels)
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(k), labels, rotation=40, ha="right", fontsize=9)
    ax.set_yticks(range(k), labels, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    lo, hi = im.get_clim()
    for i in range(k):
        for j in range(k):
            v = mat[i, j]
            if np.isnan(v):
                text, dark = "n/c", False
            else:
                text = fmt(v)
                dark = abs(v - lo) > 0.6 * (hi - lo) if hi > lo else False
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def confusion_png(report: dict[str, Any]) -> bytes:
    """Counts and row-normalised confusion matrices side by side, full class names."""
    plt = _plt()
    classes = report["classes"]
    labels = _labels(classes, report.get("class_names", {}))
    cm = np.asarray(report["confusion_matrix"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    side = 2.2 + 0.62 * len(classes)
    fig, (a, b) = plt.subplots(1, 2, figsize=(2 * side + 1.5, side))
    _matrix_panel(a, cm, labels, fmt=lambda v: f"{int(v)}", title="counts", cmap="Blues")
    _matrix_panel(b, norm, labels, fmt=lambda v: f"{v:.0%}", title="row-normalised (recall on the diagonal)",
                  cmap="Blues", vmin=0, vmax=1)
    fig.suptitle(f"{report['data']['split']} split, {report['n']} images; balanced accuracy "
                 f"{_fmt(report.get('balanced_accuracy'))}")
    fig.tight_layout()
    return _png(fig)


def reliability_png(report: dict[str, Any]) -> bytes:
    """Reliability diagram before and after temperature scaling."""
    plt = _plt()
    cal = report["calibration"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for key, label, colour in (("reliability_uncalibrated", f"uncalibrated (ECE {_fmt(cal['ece_uncalibrated'])})", "C1"),
                               ("reliability_calibrated", f"T = {cal['temperature']:.2f} (ECE {_fmt(cal['ece_calibrated'])})", "C0")):
        bins = [b for b in cal[key] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour, label=label)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def difference_png(old: dict, new: dict, classes: list[str], names: dict[str, str]) -> bytes:
    """Row-normalised confusion matrix of NEW minus OLD (blue: more, red: fewer)."""
    plt = _plt()

    def norm(cm):
        cm = np.asarray(cm, dtype=float)
        rows = cm.sum(axis=1, keepdims=True)
        return np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)

    diff = norm(new["confusion_matrix"]) - norm(old["confusion_matrix"])
    side = 2.5 + 0.62 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    lim = max(0.05, float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.05)
    _matrix_panel(ax, diff, _labels(classes, names), fmt=lambda v: f"{v:+.0%}", cmap="RdBu", vmin=-lim, vmax=lim,
                  title="row-normalised, new minus old (diagonal: change in recall)")
    fig.tight_layout()
    return _png(fig)


def thumbnail_png(image: np.ndarray, *, width: int = 160) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/c"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def _ci(iv: list[float] | None) -> str:
    return "" if not iv else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


# ---- HTML ---------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1b1b1b;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.banner{background:#fff4e5;border:1px solid #f0a030;padding:.6rem .9rem;border-radius:4px;margin:1rem 0}
.alert{background:#fde8e8;border:2px solid #c62828;padding:.6rem .9rem;border-radius:4px;margin:1rem 0;font-weight:600}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem} td,th{border:1px solid #ddd;padding:.3rem .55rem;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left} .muted{color:#666;font-size:.85rem}
.kpi{display:flex;flex-wrap:wrap;gap:.8rem} .kpi div{border:1px solid #ddd;border-radius:4px;padding:.5rem .8rem;min-width:9rem}
.kpi b{display:block;font-size:1.35rem} img.fig{max-width:100%} .gallery{display:flex;flex-wrap:wrap;gap:.8rem}
.gallery figure{margin:0;border:1px solid #ddd;padding:.3rem;width:170px;font-size:.8rem} .drop{color:#c62828;font-weight:700}
code{font-size:.85rem} table.info td,table.text td{text-align:left} table.num td{white-space:nowrap}
"""

_REPORT_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dermaclass report: {{ r.data.split }} split</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{{ css }}</style></head><body>
<h1>dermaclass evaluation report</h1>
<div class="muted">{{ r.created }} &middot; dermaclass {{ r.dermaclass_version }}</div>
<div class="banner"><b>Decision support, not a diagnostic device.</b> {{ r.disclaimer }}</div>
<h2>What was evaluated</h2>
<table class="info"><tr><th>model</th><td>{{ r.model.bundle }} &middot; {{ r.model.arch }} &middot; recipe {{ r.model.recipe }} &middot;
input {{ r.model.input_size[0] }}x{{ r.model.input_size[1] }} &middot; weights <code>{{ r.model.weights_sha256[:12] }}</code></td></tr>
<tr><th>data</th><td>{{ r.data.root }} &middot; <b>{{ r.data.split }}</b> split: {{ r.n }} images, {{ r.data.groups }}
{{ "lesions/patients" if r.data.group_column else "images (no groups)" }} &middot; images <code>{{ r.data.images_sha256[:12] }}</code></td></tr>
<tr><th>split file</th><td>{{ r.data.split_file or "none (all images)" }}</td></tr></table>
<h2>Headline figures</h2>
<div class="kpi">{% for k, label in headline %}<div>{{ label }}<b>{{ fmt(r[k]) }}</b><span class="muted">{{ ci(r.intervals.overall.get(k)) }}</span></div>{% endfor %}</div>
<p class="muted">Balanced accuracy is the mean per-class sensitivity (the ISIC challenge metric); plain accuracy is
dominated by the majority class. Brackets: {{ (r.intervals.level*100)|round|int }}% bootstrap intervals,
{{ r.intervals.n_boot }} resamples of {{ r.intervals.n_units }} {{ r.intervals.resampled }}.</p>
<table><tr><th>also</th><th>value</th></tr>
{% for k, label in extra %}<tr><td>{{ label }}</td><td>{{ fmt(r[k]) }}</td></tr>{% endfor %}</table>
{% if r.operating_points %}<h2>Operating points</h2>
<p class="muted">An image is flagged when the class probability reaches the threshold, whatever the top class is.
The threshold was chosen on the validation split for the target sensitivity; below is what it gives on these data.</p>
<table><tr><th>class</th><th>threshold</th><th>target sensitivity</th><th>valid sensitivity</th><th>valid specificity</th>
<th>sensitivity here</th><th>specificity here</th><th>flagged</th></tr>
{% for c, op in r.operating_points.items() %}<tr><td>{{ name(c) }}</td><td>{{ "%.4f"|format(op.threshold) }}</td>
<td>{{ fmt(op.target_sensitivity) }}</td><td>{{ fmt(op.valid_sensitivity) }}</td><td>{{ fmt(op.valid_specificity) }}</td>
<td>{{ fmt(op.sensitivity) }}</td><td>{{ fmt(op.specificity) }}</td><td>{{ op.flagged }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Confusion matrix</h2><img class="fig" alt="confusion matrix" src="{{ confusion }}">
<h2>Per class</h2>
<table class="num"><tr><th>class</th><th>support</th><th>precision</th><th>sensitivity</th><th>95% CI</th><th>specificity</th><th>95% CI</th>
<th>F1</th><th>AUROC</th><th>AP</th></tr>
{% for c in r.classes %}{% set m = r.per_class[c] %}{% set iv = r.intervals.per_class[c] %}<tr><td>{{ name(c) }}</td><td>{{ m.support }}</td>
<td>{{ fmt(m.precision) }}</td><td>{{ fmt(m.sensitivity) }}</td><td>{{ ci(iv.sensitivity) }}</td><td>{{ fmt(m.specificity) }}</td>
<td>{{ ci(iv.specificity) }}</td><td>{{ fmt(m.f1) }}</td><td>{{ fmt(m.auroc) }}</td><td>{{ fmt(m.average_precision) }}</td></tr>{% endfor %}</table>
<p class="muted">n/c: not computable (for example, a class with no images in these data has no sensitivity).</p>
<h2>Most confused pairs</h2>
<table class="text"><tr><th>true</th><th>predicted as</th><th>images</th><th>share of the true class</th></tr>
{% for p in r.confused_pairs %}<tr><td>{{ name(p.true) }}</td><td>{{ name(p.predicted) }}</td><td>{{ p.count }}</td><td>{{ fmt(p.share_of_true, True) }}</td></tr>{% endfor %}</table>
<h2>Calibration</h2>
{% if r.calibration.fitted_on %}<p>Temperature {{ "%.3f"|format(r.calibration.temperature) }} (fitted on the {{ r.calibration.fitted_on }} split):
expected calibration error {{ fmt(r.calibration.ece_uncalibrated) }} before, {{ fmt(r.calibration.ece_calibrated) }} after.</p>
{% else %}<p><b>Not calibrated:</b> this bundle has no temperature (trained before calibration was added); expected
calibration error {{ fmt(r.calibration.ece_uncalibrated) }}.</p>{% endif %}
<img class="fig" style="max-width:460px" alt="reliability diagram" src="{{ reliability }}">
<h2>Most confident errors</h2>
<div class="gallery">{% for e in gallery %}<figure><img src="{{ e.uri }}" alt="{{ e.image }}" width="160">
<figcaption><b>{{ e.image }}</b><br>true: {{ name(e.true) }}<br>predicted: {{ name(e.predicted) }} ({{ fmt(e.p_predicted, True) }})<br>
P(true) {{ fmt(e.p_true, True) }}</figcaption></figure>{% else %}<p>No errors.</p>{% endfor %}</div>
</body></html>
"""

_HEADLINE = [("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"), ("macro_auroc", "macro AUROC"),
             ("accuracy", "accuracy")]
_EXTRA = [("mAP", "mAP (mean average precision)"), ("top2_accuracy", "top-2 accuracy"), ("log_loss", "log-loss"),
          ("ece", "expected calibration error")]


def _env():
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def render_html(report: dict[str, Any], *, confusion: bytes, reliability: bytes, thumbnails: dict[int, bytes]) -> str:
    """The self-contained HTML report."""
    names = report.get("class_names", {})
    gallery = [{**e, "uri": _uri(thumbnails[e["row"]])} for e in report["worst_errors"] if e["row"] in thumbnails]
    return _env().from_string(_REPORT_TEMPLATE).render(
        r=report, css=_CSS, headline=_HEADLINE, extra=_EXTRA, fmt=_fmt, ci=_ci, gallery=gallery,
        name=lambda c: f"{names.get(c, c)} ({c})" if names.get(c, c) != c else c,
        confusion=_uri(confusion), reliability=_uri(reliability),
    )


def write_report(evaluation: Any, out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Write predictions.csv, report.json, report.html and the PNG figures (atomically)."""
    out = Path(out_dir)
    if not force and any((out / f).exists() for f in REPORT_FILES):
        raise FileExistsError(f"{out}: a report is already there")
    out.mkdir(parents=True, exist_ok=True)
    report = evaluation.report
    confusion, reliability = confusion_png(report), reliability_png(report)
    thumbs = {e["row"]: thumbnail_png(evaluation.images[e["row"]]) for e in report["worst_errors"]}
    paths = {name: out / name for name in (*REPORT_FILES, "reliability.png")}
    with atomic_path(paths["predictions.csv"]) as tmp:
        evaluation.predictions.to_csv(tmp, index=False, float_format="%.6f")
    for name, png in (("confusion_matrix.png", confusion), ("reliability.png", reliability)):
        with atomic_path(paths[name]) as tmp:
            Path(tmp).write_bytes(png)
    write_text(paths["report.html"], render_html(report, confusion=confusion, reliability=reliability, thumbnails=thumbs))
    write_json(paths["report.json"], report)  # last: its presence marks a complete report
    return paths


# ---- compare ------------------------------------------------------------------------------
def load_report(folder: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """A report folder's report.json and predictions.csv, checked."""
    folder = Path(folder)
    paths = [folder / "report.json", folder / "predictions.csv"]
    for p in paths:
        if not p.is_file():
            raise CompareError(f"{folder}: not an evaluate output folder (no {p.name}); run `dermaclass evaluate` first")
    try:
        report = json.loads(paths[0].read_text(encoding="utf-8"))
        preds = pd.read_csv(paths[1], dtype={"image": str, "group": str, "label": str, "predicted": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CompareError(f"{folder}: unreadable report ({exc})") from exc
    missing = [f"p_{c}" for c in report.get("classes", []) if f"p_{c}" not in preds.columns]
    if missing or "classes" not in report:
        raise CompareError(f"{paths[1]}: lacks probability columns {missing}")
    return report, preds


def _probs(preds: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(preds["label"]) - set(index))
    if unknown:
        raise CompareError(f"predictions hold labels {unknown} outside the classes {classes}")
    return preds["label"].map(index).to_numpy(), preds[[f"p_{c}" for c in classes]].to_numpy(dtype=float)


def compare_reports(old_dir: str | Path, new_dir: str | Path, *, force: bool = False, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Metric deltas NEW - OLD with paired bootstrap intervals, and flagged sensitivity drops.

    A class's sensitivity drop is flagged when the whole interval of its delta lies below
    zero: the drop is larger than resampling lesions can explain.
    """
    old, old_p = load_report(old_dir)
    new, new_p = load_report(new_dir)
    if old["classes"] != new["classes"]:
        raise CompareError(f"{old_dir} and {new_dir} have different classes ({old['classes']} vs {new['classes']})")
    classes = list(old["classes"])
    same = old["data"]["images_sha256"] == new["data"]["images_sha256"]
    if not same and not force:
        raise CompareError(
            f"{old_dir} ({old['data']['n']} images, {old['data']['split']} split of {old['data']['root']}) and {new_dir} "
            f"({new['data']['n']} images, {new['data']['split']} split of {new['data']['root']}) are on different test "
            "sets, so a difference in the figures would mix the model change with the data change; evaluate both "
            "models on the same split, or pass --force")
    old_p = old_p.sort_values("image").reset_index(drop=True)
    new_p = new_p.sort_values("image").reset_index(drop=True)
    paired = same and old_p["image"].tolist() == new_p["image"].tolist()
    y_old, p_old = _probs(old_p, classes)
    y_new, p_new = _probs(new_p, classes)
    m_old, m_new = classification_metrics(y_old, p_old, classes), classification_metrics(y_new, p_new, classes)
    if paired:
        w = resample_weights(new_p["group"].astype(str).to_numpy(), len(new_p), n_boot=n_boot, seed=seed)
        d_old, d_new = metric_draws(y_old, p_old, classes, w), metric_draws(y_new, p_new, classes, w)
    else:  # forced, different sets: independent bootstraps
        d_old = metric_draws(y_old, p_old, classes, resample_weights(old_p["group"].astype(str).to_numpy(), len(old_p),
                                                                      n_boot=n_boot, seed=seed))
        d_new = metric_draws(y_new, p_new, classes, resample_weights(new_p["group"].astype(str).to_numpy(), len(new_p),
                                                                      n_boot=n_boot, seed=seed + 1))

    def delta(a, b):
        return None if a is None or b is None else b - a

    overall = {k: {"old": m_old[k], "new": m_new[k], "delta": delta(m_old[k], m_new[k]),
                   "delta_interval": percentile_interval(d_new["overall"][k] - d_old["overall"][k], level)}
               for k in INTERVAL_KEYS}
    per_class, flagged = {}, []
    for i, c in enumerate(classes):
        row = {"support_old": m_old["per_class"][c]["support"], "support_new": m_new["per_class"][c]["support"]}
        for k in PER_CLASS_INTERVAL_KEYS:
            a, b = m_old["per_class"][c][k], m_new["per_class"][c][k]
            iv = percentile_interval(d_new["per_class"][k][:, i] - d_old["per_class"][k][:, i], level)
            row[k] = {"old": a, "new": b, "delta": delta(a, b), "delta_interval": iv}
        for k in ("f1", "auroc"):
            a, b = m_old["per_class"][c][k], m_new["per_class"][c][k]
            row[k] = {"old": a, "new": b, "delta": delta(a, b)}
        sens = row["sensitivity"]
        row["sensitivity_drop"] = bool(sens["delta_interval"] is not None and sens["delta_interval"][1] < 0)
        if row["sensitivity_drop"]:
            flagged.append(c)
        per_class[c] = row
    return {
        "format": 1,
        "dermaclass_version": dermaclass.__version__,
        "old": {"folder": str(old_dir), "model": old["model"], "data": old["data"]},
        "new": {"folder": str(new_dir), "model": new["model"], "data": new["data"]},
        "same_test_set": same, "paired": paired, "forced": bool(force and not same),
        "bootstrap": {"n_boot": n_boot, "level": level, "resampled": "groups"},
        "classes": classes, "class_names": new.get("class_names", {}),
        "overall": overall, "per_class": per_class,
        "sensitivity_drops": flagged,
        "confusion_old": m_old["confusion_matrix"], "confusion_new": m_new["confusion_matrix"],
    }


_COMPARE_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dermaclass: model comparison</title><style>{{ css }}</style></head><body>
<h1>What the retraining changed</h1>
<div class="banner"><b>Decision support, not a diagnostic device.</b> Compare before replacing a model in use.</div>
{% if c.sensitivity_drops %}<div class="alert">SENSITIVITY DROP: {% for k in c.sensitivity_drops %}{{ name(k) }}{{ ", " if not loop.last }}{% endfor %}.
The new model misses more of these lesions than resampling explains. Do not replace the old model without review.</div>
{% else %}<p>No class's sensitivity dropped beyond its {{ (c.bootstrap.level*100)|round|int }}% interval.</p>{% endif %}
{% if not c.same_test_set %}<div class="alert">The two reports are on different test sets (compared with --force): deltas mix model and data changes.</div>{% endif %}
<table><tr><th></th><th>old</th><th>new</th></tr>
<tr><td>model</td><td>{{ c.old.model.bundle }} <code>{{ c.old.model.weights_sha256[:12] }}</code></td><td>{{ c.new.model.bundle }} <code>{{ c.new.model.weights_sha256[:12] }}</code></td></tr>
<tr><td>data</td><td>{{ c.old.data.split }}: {{ c.old.data.n }} images</td><td>{{ c.new.data.split }}: {{ c.new.data.n }} images</td></tr></table>
<h2>Overall</h2><table><tr><th>figure</th><th>old</th><th>new</th><th>delta</th><th>delta interval</th></tr>
{% for k, v in c.overall.items() %}<tr><td>{{ k }}</td><td>{{ fmt(v.old) }}</td><td>{{ fmt(v.new) }}</td><td>{{ sgn(v.delta) }}</td><td>{{ ci(v.delta_interval) }}</td></tr>{% endfor %}</table>
<h2>Per class</h2><table><tr><th>class</th><th>sensitivity old</th><th>new</th><th>delta [interval]</th><th>specificity old</th><th>new</th><th>delta [interval]</th><th>F1 delta</th><th>AUROC delta</th></tr>
{% for k, v in c.per_class.items() %}<tr{% if v.sensitivity_drop %} class="drop"{% endif %}><td>{{ name(k) }}{% if v.sensitivity_drop %} &#9888;{% endif %}</td>
<td>{{ fmt(v.sensitivity.old) }}</td><td>{{ fmt(v.sensitivity.new) }}</td><td>{{ sgn(v.sensitivity.delta) }} {{ ci(v.sensitivity.delta_interval) }}</td>
<td>{{ fmt(v.specificity.old) }}</td><td>{{ fmt(v.specificity.new) }}</td><td>{{ sgn(v.specificity.delta) }} {{ ci(v.specificity.delta_interval) }}</td>
<td>{{ sgn(v.f1.delta) }}</td><td>{{ sgn(v.auroc.delta) }}</td></tr>{% endfor %}</table>
<h2>Confusion matrix difference</h2><img class="fig" alt="confusion matrix difference" src="{{ diff }}">
</body></html>
"""


def _sgn(v: Any) -> str:
    return "n/c" if v is None else f"{v:+.3f}"


def write_compare(result: dict[str, Any], out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """compare.json, compare.html and confusion_difference.png."""
    out = Path(out_dir)
    names = {"json": out / "compare.json", "html": out / "compare.html", "png": out / "confusion_difference.png"}
    if not force and any(p.exists() for p in names.values()):
        raise FileExistsError(f"{out}: a comparison is already there")
    out.mkdir(parents=True, exist_ok=True)
    cn = result.get("class_names", {})
    diff = difference_png({"confusion_matrix": result["confusion_old"]}, {"confusion_matrix": result["confusion_new"]},
                          result["classes"], cn)
    with atomic_path(names["png"]) as tmp:
        Path(tmp).write_bytes(diff)
    html = _env().from_string(_COMPARE_TEMPLATE).render(
        c=result, css=_CSS, fmt=_fmt, ci=_ci, sgn=_sgn, diff=_uri(diff),
        name=lambda c: f"{cn.get(c, c)} ({c})" if cn.get(c, c) != c else c)
    write_text(names["html"], html)
    write_json(names["json"], result)
    return names

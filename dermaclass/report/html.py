"""The self-contained HTML evaluation report and the writer of an evaluate output folder.

One file with figures and thumbnails embedded as data URIs, no scripts, no network,
readable offline in any browser. Class names come from clinic data, so every string is
escaped (Jinja2 autoescape).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermaclass.evaluate.metrics import MIN_SUPPORT
from dermaclass.fileio import atomic_path, write_json, write_text
from dermaclass.report.figures import ci, confusion_png, fmt, reliability_png, thumbnail_png, tradeoff_png, uri

REPORT_FILES = ("predictions.csv", "report.json", "report.html", "confusion_matrix.png")

CSS = """
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
{% if r.get("external") %}<h2>External validation</h2>
<p class="muted">Every image of labelled dermoscopy sets from outside the training clinics, evaluated with the same model
and decision rule (nothing is fitted on them). Internal test splits flatter a model; these figures are closer to what a
new clinic will see. Balanced accuracy is over the classes each set has.</p>
<table class="num"><tr><th>set</th><th>images</th><th>balanced accuracy</th><th>macro-F1</th><th>macro AUROC</th><th>ECE</th>
<th>accuracy</th>{% for c in r.operating_points %}<th>{{ c }} sensitivity / specificity at its threshold</th>{% endfor %}</tr>
<tr><td><b>this split</b> ({{ r.data.split }})</td><td>{{ r.n }}</td><td>{{ fmt(r.balanced_accuracy) }} {{ ci(r.intervals.overall.balanced_accuracy) }}</td>
<td>{{ fmt(r.macro_f1) }}</td><td>{{ fmt(r.macro_auroc) }} {{ ci(r.intervals.overall.macro_auroc) }}</td><td>{{ fmt(r.ece) }}</td><td>{{ fmt(r.accuracy) }}</td>
{% for c, op in r.operating_points.items() %}<td>{{ fmt(op.sensitivity) }} / {{ fmt(op.specificity) }}{% if op.get("fitted_here") %} (fitted here){% endif %}</td>{% endfor %}</tr>
{% for n, e in r.external.items() %}<tr><td>{{ n }}</td><td>{{ e.n }}</td><td>{{ fmt(e.balanced_accuracy) }} {{ ci(e.intervals.balanced_accuracy) }}</td>
<td>{{ fmt(e.macro_f1) }}</td><td>{{ fmt(e.macro_auroc) }} {{ ci(e.intervals.macro_auroc) }}</td><td>{{ fmt(e.ece) }}</td><td>{{ fmt(e.accuracy) }}</td>
{% for c in r.operating_points %}{% set op = e.operating_points.get(c, {}) %}<td>{{ fmt(op.sensitivity) }} / {{ fmt(op.specificity) }}{% if op.get("fitted_here") %} (fitted here){% endif %}</td>{% endfor %}</tr>{% endfor %}</table>
<table class="num"><tr><th>sensitivity per class</th><th>this split</th>{% for n in r.external %}<th>{{ n }}</th>{% endfor %}</tr>
{% for c in r.classes %}<tr><td>{{ name(c) }}</td><td>{{ fmt(r.per_class[c].sensitivity) }}</td>
{% for n, e in r.external.items() %}{% set m = e.per_class.get(c, {}) %}<td>{{ fmt(m.sensitivity) }} <span class="muted">({{ m.support or 0 }})</span></td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if r.operating_points %}<h2>Operating points</h2>
<p class="muted">An image is flagged when the class probability reaches the threshold, whatever the top class is.
The threshold was chosen for the target sensitivity on the images named under "fitted on"; below is what it gives on these data.</p>
<table><tr><th>class</th><th>threshold</th><th>fitted on</th><th>target sensitivity</th><th>sensitivity there</th><th>specificity there</th>
<th>sensitivity here</th><th>specificity here</th><th>flagged</th></tr>
{% for c, op in r.operating_points.items() %}{% set s = op.get("site") or {} %}<tr><td>{{ name(c) }}</td><td>{{ "%.4f"|format(op.threshold) }}</td>
<td>{{ op.get("fitted_on") or "validation" }}</td><td>{{ fmt(op.target_sensitivity) }}</td>
<td>{{ fmt(s.sensitivity if op.get("site") else op.valid_sensitivity) }}</td><td>{{ fmt(s.specificity if op.get("site") else op.valid_specificity) }}</td>
<td>{{ fmt(op.sensitivity) }}{% if op.get("fitted_here") %} <b>(fitted on these images)</b>{% endif %}</td><td>{{ fmt(op.specificity) }}</td><td>{{ op.flagged }}</td></tr>{% endfor %}</table>
{% for c, op in r.operating_points.items() %}{% if op.get("fitted_here") %}<p><b>The {{ name(c) }} threshold was fitted on these very images</b> (<code>dermaclass calibrate --site</code>):
its sensitivity and specificity here are what it was fitted to give, not a measurement. Measure it on other labelled images.</p>{% endif %}{% endfor %}{% endif %}
<h2>Confusion matrix</h2><img class="fig" alt="confusion matrix" src="{{ confusion }}">
<h2>Per class</h2>
<table class="num"><tr><th>class</th><th>support</th><th>precision</th><th>sensitivity</th><th>95% CI</th><th>specificity</th><th>95% CI</th>
<th>F1</th><th>AUROC</th><th>AP</th></tr>
{% for c in r.classes %}{% set m = r.per_class[c] %}{% set iv = r.intervals.per_class[c] %}<tr><td>{{ name(c) }}{% if m.support and m.support < min_support %} <i class="muted">(too few to judge)</i>{% endif %}</td><td>{{ m.support }}</td>
<td>{{ fmt(m.precision) }}</td><td>{{ fmt(m.sensitivity) }}</td><td>{{ ci(iv.sensitivity) }}</td><td>{{ fmt(m.specificity) }}</td>
<td>{{ ci(iv.specificity) }}</td><td>{{ fmt(m.f1) }}</td><td>{{ fmt(m.auroc) }}</td><td>{{ fmt(m.average_precision) }}</td></tr>{% endfor %}</table>
<p class="muted">n/c: not computable (for example, a class with no images in these data has no sensitivity).</p>
<h2>Most confused pairs</h2>
<table class="text"><tr><th>true</th><th>predicted as</th><th>images</th><th>share of the true class</th></tr>
{% for p in r.confused_pairs %}<tr><td>{{ name(p.true) }}</td><td>{{ name(p.predicted) }}</td><td>{{ p.count }}</td><td>{{ fmt(p.share_of_true, True) }}</td></tr>{% endfor %}</table>
<h2>Calibration</h2>
{% if r.calibration.fitted_on %}<p>Temperature {{ "%.3f"|format(r.calibration.temperature) }} (fitted on the {{ r.calibration.fitted_on }} split):
expected calibration error {{ fmt(r.calibration.ece_uncalibrated) }} before, {{ fmt(r.calibration.ece_calibrated) }} after.
{% if r.calibration.prior_shift %}Prior shift: tau {{ "%.1f"|format(r.calibration.prior_shift.tau) }} &times; log(train prior) added to the
calibrated logits before the decision (fitted on the validation split for {{ name(r.calibration.prior_shift["class"]) }} sensitivity
{{ r.calibration.prior_shift.target_sensitivity }}).{% endif %}</p>
{% else %}<p><b>Not calibrated:</b> this bundle has no temperature (trained before calibration was added); expected
calibration error {{ fmt(r.calibration.ece_uncalibrated) }}.</p>{% endif %}
<img class="fig" style="max-width:460px" alt="reliability diagram" src="{{ reliability }}">
{% if tradeoff %}<h2>Operating points: the trade-off</h2>
<p>Sensitivity against specificity as the threshold moves, on the predictions the threshold was fitted on (when the bundle
keeps them), this split and each external set; the dots are the stored threshold. A threshold that meets its target inside
may not hold on another clinic's images: pick yours with these curves in view.</p>
<img class="fig" style="max-width:900px" alt="operating point trade-off curves" src="{{ tradeoff }}">{% endif %}
<h2>Most confident errors</h2>
<div class="gallery">{% for e in gallery %}<figure><img src="{{ e.uri }}" alt="{{ e.image }}" width="160">
<figcaption><b>{{ e.image }}</b><br>true: {{ name(e.true) }}<br>predicted: {{ name(e.predicted) }} ({{ fmt(e.p_predicted, True) }})<br>
P(true) {{ fmt(e.p_true, True) }}</figcaption></figure>{% endfor %}</div>
{% if r.worst_errors and not gallery %}<p class="muted">Thumbnails left out of this copy of the report (the images are not
ours to publish); the images:</p><table class="text"><tr><th>image</th><th>true</th><th>predicted</th><th>P(predicted)</th></tr>
{% for e in r.worst_errors %}<tr><td>{{ e.image }}</td><td>{{ name(e.true) }}</td><td>{{ name(e.predicted) }}</td><td>{{ fmt(e.p_predicted, True) }}</td></tr>{% endfor %}</table>
{% elif not r.worst_errors %}<p>No errors.</p>{% endif %}
</body></html>
"""

_HEADLINE = [
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro-F1"),
    ("macro_auroc", "macro AUROC"),
    ("accuracy", "accuracy"),
]
_EXTRA = [
    ("mAP", "mAP (mean average precision)"),
    ("top2_accuracy", "top-2 accuracy"),
    ("log_loss", "log-loss"),
    ("ece", "expected calibration error"),
]


def jinja_env():
    import jinja2

    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def render_html(
    report: dict[str, Any],
    *,
    confusion: bytes,
    reliability: bytes,
    thumbnails: dict[int, bytes],
    tradeoff: bytes | None = None,
) -> str:
    """The self-contained HTML report."""
    names = report.get("class_names", {})
    gallery = [{**e, "uri": uri(thumbnails[e["row"]])} for e in report["worst_errors"] if e["row"] in thumbnails]
    return (
        jinja_env()
        .from_string(_REPORT_TEMPLATE)
        .render(
            r=report,
            css=CSS,
            headline=_HEADLINE,
            extra=_EXTRA,
            fmt=fmt,
            ci=ci,
            gallery=gallery,
            name=lambda c: f"{names.get(c, c)} ({c})" if names.get(c, c) != c else c,
            confusion=uri(confusion),
            reliability=uri(reliability),
            min_support=MIN_SUPPORT,
            tradeoff=uri(tradeoff) if tradeoff else None,
        )
    )


def write_report(evaluation: Any, out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Write predictions.csv, report.json, report.html and the PNG figures (atomically)."""
    out = Path(out_dir)
    if not force and any((out / f).exists() for f in REPORT_FILES):
        raise FileExistsError(f"{out}: a report is already there")
    out.mkdir(parents=True, exist_ok=True)
    report = evaluation.report.to_dict()  # the typed record, rendered (and written) as its JSON dict
    confusion, reliability = confusion_png(report), reliability_png(report)
    thumbs = (
        {e["row"]: thumbnail_png(evaluation.images[e["row"]]) for e in report["worst_errors"]}
        if report.get("gallery_images", True)
        else {}
    )
    paths = {name: out / name for name in (*REPORT_FILES, "reliability.png")}
    with atomic_path(paths["predictions.csv"]) as tmp:
        evaluation.predictions.to_csv(tmp, index=False, float_format="%.6f")
    tradeoff = tradeoff_png(report)
    figures = [("confusion_matrix.png", confusion), ("reliability.png", reliability)]
    if tradeoff is not None:
        figures.append(("tradeoff.png", tradeoff))
        paths["tradeoff.png"] = out / "tradeoff.png"
    for name, png in figures:
        with atomic_path(paths[name]) as tmp:
            Path(tmp).write_bytes(png)
    write_text(
        paths["report.html"],
        render_html(report, confusion=confusion, reliability=reliability, thumbnails=thumbs, tradeoff=tradeoff),
    )
    write_json(paths["report.json"], report)  # last: its presence marks a complete report
    return paths

"""What a retraining changed: paired deltas between two evaluate folders, and the drop flag.

``compare_reports`` recomputes both models' figures from their ``predictions.csv`` with one
*paired* grouped bootstrap (the same resampled lesions for the old and the new model), so a
delta's interval reflects the models' difference and not two independent samplings. A
class's sensitivity drop is flagged when its whole delta interval lies below zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import dermaclass
from dermaclass.errors import CompareError
from dermaclass.evaluate.metrics import (
    INTERVAL_KEYS,
    MIN_SUPPORT,
    PER_CLASS_INTERVAL_KEYS,
    classification_metrics,
    metric_draws,
    percentile_interval,
    resample_weights,
)
from dermaclass.evaluate.record import REPORT_FILE, Report, read_report
from dermaclass.fileio import atomic_path, write_json, write_text
from dermaclass.report.figures import ci, difference_png, fmt, uri
from dermaclass.report.html import CSS, jinja_env


def load_report(folder: str | Path) -> tuple[Report, pd.DataFrame]:
    """A report folder's checked ``Report`` and its predictions.csv."""
    folder = Path(folder)
    paths = [folder / REPORT_FILE, folder / "predictions.csv"]
    if not paths[0].is_file():
        raise CompareError(
            f"{folder}: not an evaluate output folder (no {REPORT_FILE}); run `dermaclass evaluate` first"
        )
    report = read_report(folder)
    if not paths[1].is_file():
        # A published report (e.g. the bundled model's) leaves out per-image predictions: their labels
        # are the dataset's metadata, which is not redistributed.
        raise CompareError(
            f"{folder}: this report was published without predictions.csv (the per-image labels are "
            f"the dataset's, not redistributed), so it cannot be compared; recreate it with `dermaclass "
            f"evaluate {report.model.get('bundle', 'MODEL')} {report.data.get('root', 'DATA')} "
            f"--out {folder} --force`"
        )
    try:
        preds = pd.read_csv(paths[1], dtype={"image": str, "group": str, "label": str, "predicted": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CompareError(f"{paths[1]}: unreadable predictions ({exc})") from exc
    missing = [f"p_{c}" for c in report.classes if f"p_{c}" not in preds.columns]
    if missing:
        raise CompareError(f"{paths[1]}: lacks probability columns {missing}")
    return report, preds


def _probs(preds: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities over ``classes``; a class the model lacks has probability 0."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(preds["label"]) - set(index))
    if unknown:
        raise CompareError(f"predictions hold labels {unknown} outside the classes {classes}")
    probs = np.stack(
        [preds[f"p_{c}"].to_numpy(dtype=float) if f"p_{c}" in preds else np.zeros(len(preds)) for c in classes], axis=1
    )
    return preds["label"].map(index).to_numpy(), probs


def compare_reports(
    old_dir: str | Path,
    new_dir: str | Path,
    *,
    force: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Metric deltas NEW - OLD with paired bootstrap intervals, and flagged sensitivity drops.

    A class's sensitivity drop is flagged when the whole interval of its delta lies below
    zero: the drop is larger than resampling lesions can explain.
    """
    old, old_p = load_report(old_dir)
    new, new_p = load_report(new_dir)
    # A retrained model may have grown classes: compare over the union; a model never
    # predicts a class it lacks (probability 0), which is exactly how it behaves in use.
    classes = list(new.classes) + [c for c in old.classes if c not in new.classes]
    same = old.data.get("images_sha256") == new.data.get("images_sha256")
    if not same and not force:
        raise CompareError(
            f"{old_dir} ({old.n} images, {old.data.get('split')} split of {old.data.get('root')}) and {new_dir} "
            f"({new.n} images, {new.data.get('split')} split of {new.data.get('root')}) are on different test "
            "sets, so a difference in the figures would mix the model change with the data change; evaluate both "
            "models on the same split, or pass --force"
        )
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
        d_old = metric_draws(
            y_old,
            p_old,
            classes,
            resample_weights(old_p["group"].astype(str).to_numpy(), len(old_p), n_boot=n_boot, seed=seed),
        )
        d_new = metric_draws(
            y_new,
            p_new,
            classes,
            resample_weights(new_p["group"].astype(str).to_numpy(), len(new_p), n_boot=n_boot, seed=seed + 1),
        )

    def delta(a, b):
        return None if a is None or b is None else b - a

    overall = {
        k: {
            "old": m_old[k],
            "new": m_new[k],
            "delta": delta(m_old[k], m_new[k]),
            "delta_interval": percentile_interval(d_new["overall"][k] - d_old["overall"][k], level),
        }
        for k in INTERVAL_KEYS
    }
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
        # A class with a handful of test images cannot show a drop: one image moves its
        # sensitivity by 1.0 and its bootstrap interval collapses to a point.
        row["too_few"] = min(row["support_old"], row["support_new"]) < MIN_SUPPORT
        row["sensitivity_drop"] = bool(
            not row["too_few"] and sens["delta_interval"] is not None and sens["delta_interval"][1] < 0
        )
        if row["sensitivity_drop"]:
            flagged.append(c)
        per_class[c] = row
    return {
        "format": 1,
        "dermaclass_version": dermaclass.__version__,
        "old": {"folder": str(old_dir), "model": old.model, "data": old.data},
        "new": {"folder": str(new_dir), "model": new.model, "data": new.data},
        "same_test_set": same,
        "paired": paired,
        "forced": bool(force and not same),
        "bootstrap": {"n_boot": n_boot, "level": level, "resampled": "groups"},
        "classes": classes,
        "class_names": {**old.class_names, **new.class_names},
        "classes_added": [c for c in new.classes if c not in old.classes],
        "classes_removed": [c for c in old.classes if c not in new.classes],
        "overall": overall,
        "per_class": per_class,
        "sensitivity_drops": flagged,
        "too_few_to_judge": [c for c, r in per_class.items() if r["too_few"]],
        "min_support": MIN_SUPPORT,
        "confusion_old": m_old["confusion_matrix"],
        "confusion_new": m_new["confusion_matrix"],
    }


_COMPARE_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dermaclass: model comparison</title><style>{{ css }}</style></head><body>
<h1>What the retraining changed</h1>
<div class="banner"><b>Decision support, not a diagnostic device.</b> Compare before replacing a model in use.</div>
{% if alert %}<div class="alert">{{ alert }}</div>
{% else %}<p>No class's sensitivity dropped beyond its {{ (c.bootstrap.level*100)|round|int }}% interval.</p>{% endif %}
{% if not c.same_test_set %}<div class="alert">The two reports are on different test sets (compared with --force): deltas mix model and data changes.</div>{% endif %}
<table><tr><th></th><th>old</th><th>new</th></tr>
<tr><td>model</td><td>{{ c.old.model.bundle }} <code>{{ c.old.model.weights_sha256[:12] }}</code></td><td>{{ c.new.model.bundle }} <code>{{ c.new.model.weights_sha256[:12] }}</code></td></tr>
<tr><td>data</td><td>{{ c.old.data.split }}: {{ c.old.data.n }} images</td><td>{{ c.new.data.split }}: {{ c.new.data.n }} images</td></tr></table>
<h2>Overall</h2><table><tr><th>figure</th><th>old</th><th>new</th><th>delta</th><th>delta interval</th></tr>
{% for k, v in c.overall.items() %}<tr><td>{{ k }}</td><td>{{ fmt(v.old) }}</td><td>{{ fmt(v.new) }}</td><td>{{ sgn(v.delta) }}</td><td>{{ ci(v.delta_interval) }}</td></tr>{% endfor %}</table>
<h2>Per class</h2><table><tr><th>class</th><th>sensitivity old</th><th>new</th><th>delta [interval]</th><th>specificity old</th><th>new</th><th>delta [interval]</th><th>F1 delta</th><th>AUROC delta</th></tr>
{% for k, v in c.per_class.items() %}<tr{% if v.sensitivity_drop %} class="drop"{% endif %}><td>{{ name(k) }}{% if v.sensitivity_drop %} &#9888;{% endif %}{% if v.too_few %} <i>(too few test images to judge: {{ v.support_old }} / {{ v.support_new }})</i>{% endif %}</td>
<td>{{ fmt(v.sensitivity.old) }}</td><td>{{ fmt(v.sensitivity.new) }}</td><td>{{ sgn(v.sensitivity.delta) }} {{ ci(v.sensitivity.delta_interval) }}</td>
<td>{{ fmt(v.specificity.old) }}</td><td>{{ fmt(v.specificity.new) }}</td><td>{{ sgn(v.specificity.delta) }} {{ ci(v.specificity.delta_interval) }}</td>
<td>{{ sgn(v.f1.delta) }}</td><td>{{ sgn(v.auroc.delta) }}</td></tr>{% endfor %}</table>
<h2>Confusion matrix difference</h2><img class="fig" alt="confusion matrix difference" src="{{ diff }}">
</body></html>
"""


def drop_alert(result: dict[str, Any]) -> str | None:
    """The one warning every surface shows (CLI, app, HTML) when a class's sensitivity dropped
    beyond its interval; None when none did."""
    drops = result.get("sensitivity_drops") or []
    if not drops:
        return None
    names = result.get("class_names") or {}
    listed = ", ".join(f"{names.get(c, c)} ({c})" if names.get(c, c) != c else c for c in drops)
    return (
        f"SENSITIVITY DROP in {listed}: the new model misses more of these lesions than resampling explains. "
        "Review before replacing the model in use."
    )


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
    diff = difference_png(
        {"confusion_matrix": result["confusion_old"]},
        {"confusion_matrix": result["confusion_new"]},
        result["classes"],
        cn,
    )
    with atomic_path(names["png"]) as tmp:
        Path(tmp).write_bytes(diff)
    html = (
        jinja_env()
        .from_string(_COMPARE_TEMPLATE)
        .render(
            c=result,
            css=CSS,
            fmt=fmt,
            ci=ci,
            sgn=_sgn,
            diff=uri(diff),
            alert=drop_alert(result),
            name=lambda c: f"{cn.get(c, c)} ({c})" if cn.get(c, c) != c else c,
        )
    )
    write_text(names["html"], html)
    write_json(names["json"], result)
    return names

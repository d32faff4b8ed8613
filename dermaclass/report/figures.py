"""Figures for reports, rendered from report dicts: confusion matrices, reliability, differences.

The confusion-matrix layout follows the 10-class dermatology matrix of seed 003: counts and
row-normalised side by side, with full class names, readable at 7-10 classes.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np


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


def _matrix_panel(
    ax,
    mat: np.ndarray,
    labels: list[str],
    *,
    fmt,
    title: str,
    cmap: str,
    vmin=None,
    vmax=None,
    colours: np.ndarray | None = None,
) -> None:
    """``colours``: what the colour shows when it differs from the printed values."""
    k = len(labels)
    colours = mat if colours is None else colours
    im = ax.imshow(colours, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(k), labels, rotation=40, ha="right", fontsize=9)
    ax.set_yticks(range(k), labels, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    lo, hi = im.get_clim()
    for i in range(k):
        for j in range(k):
            v, c = mat[i, j], colours[i, j]
            if np.isnan(v):
                text, dark = "n/c", False
            else:
                text = fmt(v)
                if lo < 0 < hi:  # diverging map: both ends are dark
                    dark = abs(c) > 0.55 * max(abs(lo), abs(hi))
                else:
                    dark = abs(c - lo) > 0.6 * (hi - lo) if hi > lo else False
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
    _matrix_panel(
        b,
        norm,
        labels,
        fmt=lambda v: f"{v:.0%}",
        title="row-normalised (recall on the diagonal)",
        cmap="Blues",
        vmin=0,
        vmax=1,
    )
    fig.suptitle(
        f"{report['data']['split']} split, {report['n']} images; balanced accuracy "
        f"{fmt(report.get('balanced_accuracy'))}"
    )
    fig.tight_layout()
    return _png(fig)


def reliability_png(report: dict[str, Any]) -> bytes:
    """Reliability diagram before and after temperature scaling."""
    plt = _plt()
    cal = report["calibration"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for key, label, colour in (
        ("reliability_uncalibrated", f"uncalibrated (ECE {fmt(cal['ece_uncalibrated'])})", "C1"),
        ("reliability_calibrated", f"T = {cal['temperature']:.2f} (ECE {fmt(cal['ece_calibrated'])})", "C0"),
    ):
        bins = [b for b in cal[key] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour, label=label)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def tradeoff_png(report: dict[str, Any]) -> bytes | None:
    """Per operating class: sensitivity against specificity over thresholds on the predictions the
    point was fitted on (when the bundle keeps them), this split and each external set, with the
    stored threshold marked on each, so a clinic can see what moving it buys before it does.
    None when no curve is recorded."""
    points = report.get("operating_points") or {}
    wanted = [c for c, op in points.items() if op.get("curve")]
    if not wanted:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(wanted), figsize=(5 * len(wanted), 4.5), squeeze=False)
    for ax, c in zip(axes[0], wanted):
        op = points[c]
        sets = [
            ("fitted on (out-of-fold)", op.get("fitted_curve"), None),
            (f"this split ({report.get('data', {}).get('split')})", op["curve"], op),
            *(
                (
                    name,
                    (e.get("operating_points") or {}).get(c, {}).get("curve"),
                    (e.get("operating_points") or {}).get(c),
                )
                for name, e in (report.get("external") or {}).items()
            ),
        ]
        for i, (label, curve, at) in enumerate(x for x in sets if x[1]):
            ax.plot(curve["specificity"], curve["sensitivity"], color=f"C{i}", lw=1.4, label=label)
            if at and at.get("sensitivity") is not None and at.get("specificity") is not None:
                ax.plot(at["specificity"], at["sensitivity"], "o", color=f"C{i}", ms=6)
        ax.set_xlim(1.0, 0.0)  # specificity falls as the threshold drops: read left to right
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("specificity")
        ax.set_ylabel(f"{c} sensitivity")
        ax.set_title(f"{c}: threshold {op.get('threshold', float('nan')):.3f} (dots)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _png(fig)


def improvement(diff: np.ndarray) -> np.ndarray:
    """Signed goodness of a confusion-matrix change: a rise on the diagonal (recall) is good, a
    rise off it (a new confusion) is bad. The difference map is coloured by this (red < 0)."""
    diff = np.asarray(diff, dtype=float)
    return np.where(np.eye(len(diff), dtype=bool), diff, -diff)


def difference_png(old: dict, new: dict, classes: list[str], names: dict[str, str]) -> bytes:
    """Row-normalised confusion matrix of NEW minus OLD; red is worse, blue better (a rise on the
    diagonal is better, a rise off it is worse), whatever the sign of the printed change."""
    plt = _plt()

    def norm(cm):
        cm = np.asarray(cm, dtype=float)
        rows = cm.sum(axis=1, keepdims=True)
        return np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)

    diff = norm(new["confusion_matrix"]) - norm(old["confusion_matrix"])
    side = 2.5 + 0.62 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    lim = max(0.05, float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.05)
    better = improvement(diff)
    _matrix_panel(
        ax,
        diff,
        _labels(classes, names),
        fmt=lambda v: f"{v:+.0%}",
        cmap="RdBu",
        vmin=-lim,
        vmax=lim,
        colours=better,
        title="row-normalised, new minus old (red: worse, blue: better)",
    )
    fig.tight_layout()
    return _png(fig)


def thumbnail_png(image: np.ndarray, *, width: int = 160) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    """A figure as every report, card and app table shows it: 'n/c' when not computable."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/c"
    return f"{v:.1%}" if pct else f"{v:.{digits}f}"


def ci(iv: list[float] | None, digits: int = 3) -> str:
    """A bootstrap interval as '[lo, hi]', or '' when there is none."""
    return "" if not iv else f"[{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]"


def fmt_ci(v: Any, iv: list[float] | None = None, *, digits: int = 3, iv_digits: int | None = None) -> str:
    """A figure and its interval, '0.694 [0.650, 0.731]' (the figure alone when there is none)."""
    return fmt(v, digits=digits) + (f" {ci(iv, iv_digits or digits)}" if iv else "")

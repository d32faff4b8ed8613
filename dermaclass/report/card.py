"""The model card (MODEL_CARD.md), rendered from a bundle's ``BundleMeta`` and its test ``Report``
through the Jinja template ``templates/model_card.md.j2``.

Every figure in the card comes from those two records, so the card can be regenerated after
any retraining and never drifts from the model it describes. The card states the intended
use, that this is not a medical device, the training data and its licence, metrics with
intervals per class, the failure modes the report shows, and how to retrain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dermaclass import DISCLAIMER
from dermaclass.evaluate.metrics import MIN_SUPPORT
from dermaclass.evaluate.record import Report
from dermaclass.report.figures import fmt, fmt_ci
from dermaclass.serving.refer import MIN_SIDE

if TYPE_CHECKING:  # the card renders records; it needs no torch
    from dermaclass.models.meta import BundleMeta


HAM10000_LICENSE = "CC BY-NC 4.0"
RECIPES = {
    "stepwise": "seed 001 stepwise subsets, seed 003 SGDR + differential LRs",
    "sgdr": "seed 003 SGDR + differential LRs",
    "baseline": "one-cycle fit after a frozen head fit",
}


def _data_facts(meta: BundleMeta, data_card: str | None) -> dict[str, Any]:
    """What the card may say about the training data: from the data card the run names (its
    licence line), and HAM10000's published facts only when the data are HAM10000."""
    import re
    from pathlib import Path

    data = meta.data
    card = data_card or data.get("data_card")
    sources = [str(s) for s in data.get("sources") or []]
    ham = any("ham10000" in s.lower() for s in [*sources, card or ""])
    licence = HAM10000_LICENSE if ham else None
    if card and Path(card).is_file():
        found = re.search(r"^##\s*Licen[cs]e\s*\n+\*\*(.+?)\*\*", Path(card).read_text(encoding="utf-8"), re.M)
        licence = found.group(1).strip() if found else licence
    return {"ham10000": ham, "licence": licence, "card": card, "sources": sources}


def _largest(r: Report, names: dict[str, str]) -> str:
    support = {c: (r.per_class[c].get("support") or 0) for c in r.classes}
    c = max(support, key=support.get)
    return f"{names.get(c, c)}, {support[c] / max(1, sum(support.values())):.0%} of this split"


#: What the referral's out-of-distribution score is, by method (model.json ``calibration.refer.ood.method``).
OOD_SCORES = {
    "knn": "a k-nearest-neighbour out-of-distribution score on pooled backbone features (Sun et al. 2022)",
    "mahalanobis": "a Mahalanobis out-of-distribution score on pooled backbone features (Lee et al. 2018)",
    "energy": "an energy score (Liu et al. 2020)",
    "members": "the ensemble's out-of-distribution score (the mean of its members' margins above their own "
    "cut-offs, each member's score fitted on its training folds)",
}
#: The test report's headline figures, in the card's order (plain accuracy last: it flatters).
HEADLINE = (
    ("balanced_accuracy", "balanced accuracy (mean sensitivity)"),
    ("macro_f1", "macro-F1"),
    ("macro_auroc", "macro AUROC"),
    ("mAP", "mAP"),
    ("top2_accuracy", "top-2 accuracy"),
    ("ece", "expected calibration error"),
    ("accuracy", "accuracy"),
)


def _template() -> Any:
    import jinja2

    # Markdown, not HTML: no escaping; StrictUndefined so a missing field fails loudly in tests.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dermaclass.report", "templates"),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template("model_card.md.j2")


def _options(cfg: dict[str, Any]) -> str:
    """The recipe's optional levers that are on, as the card's recipe line ends."""
    out = ""
    if cfg.get("histo_weight", 1) != 1:
        out += f", histopathology-confirmed images sampled x{cfg['histo_weight']:g}"
    if cfg.get("mix", "none") != "none":
        out += f", mixing `{cfg['mix']}`"
    if cfg.get("sam_rho"):
        out += f", SAM (rho {cfg['sam_rho']:g})"
    return out


def model_card_markdown(meta: BundleMeta, report: Report | None, *, name: str, data_card: str | None = None) -> str:
    """The card as Markdown (templates/model_card.md.j2), from the bundle's records only;
    ``report`` is the evaluation of the test split (or None)."""
    names = meta.names
    cfg = meta.config
    cal = meta.calibration
    classes = list(meta.classes)
    facts = _data_facts(meta, data_card)
    sizes = [m["input_size"] for m in meta.members] if meta.is_ensemble else [meta.input_size]
    points = {c: op for c, op in meta.operating_points.items() if op.get("threshold") is not None}
    context: dict[str, Any] = {
        "name": name,
        "disclaimer": DISCLAIMER,
        "m": meta,
        "cfg": cfg,
        "cal": cal,
        "data": facts,
        "training": meta.training,
        "label": lambda c: names.get(c, c),
        "label_name": lambda c: names.get(c, c),
        "fmt": fmt,
        "fmt_ci": fmt_ci,
        "nan": float("nan"),
        "flagged": [names.get(c, c) for c in points],
        "arch": meta.arch if not meta.is_ensemble else meta.members[0].get("arch"),
        "start": f"started from the bundle `{cfg['init_bundle']}`"
        if cfg.get("init_bundle")
        else "ImageNet-pretrained"
        if cfg.get("pretrained", True)
        else "trained from random initialisation",
        "recipe": RECIPES.get(str(meta.recipe), "see model.json"),
        "base_lr": f"range test ({cfg.get('lr_suggestion')})" if cfg.get("lr") is None else cfg.get("lr"),
        "options": _options(cfg),
        "fitted_on": "validation split" if cal.get("fitted_on", "valid") == "valid" else cal["fitted_on"],
        # Where the thresholds' own figures come from: the valid split, or the out-of-fold pool.
        "val": "validation" if cal.get("fitted_on", "valid") == "valid" else "out-of-fold",
        "shift": cal.get("prior_shift"),
        "points": points,
        # An image as large as the network's input is never too small (the Predictor's rule).
        "min_side": min(MIN_SIDE, *(min(s) for s in sizes)),
        "ood_score": OOD_SCORES.get(meta.ood.get("method", "energy"), meta.ood.get("method")),
        "split": meta.data.get("split_counts") or {},
        "r": report,
        "min_support": MIN_SUPPORT,
        "headline": HEADLINE,
    }
    if report:
        r = report
        own = "HAM10000 test split" if facts["ham10000"] else "test split"
        support = {c: r.per_class[c].get("support") or 0 for c in r.classes}
        context |= {
            "largest": _largest(r, names),
            # The class the prior shift protects (the majority class a model overcalls), shown on every set.
            "watch": cfg.get("prior_class") if cfg.get("prior_class") in classes else None,
            "external": [
                (own, {**r.metrics, "operating_points": r.operating_points}, r.overall_intervals),
                *((k, e, e.get("intervals", {})) for k, e in r.external.items()),
            ]
            if r.external
            else [],
            "weakest": sorted(
                (c for c in r.classes if r.per_class[c]["sensitivity"] is not None),
                key=lambda c: r.per_class[c]["sensitivity"],
            )[:3],
            # The two classes with the fewest test images: their intervals are the widest.
            "small": [names.get(c, c) for c in sorted(support, key=support.get)[:2]] if len(support) > 2 else [],
        }
    # one final newline whichever branch the template ended in (trim_blocks eats the one after a tag)
    return _template().render(**context).rstrip("\n") + "\n"

"""The model card (MODEL_CARD.md), rendered from a bundle's ``BundleMeta`` and its test ``Report``.

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

if TYPE_CHECKING:  # the card renders records; it needs no torch
    from dermaclass.models.bundle import BundleMeta


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


def model_card_markdown(meta: BundleMeta, report: Report | None, *, name: str, data_card: str | None = None) -> str:
    """The card as Markdown, from the bundle's records only; ``report`` is the evaluation of
    the test split (or None)."""
    names = meta.names
    classes = meta.classes
    cfg = meta.config
    facts = _data_facts(meta, data_card)
    train = meta.training
    cal = meta.calibration
    lines = [
        f"# Model card: {name}",
        "",
        f"> **Not a medical device.** {DISCLAIMER}",
        "",
        "## Intended use",
        "Decision support for clinicians who read dermoscopic images of pigmented skin lesions: a second look "
        "that ranks the likely diagnoses, flags possible melanoma, and says when to refer. Out of scope: "
        "diagnosis without a clinician, clinical (non-dermoscopic) photographs, mucosal or nail lesions, and "
        "populations or skin types the training data does not cover"
        + (
            " (HAM10000 comes from two centres, Vienna and Queensland, mostly light skin)."
            if facts["ham10000"]
            else " (see the data card for who the training images come from)."
        ),
        "",
        "## Model",
        (
            f"- a deep ensemble of {len(meta.members)} networks (Lakshminarayanan et al. 2017), cross-fitted: each "
            "trained on the other folds of the train+valid pool and picked its checkpoint on its own fold; the served "
            "logits are the mean of theirs: "
            + "; ".join(
                f"`{m['path']}` {m.get('arch')} {m['input_size'][0]}x{m['input_size'][1]} (seed {m.get('seed')}, "
                f"fold {m.get('fold')}, fold balanced accuracy {fmt(m.get('valid_balanced_accuracy'))})"
                for m in meta.members
            )
            if meta.is_ensemble
            else None
        ),
        f"- architecture: `{meta.arch if not meta.is_ensemble else meta.members[0].get('arch')}` (timm), "
        + (
            f"started from the bundle `{cfg['init_bundle']}`"
            if cfg.get("init_bundle")
            else "ImageNet-pretrained"
            if cfg.get("pretrained", True)
            else "trained from random initialisation"
        )
        + f", input {meta.input_size[0]}x{meta.input_size[1]} "
        f"RGB, normalisation mean {meta.normalization['mean']} std {meta.normalization['std']}",
        f"- classes ({len(classes)}): " + ", ".join(f"{names.get(c, c)} (`{c}`)" for c in classes),
        (
            f"- weights: `members/mK/model.safetensors` ({meta.weights_dtype}), one per network, each with its "
            "`model.json`; the top `model.json` lists them with their sha256; never a pickle"
            if meta.is_ensemble
            else f"- weights: `model.safetensors` ({meta.weights_dtype}), metadata `model.json`; never a pickle"
        ),
        f"- recipe: `{meta.recipe}` ({RECIPES.get(str(meta.recipe), 'see model.json')}), "
        f"LR rule `{cfg.get('lr_rule')}`, base LR "
        f"{'range test (' + str(cfg.get('lr_suggestion')) + ')' if cfg.get('lr') is None else cfg.get('lr')}, "
        f"imbalance `{cfg.get('imbalance')}`, augmentation `{cfg.get('augment')}`"
        + (
            f", histopathology-confirmed images sampled x{cfg['histo_weight']:g}"
            if cfg.get("histo_weight", 1) != 1
            else ""
        )
        + (f", mixing `{cfg['mix']}`" if cfg.get("mix", "none") != "none" else "")
        + (f", SAM (rho {cfg['sam_rho']:g})" if cfg.get("sam_rho") else ""),
        f"- preprocessing: colour constancy `{meta.colour_constancy}` "
        f"(the same at training and inference); test-time augmentation "
        + (
            "`flips4` (the mean of the logits of the image and its three flips; calibration, referral and "
            "operating points were fitted on the same averaged logits)"
            if meta.tta == "flips4"
            else "none"
        ),
        f"- training: {train.get('seconds', 0) / 60:.1f} min on {meta.machine.get('cpus', '?')} CPU cores, "
        f"{train.get('images_seen', 0):,} images seen ({train.get('epochs_equivalent', '?')} full-data epochs)",
        f"- calibration: temperature {meta.temperature:.3f} fitted on "
        + ("the validation split " if cal.get("fitted_on", "valid") == "valid" else f"the {cal['fitted_on']} ")
        + f"(ECE {fmt(cal.get('ece_before'))} -> {fmt(cal.get('ece_after'))})",
    ]
    if shift := cal.get("prior_shift"):
        lines.append(
            f"- prior shift: tau {shift['tau']:.1f} x log(train prior) added to the calibrated logits (logit "
            f"adjustment, Menon et al. 2021), so that `{shift['class']}` reaches validation sensitivity "
            f"{fmt(shift.get('valid_sensitivity'))} (from {fmt(shift.get('valid_sensitivity_before'))}; target "
            f"{shift['target_sensitivity']})" + ("" if shift.get("reached", True) else ", the most the grid allows")
        )
    for c, op in meta.operating_points.items():
        if op.get("threshold") is not None:
            lines.append(
                f"- operating point `{c}`: flag when P({c}) >= {op['threshold']:.4f} "
                f"(validation sensitivity {fmt(op.get('valid_sensitivity'))}, specificity {fmt(op.get('valid_specificity'))}, "
                f"target {op.get('target_sensitivity')})"
            )
    refer = meta.refer
    if refer:
        ood = meta.ood
        score = {
            "knn": "a k-nearest-neighbour out-of-distribution score on pooled backbone features (Sun et al. 2022)",
            "mahalanobis": "a Mahalanobis out-of-distribution score on pooled backbone features (Lee et al. 2018)",
            "energy": "an energy score (Liu et al. 2020)",
            "members": "the ensemble's out-of-distribution score (the mean of its members' margins above their own "
            "cut-offs, each member's score fitted on its training folds)",
        }.get(ood.get("method", "energy"), ood.get("method"))
        passed = f" (passed by {ood['keep']:.0%} of validation images)" if ood.get("keep") is not None else ""
        lines.append(
            f"- referral: images under 64 px refused; images mostly of one colour or with almost no colour "
            f"referred; then top probability below {refer.get('min_top_probability', 0):.0%}, or {score} "
            f"below {ood.get('threshold', float('nan')):.3f}{passed}; {refer.get('valid_referred', 0):.1%} of "
            "validation images are referred"
        )
    split = meta.data.get("split_counts") or {}
    lines += [
        "",
        "## Training data",
        (
            "HAM10000 (Tschandl et al., Scientific Data 2018)"
            if facts["ham10000"]
            else "The clinic's data: " + ", ".join(f"`{src}`" for src in facts["sources"])
        )
        + (
            f", licence **{facts['licence']}**"
            + (": this model inherits the non-commercial restriction" if "NC" in facts["licence"] else "")
            if facts["licence"]
            else "; licence not recorded (state it in a data card: `dermaclass data card`)"
        )
        + ". Split by lesion (no lesion on two sides): "
        + ", ".join(f"{k} {v:,}" for k, v in split.items())
        + " images; the split file is `split.csv` "
        "(image ids and split only)." + (f" Data card: `{facts['card']}`." if facts["card"] else ""),
    ]
    if report:
        r, iv, m = report, report.intervals, report.metrics
        lines += [
            "",
            f"## Performance on the held-out test split ({r.n:,} images, {r.data.get('groups', 0):,} lesions)",
            f"95 % intervals from {iv['n_boot']} bootstrap resamples of lesions. Plain accuracy is shown last "
            f"because it is dominated by the largest class ({_largest(r, names)}).",
            "",
            "| figure | value |",
            "|---|---|",
        ]
        for k, label in (
            ("balanced_accuracy", "balanced accuracy (mean sensitivity)"),
            ("macro_f1", "macro-F1"),
            ("macro_auroc", "macro AUROC"),
            ("mAP", "mAP"),
            ("top2_accuracy", "top-2 accuracy"),
            ("ece", "expected calibration error"),
            ("accuracy", "accuracy"),
        ):
            lines.append(f"| {label} | {fmt_ci(m.get(k), r.overall_intervals.get(k))} |")
        lines += [
            "",
            "| class | support | sensitivity | specificity | precision | F1 | AUROC |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in r.classes:
            pc, civ = r.per_class[c], (iv.get("per_class") or {}).get(c) or {}
            few = " (too few to judge)" if pc["support"] and pc["support"] < MIN_SUPPORT else ""
            lines.append(
                f"| {names.get(c, c)} (`{c}`){few} | {pc['support']} | {fmt_ci(pc['sensitivity'], civ.get('sensitivity'))} | "
                f"{fmt_ci(pc['specificity'], civ.get('specificity'))} | {fmt(pc['precision'])} | {fmt(pc['f1'])} | {fmt(pc['auroc'])} |"
            )
        for c, op in r.operating_points.items():
            lines.append(
                f"\nAt its operating point, `{c}` is flagged with sensitivity {fmt(op.get('sensitivity'))} and "
                f"specificity {fmt(op.get('specificity'))} on the test split ({op.get('flagged')} images flagged)."
            )
        if r.external:
            lines += [
                "",
                "## External validation (other clinics' images)",
                "Every image of labelled dermoscopy sets from outside the training data, same model and decision rule; nothing "
                "was fitted on them. Balanced accuracy is over the classes each set has. Expect figures nearer these "
                "than the internal test split on a new clinic's images.",
                "",
                "| set | images | balanced accuracy | macro AUROC | ECE | nevus sensitivity | melanoma sensitivity / "
                "specificity at the operating point |",
                "|---|---:|---|---|---:|---:|---|",
            ]
            own = "HAM10000 test split" if facts["ham10000"] else "test split"
            rows = [(own, {**m, "operating_points": r.operating_points}), *r.external.items()]
            for label, e in rows:
                ivs = r.overall_intervals if label == own else e.get("intervals", {})
                op = (e.get("operating_points") or {}).get("mel") or {}
                nv = (e.get("per_class") or {}).get("nv") or {}
                lines.append(
                    f"| {label} | {e['n']:,} | {fmt_ci(e.get('balanced_accuracy'), ivs.get('balanced_accuracy'))} | "
                    f"{fmt_ci(e.get('macro_auroc'), ivs.get('macro_auroc'))} | {fmt(e.get('ece'))} | "
                    f"{fmt(nv.get('sensitivity'))} | {fmt(op.get('sensitivity'))} / {fmt(op.get('specificity'))} |"
                )
        weakest = sorted(
            (c for c in r.classes if r.per_class[c]["sensitivity"] is not None),
            key=lambda c: r.per_class[c]["sensitivity"],
        )[:3]
        lines += ["", "## Known failure modes (from the test report)"]
        for p in r.confused_pairs[:5]:
            lines.append(
                f"- {names.get(p['true'], p['true'])} read as {names.get(p['predicted'], p['predicted'])}: "
                f"{p['count']} images ({p['share_of_true']:.0%} of that class)"
            )
        lines.append(
            "- lowest sensitivity: "
            + ", ".join(f"{names.get(c, c)} {r.per_class[c]['sensitivity']:.2f}" for c in weakest)
        )
        lines.append("- small classes (dermatofibroma, vascular lesions) have wide intervals: few test lesions")
    lines += [
        "",
        "## How to retrain",
        "```",
        "dermaclass data validate NEW_DATA",
        f"dermaclass retrain models/{name} ORIGINAL_DATA NEW_DATA review/ --out runs/NEW",
        "```",
        "`retrain` starts from these weights with the same recipe and split (no test image enters training), "
        "evaluates old and new on this model's test split and writes the comparison to `runs/NEW/compare/`; "
        "it exits with code 6 when a class's sensitivity dropped beyond its interval. Replace the model only "
        "when the comparison shows no drop.",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"

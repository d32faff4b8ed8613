"""Operating points refitted on a clinic's own labelled images (``dermaclass calibrate --site``).

A bundle's flag thresholds (e.g. melanoma at 90 % sensitivity) are fitted on its validation
split, or on an ensemble's out-of-fold predictions: HAM10000's images. They do not carry to
another clinic's camera and patients. On PH2 the ensembles' melanoma flag, at the threshold
fitted on HAM10000, gives sensitivity 0.93 and specificity 0.20, while PH2's own trade-off
curve allows 0.53 at sensitivity 0.85 for the mixed-size members (docs/decisions.md). The
usual remedy in deployment is a local threshold: the same network, the same calibrated
probabilities, and the threshold for the target sensitivity read off the clinic's own
labelled images (seed 002 fits its operating thresholds on held-out data in the same way).

Only the thresholds move. Temperature, prior shift, referral and weights stay as trained, so
exports stay valid and the class probabilities the app shows do not change. The images must
be the clinic's and new to the bundle: images listed in the bundle's ``split.csv`` are
refused, since a threshold fitted on what the network learned would be optimistic. The
benchmarks' external sets (derm7pt, isic2017, PH2) are for reporting, and nothing is fitted on
them; this is a clinic's tool. Each threshold records the set it came from (its content hash,
so that ``evaluate`` can say when it is shown the same images), the rates it gives there with
Wilson intervals, and the threshold it replaced.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermaclass import models
from dermaclass.config import Config
from dermaclass.data import read_split, validate_sources
from dermaclass.data.labels import class_indices
from dermaclass.errors import EvaluationError
from dermaclass.evaluate.metrics import flag_rates, operating_point, proportion_interval
from dermaclass.evaluate.run import images_identity, network_images, split_rows
from dermaclass.serving.predictor import Predictor

log = logging.getLogger(__name__)

#: Fewest images of a flagged class a local threshold is fitted on. With 20 positives a
#: threshold for 90 % sensitivity gives a sensitivity known only to about 0.70-0.97 (Wilson, 95 %).
MIN_SITE_POSITIVES = 20
#: What a site threshold keeps of the one it replaced (the validation fit, for the record).
_REPLACED_KEYS = ("threshold", "target_sensitivity", "valid_sensitivity", "valid_specificity")


def _own_images(bundle: Path, images: set[str]) -> list[str]:
    """The images of ``images`` that the bundle's split file lists (its train, valid or test)."""
    path = bundle / "split.csv"
    if not path.is_file():
        log.warning("%s: no split.csv; cannot check that the site images are new to the bundle", bundle)
        return []
    return sorted(images & set(read_split(path)["image"].astype(str)))


def fit_site_operating_points(
    bundle: str | Path,
    data: str | Path,
    *,
    cfg: Config | None = None,
    target_sensitivity: float | None = None,
    force: bool = False,
    min_positives: int = MIN_SITE_POSITIVES,
) -> dict[str, dict[str, Any]]:
    """Refit every operating point of ``bundle`` on all labelled images of ``data`` (a clinic's
    own set), as the app scores them; write the thresholds into ``model.json`` atomically.

    ``target_sensitivity``: None keeps each point's own target. Refused (nothing written): a
    bundle without operating points; without ``force`` (the thresholds change); images the
    bundle's ``split.csv`` lists; fewer than ``min_positives`` images of a flagged class, or no
    image of another class. Returns, per class, the threshold before and after and the rates
    each gives on ``data`` (the new ones with their Wilson intervals).
    """
    cfg = cfg or Config()
    bundle = Path(bundle)
    meta = models.read_bundle_meta(bundle)
    points = {c: op for c, op in meta.operating_points.items() if op.get("threshold") is not None}
    if not points:
        raise EvaluationError(f"{bundle}: the bundle has no operating points to refit")
    if not force:
        raise FileExistsError(
            f"{bundle}: this replaces the thresholds of {', '.join(points)} (fitted on "
            f"{models.operating_point_origin(next(iter(points.values())), meta.calibration)}); pass --force"
        )
    items, _ = validate_sources([data], **cfg.source_settings())
    if own := _own_images(bundle, set(items["image"].astype(str))):
        raise EvaluationError(
            f"{data}: {len(own)} of its images are the bundle's own ({bundle / 'split.csv'} lists e.g. {own[0]}); "
            "fit the thresholds on labelled images the bundle has never seen"
        )
    predictor = Predictor(bundle, threads=cfg.threads)
    rows, _, images = split_rows(bundle, predictor.meta, items, split="all", split_path=None, cfg=cfg, source=str(data))
    logits = predictor.logits(
        network_images(predictor.input_sizes, predictor.input_size, rows, images, cfg), tta=predictor.tta
    )
    probs = predictor.checked(predictor.calibrated(logits), f"the images of {data}")
    y = class_indices(rows["label"], predictor.classes, source=str(data))
    for c in points:  # every class is checked before anything is written
        k = int((y == predictor.classes.index(c)).sum())
        if k < min_positives:
            raise EvaluationError(
                f"{data}: {k} image(s) labelled {c}; a threshold for it needs at least {min_positives}, "
                "or the sensitivity it gives is not known"
            )
        if k == len(y):
            raise EvaluationError(f"{data}: every image is labelled {c}; its specificity cannot be fitted")
    identity = images_identity(rows["hash"], rows["label"])
    fitted = datetime.now(UTC).isoformat(timespec="seconds")
    new_points, out = dict(meta.operating_points), {}
    for c, old in points.items():
        i = predictor.classes.index(c)
        target = float(target_sensitivity if target_sensitivity is not None else old.get("target_sensitivity") or 0.9)
        op = operating_point(y, probs, i, target_sensitivity=target)
        pos, neg = int((y == i).sum()), int((y != i).sum())
        sens_ci = proportion_interval(round(op["sensitivity"] * pos), pos)
        spec_ci = proportion_interval(round(op["specificity"] * neg), neg)
        site = {
            "data": str(data),
            "name": Path(data).name,
            "images": len(y),
            "positives": pos,
            "sensitivity": op["sensitivity"],
            "sensitivity_interval": sens_ci,
            "specificity": op["specificity"],
            "specificity_interval": spec_ci,
            "images_sha256": identity,
            "tta": predictor.tta,
            "fitted": fitted,
        }
        new_points[c] = {
            "threshold": op["threshold"],
            "target_sensitivity": target,
            # the validation rates described the old threshold; the site's are under "site"
            "valid_sensitivity": None,
            "valid_specificity": None,
            "site": site,
            # a second site fit keeps the first record of the training-time threshold
            "replaced": old.get("replaced") or {k: old.get(k) for k in _REPLACED_KEYS},
        }
        before = flag_rates(y, probs, class_index=i, threshold=old["threshold"])
        out[c] = {"threshold_before": old["threshold"], "before": before, **{k: site[k] for k in site if k != "data"}}
        out[c]["threshold"] = op["threshold"]
        log.info(
            "%s: threshold %.4f -> %.4f on %d images (%d %s): sensitivity %.3f -> %.3f, specificity %.3f -> %.3f",
            c, old["threshold"], op["threshold"], len(y), pos, c,
            before["sensitivity"], op["sensitivity"], before["specificity"], op["specificity"],
        )  # fmt: skip
    models.write_bundle_meta(bundle, meta.with_(operating_points=new_points))
    return out


__all__ = ["MIN_SITE_POSITIVES", "fit_site_operating_points"]

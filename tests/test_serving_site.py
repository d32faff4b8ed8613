"""serving/site.py: flag thresholds refitted on a clinic's own labelled images (calibrate --site)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermaclass.errors import EvaluationError
from dermaclass.evaluate.metrics import flag_rates
from dermaclass.evaluate.run import evaluate_bundle
from dermaclass.serving.predictor import Predictor
from dermaclass.serving.site import fit_site_operating_points


def _site_data(root: Path, *, per_class: dict[str, int], seed: int = 7) -> Path:
    """Images like ``colour_data``'s (a dominant colour channel per class), but new ones, with
    names the bundle's split does not list: another clinic's labelled set."""
    rng = np.random.default_rng(seed)
    for c, label in enumerate(("bkl", "mel", "nv")):
        (root / label).mkdir(parents=True)
        for i in range(per_class.get(label, 0)):
            arr = rng.integers(0, 90, (24, 32, 3)).astype(np.uint8)
            arr[..., c] += 110  # fainter than the training images: the clinic's camera differs
            Image.fromarray(arr).save(root / label / f"site_{label}_{i}.png")
    return root


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("kind", ["tiny_bundle", "tiny_ensemble"])
def test_site_thresholds_reach_the_target_on_the_clinics_images_and_record_where_they_came_from(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    bundle = _copy(request.getfixturevalue(kind), tmp_path)
    site = _site_data(tmp_path / "clinic", per_class={"bkl": 25, "mel": 25, "nv": 25})
    before = json.loads((bundle / "model.json").read_text())
    old = before["operating_points"]["mel"]["threshold"]

    fits = fit_site_operating_points(bundle, site, target_sensitivity=0.8, force=True)

    after = json.loads((bundle / "model.json").read_text())
    op = after["operating_points"]["mel"]
    assert fits["mel"]["threshold_before"] == old and op["threshold"] == fits["mel"]["threshold"]
    assert op["target_sensitivity"] == 0.8 and op["replaced"]["threshold"] == old
    assert op["site"]["images"] == 75 and op["site"]["positives"] == 25 and op["site"]["name"] == "clinic"
    lo, hi = op["site"]["sensitivity_interval"]
    assert op["site"]["sensitivity"] >= 0.8 and lo <= op["site"]["sensitivity"] <= hi
    # only the thresholds move: temperature, prior shift and referral are the bundle's own
    assert after["calibration"] == before["calibration"] and after.get("ood") == before.get("ood")

    # the Predictor serves the new threshold, says where it came from, and it gives there
    # the sensitivity it was fitted for
    pred = Predictor(bundle)
    assert pred.operating_points["mel"]["threshold"] == op["threshold"]
    served = evaluate_bundle(bundle, site, split="all", thumbnails=False, n_boot=10).predictions
    labels = [pred.classes.index(c) for c in served["label"]]
    probs = served[[f"p_{c}" for c in pred.classes]].to_numpy()
    rates = flag_rates(labels, probs, class_index=pred.classes.index("mel"), threshold=op["threshold"])
    assert rates["sensitivity"] == pytest.approx(op["site"]["sensitivity"])
    assert rates["specificity"] == pytest.approx(op["site"]["specificity"])
    flag = pred.predict(site / "mel" / "site_mel_0.png")["flags"]["mel"]
    assert flag["fitted_on"] == "75 labelled images of clinic (25 of the class)"

    # a second fit keeps the record of the training-time threshold
    fit_site_operating_points(bundle, site, target_sensitivity=0.9, force=True)
    assert json.loads((bundle / "model.json").read_text())["operating_points"]["mel"]["replaced"]["threshold"] == old


def test_site_fits_refuse_the_bundles_own_images_too_few_positives_and_no_force(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    untouched = (bundle / "model.json").read_bytes()
    site = _site_data(tmp_path / "clinic", per_class={"bkl": 25, "mel": 25, "nv": 25})
    with pytest.raises(FileExistsError, match="--force"):
        fit_site_operating_points(bundle, site)
    with pytest.raises(EvaluationError, match=r"of its images are the bundle's own .*split\.csv"):
        fit_site_operating_points(bundle, colour_data, force=True)
    few = _site_data(tmp_path / "few", per_class={"bkl": 25, "mel": 5, "nv": 25})
    with pytest.raises(EvaluationError, match=r"few: 5 image\(s\) labelled mel; .* at least 20"):
        fit_site_operating_points(bundle, few, force=True)
    only = _site_data(tmp_path / "only", per_class={"mel": 25})
    with pytest.raises(EvaluationError, match="every image is labelled mel"):
        fit_site_operating_points(bundle, only, force=True)
    assert (bundle / "model.json").read_bytes() == untouched


def test_calibrate_site_on_the_command_line_and_the_report_says_the_rates_are_fitted_there(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    from dermaclass.models import read_bundle_meta
    from dermaclass.report.card import model_card_markdown
    from dermaclass.report.html import write_report

    bundle = _copy(tiny_bundle, tmp_path)
    site = _site_data(tmp_path / "clinic", per_class={"bkl": 25, "mel": 25, "nv": 25})
    cmd = [sys.executable, "-m", "dermaclass", "calibrate", str(bundle), str(site)]
    refused = subprocess.run([*cmd, "--site", "--force", "--tta", "none"], capture_output=True, text=True)
    assert refused.returncode != 0 and "--site refits the flag thresholds only" in refused.stderr + refused.stdout
    done = subprocess.run([*cmd, "--site", "--force"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())  # rich wraps lines to the terminal's width
    assert "mel threshold" in said and "fitted on 75 images" in said and "fitted, not measured" in said

    evaluation = evaluate_bundle(bundle, site, split="all", thumbnails=False, n_boot=20)
    here = evaluation.report
    assert here.operating_points["mel"]["fitted_here"] is True
    page = write_report(evaluation, tmp_path / "report")["report.html"].read_text()
    assert "was fitted on these very images" in page and "75 labelled images of clinic" in page
    assert here.operating_points["mel"]["fitted_on"].startswith("75 labelled images of clinic")
    other = _site_data(tmp_path / "other", per_class={"bkl": 10, "mel": 10, "nv": 10}, seed=8)
    assert (
        evaluate_bundle(bundle, other, split="all", thumbnails=False, n_boot=20).report.operating_points["mel"][
            "fitted_here"
        ]
        is False
    )
    card = model_card_markdown(read_bundle_meta(bundle), None, name="site")
    assert "fitted by `dermaclass calibrate --site` on 75 labelled images of `clinic`" in card
    assert "It replaced the threshold" in card

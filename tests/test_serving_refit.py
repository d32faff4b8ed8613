"""serving.refit: refitting a finished bundle's calibration and referral rule (`dermaclass
calibrate`, `dermaclass fit-ood`, and the end of training, which calls the same sequence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dermaclass.serving.predictor import Predictor


def test_fit_ood_refits_only_with_force_and_records_the_method(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from dermaclass.config import load_config
    from dermaclass.serving import refer
    from dermaclass.serving.refit import refit_ood

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("checkpoints", "*.onnx"))
    cfg = load_config(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileExistsError, match="already has a fitted out-of-distribution score"):
        refit_ood(bundle, colour_data, cfg=cfg, method="knn")
    r = refit_ood(bundle, colour_data, cfg=cfg, method="knn", force=True)
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["calibration"]["refer"] == r and r["ood"]["method"] == "knn"
    assert 0.0 <= r["valid_referred"] <= 1.0
    pred = Predictor(bundle)
    assert (
        pred.ood_method == "knn" and set(pred.ood_stats) == {"bank", "k"} and pred.ood_stats["bank"].dtype == np.float16
    )
    # energy needs no arrays: the stale file goes, so a reader never mistakes it for the score in use
    refit_ood(bundle, colour_data, cfg=cfg, method="energy", force=True)
    assert not (bundle / refer.OOD_FILE).exists() and Predictor(bundle).ood_method == "energy"


def test_calibrate_refits_a_bundle_and_the_predictor_serves_its_prior_shift(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    import shutil

    from scipy.special import softmax

    from dermaclass.config import load_config
    from dermaclass.models import BundleMeta, ModelError, file_sha256, read_bundle_meta, write_bundle_meta
    from dermaclass.serving.refit import recalibrate

    trained = read_bundle_meta(tiny_bundle).calibration  # training fits the shift by default
    assert trained["prior_shift"]["target_sensitivity"] == 0.8 and len(trained["offsets"]) == 3
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("checkpoints", "*.onnx"))
    weights = file_sha256(bundle / "model.safetensors")
    cfg = load_config(cache_dir=str(tmp_path / "cache"), prior_sensitivity=0.9, target_sensitivity=0.8)
    with pytest.raises(FileExistsError, match="already calibrated"):  # never overwritten silently
        recalibrate(bundle, colour_data, cfg=cfg)
    cal = recalibrate(bundle, colour_data, cfg=cfg, force=True)
    meta = read_bundle_meta(bundle)
    assert cal["prior_shift"]["class"] == "nv" and cal["prior_shift"]["prior"] == pytest.approx(
        {"bkl": 1 / 3, "mel": 1 / 3, "nv": 1 / 3}, abs=0.1
    )  # the train split's frequencies
    assert len(cal["offsets"]) == 3 and cal["refitted"]["by"] == "dermaclass calibrate"
    assert meta.operating_points["mel"]["target_sensitivity"] == 0.8 and meta.config["prior_sensitivity"] == 0.9
    assert 0 <= cal["refer"]["valid_referred"] <= 1  # the referral rule was refitted on the new probabilities
    assert file_sha256(bundle / "model.safetensors") == weights
    from dermaclass.report.card import model_card_markdown

    assert f"prior shift: tau {cal['prior_shift']['tau']:.1f} x log(train prior)" in model_card_markdown(
        meta, None, name="tiny"
    )

    # the Predictor adds the offsets before the temperature
    offsets = [0.0, 0.0, 3.0]
    write_bundle_meta(bundle, meta.with_(calibration={**meta.calibration, "offsets": offsets}))
    pred = Predictor(bundle)
    z = np.array([[2.0, 0.0, 0.0]])
    assert np.allclose(pred.calibrated(z), softmax((z + offsets) / pred.temperature, axis=1))
    assert pred.calibrated(z).argmax() == 2
    with pytest.raises(ModelError, match="calibration.offsets"):
        BundleMeta.from_dict({**meta.to_dict(), "calibration": {**meta.calibration, "offsets": [1.0, 2.0]}})


def test_calibrate_switches_a_network_to_flips2_and_undoes_a_failed_refit(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    """``calibrate --tta flips2``: the bundle serves the image and its mirror from then on, with
    everything fitted on those logits; a refit that fails leaves the bundle as it was."""
    import shutil

    from dermaclass.config import load_config
    from dermaclass.errors import ConfigError, DermaclassError
    from dermaclass.models import read_bundle_meta
    from dermaclass.serving.refit import recalibrate

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle, ignore=shutil.ignore_patterns("checkpoints", "*.onnx"))
    cfg = load_config(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="flips2 or flips4"):
        recalibrate(bundle, colour_data, cfg=cfg, force=True, tta="rotate")
    before = (bundle / "model.json").read_text()
    with pytest.raises(DermaclassError):  # not a dataset the bundle's split knows
        recalibrate(bundle, colour_data / "mel", cfg=cfg, force=True, tta="flips2")
    assert (bundle / "model.json").read_text() == before
    cal = recalibrate(bundle, colour_data, cfg=cfg, force=True, tta="flips2")
    meta = read_bundle_meta(bundle)
    assert meta.tta == "flips2" and meta.config["tta"] == "flips2" and meta.calibration == cal
    pred = Predictor(bundle)
    assert pred.tta and pred.tta_mode == "flips2"
    im = pred.preprocess(colour_data / "nv" / "2.png")
    mirror = np.mean([pred.logits([np.ascontiguousarray(v)], tta=False) for v in (im, im[:, ::-1])], axis=0)
    assert np.allclose(pred.logits([im]), mirror, atol=1e-5)
    assert pred.predict(colour_data / "nv" / "2.png")["tta"] == "flips2"
    recalibrate(bundle, colour_data, cfg=cfg, force=True, tta="none")
    assert read_bundle_meta(bundle).tta is None and not Predictor(bundle).tta

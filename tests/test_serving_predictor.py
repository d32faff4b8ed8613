"""Predictor: the training preprocessing, calibrated probabilities, operating-point flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermaclass.data import DecodeCache
from dermaclass.evaluate.metrics import softmax
from dermaclass.models import ModelError
from dermaclass.serving.predictor import Predictor


def test_predict_one_file(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    out = pred.predict(colour_data / "mel" / "3.png")
    probs = out["probabilities"]
    assert list(probs) and abs(sum(probs.values()) - 1) < 1e-5
    assert list(probs.values()) == sorted(probs.values(), reverse=True) and out["top"] == next(iter(probs))
    assert set(out["flags"]) == {"mel"} and out["flags"]["mel"]["threshold"] is not None


def test_preprocess_matches_the_training_cache(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    pred = Predictor(tiny_bundle)
    path = colour_data / "nv" / "5.png"
    cached = DecodeCache(tmp_path, pred.input_size).ensure([str(path)], ["h"], workers=1)[0]
    for source in (path, path.read_bytes(), Image.open(path), np.asarray(Image.open(path))):
        assert np.array_equal(pred.preprocess(source), cached)


def test_normalise_is_the_training_normalisation_in_nchw(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    images = [pred.preprocess(colour_data / "mel" / f"{i}.png") for i in range(3)]
    norm = pred.meta.normalization
    expected = ((np.stack(images) / 255.0 - np.asarray(norm["mean"])) / np.asarray(norm["std"])).transpose(0, 3, 1, 2)
    x = pred.normalise(images)
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == expected.shape
    assert np.allclose(x, expected, atol=1e-5)


def test_temperature_divides_the_logits(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    x = [pred.preprocess(colour_data / "bkl" / f"{i}.png") for i in range(4)]
    logits = pred.logits(x)
    assert np.allclose(pred.probabilities(x), softmax(logits, pred.temperature))
    assert pred.temperature == pytest.approx(pred.meta.calibration["temperature"])


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model bundle"):
        Predictor(tmp_path)


def test_topk_referral_and_tta(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    out = pred.predict(colour_data / "mel" / "1.png", top_k=2, tta=True)
    assert len(out["top_k"]) == 2 and out["top_k"][0]["class"] == out["top"]
    assert out["top_k"][0]["name"] == pred.name(out["top"])
    assert set(out["referral"]) == {"refer", "message", "reasons"}
    assert "not a diagnostic device" in out["disclaimer"]
    # below the probability floor an image is referred, with the reason in words
    pred.refer_below = 1.01  # every probability is below it: deterministic whatever the tiny model learnt
    grey = pred.predict(np.full((24, 32, 3), 128, np.uint8))
    assert grey["referral"]["refer"] and grey["referral"]["message"] == "Refer to a dermatologist"
    assert any("probability" in r for r in grey["referral"]["reasons"])


def test_tta_averages_flipped_views(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    im = pred.preprocess(colour_data / "nv" / "2.png")
    views = [im, im[:, ::-1], im[::-1], im[::-1, ::-1]]
    expected = np.mean([pred.logits([np.ascontiguousarray(v)]) for v in views], axis=0)
    assert np.allclose(pred.logits([im], tta=True), expected, atol=1e-5)
    # Several images in groups (the flips of a group go through as one batch): the same means.
    ims = [pred.preprocess(colour_data / c / "1.png") for c in ("bkl", "mel", "nv")]
    one_by_one = [
        np.mean(
            [pred.forward([np.ascontiguousarray(v)], tta=False)[0][0] for v in (x, x[:, ::-1], x[::-1], x[::-1, ::-1])],
            axis=0,
        )
        for x in ims
    ]
    logits, feats = pred.forward(ims, tta=True, batch_size=2)
    assert logits.shape == (3, len(pred.classes)) and feats is not None and len(feats) == 3
    assert np.allclose(logits, np.stack(one_by_one), atol=1e-5)


def test_gradcam_heatmap_and_overlay(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    heat, overlay = pred.gradcam(colour_data / "bkl" / "0.png")
    assert heat.shape == (24, 32) and 0 <= heat.min() and heat.max() <= 1
    assert overlay.shape == (24, 32, 3) and overlay.dtype == np.uint8
    # On a large upload the overlay is drawn on the upload itself (same centre crop), up to the display width.
    big = np.asarray(Image.open(colour_data / "bkl" / "0.png").convert("RGB").resize((640, 480)))
    heat2, shown = pred.gradcam(big, display_width=600)
    assert heat2.shape == (24, 32) and shown.shape == (450, 600, 3)
    _, small = pred.gradcam(colour_data / "bkl" / "0.png", display_width=600)  # never upscaled past the upload
    assert small.shape == (24, 32, 3)


def test_concurrent_requests_are_safe(tiny_bundle: Path, colour_data: Path) -> None:
    """The app serves several clinicians at once: predictions and Grad-CAM from threads must not crash."""
    from concurrent.futures import ThreadPoolExecutor

    pred = Predictor(tiny_bundle)
    paths = sorted((colour_data / "mel").iterdir())[:8]

    def job(p):
        return pred.predict(p)["top"], pred.gradcam(p)[0].shape

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, paths))
    assert len(results) == 8 and all(shape == (24, 32) for _, shape in results)


def test_colour_constancy_from_the_bundle_is_applied(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from dermaclass.data.images import shades_of_gray

    bundle = tmp_path / "cc"
    shutil.copytree(tiny_bundle, bundle)
    meta = json.loads((bundle / "model.json").read_text())
    meta["preprocessing"]["colour_constancy"] = "shades-of-gray"
    (bundle / "model.json").write_text(json.dumps(meta))
    plain, cc = Predictor(tiny_bundle), Predictor(bundle)
    images = [plain.preprocess(p) for p in sorted(colour_data.rglob("*.png"))[:70]]  # > 64: the batched path too
    expected = plain.logits([shades_of_gray(im) for im in images])
    assert np.allclose(cc.logits(images), expected, atol=1e-4)
    assert not np.allclose(plain.logits(images), expected, atol=1e-3)
    # Flip TTA corrects each image once and flips the result: the same as correcting every view.
    views = [lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1]]
    per_view = np.mean(
        [plain.logits([shades_of_gray(np.ascontiguousarray(v(im))) for im in images], tta=False) for v in views], axis=0
    )
    assert np.allclose(cc.logits(images, tta=True), per_view, atol=1e-4)
    meta["preprocessing"]["colour_constancy"] = "retinex"
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="colour_constancy"):
        Predictor(bundle)


def test_a_broken_model_never_hands_out_nan(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from dermaclass.cli import app

    pred = Predictor(tiny_bundle)
    monkeypatch.setattr(
        pred,
        "member_outputs",
        lambda images, **kw: [
            (
                np.full(
                    (len(next(iter(images.values())) if isinstance(images, dict) else images), len(pred.classes)),
                    np.nan,
                ),
                None,
            )
        ],
    )
    with pytest.raises(ModelError, match="non-finite probabilities for .*0.png"):
        pred.predict(colour_data / "mel" / "0.png")
    with pytest.raises(ModelError, match="non-finite"):
        pred.probabilities([np.zeros((24, 32, 3), np.uint8)])
    # A bundle with NaN weights: predict refuses with exit 4 (it answered exit 0 and "nan %").
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad, ignore=shutil.ignore_patterns("checkpoints", "*.onnx"))
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    save_file({**state, key: state[key] * float("nan")}, str(bad / "model.safetensors"))
    meta = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    res = CliRunner().invoke(app, ["predict", str(colour_data / "mel" / "0.png"), "--model", str(bad)])
    assert res.exit_code == 4 and "NaN or Inf" in res.output


def test_features_agree_between_the_one_batch_and_the_batched_paths(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle, backend="torch")
    x = [pred.preprocess(p) for p in sorted((colour_data / "nv").iterdir())[:6]]
    (l1, f1), (l2, f2) = pred.forward(x, batch_size=64), pred.forward(x, batch_size=2)
    assert f1.shape[0] == 6 and f1.shape[1] > 0
    assert np.abs(l1 - l2).max() < 1e-4 and np.abs(f1 - f2).max() < 1e-4
    assert np.allclose(pred.logits(x), l1, atol=1e-5)


def test_training_fits_the_feature_space_referral(tiny_bundle: Path) -> None:
    from dermaclass.serving import refer

    pred = Predictor(tiny_bundle, backend="torch")
    ood = pred.meta.ood
    assert ood["method"] == "mahalanobis" == pred.ood_method and (tiny_bundle / refer.OOD_FILE).is_file()
    assert ood["keep"] == 0.95 and "train split" in ood["fitted_on"] and ood["layer"] == pred.feature_layer
    assert set(pred.ood_stats) == {"means", "precision"} and pred.ood_stats["means"].shape[0] == len(pred.classes)


def test_too_small_is_refused_and_a_flat_field_is_referred(tiny_bundle: Path, tmp_path: Path) -> None:
    from dermaclass.serving.refer import InputProblem

    pred = Predictor(tiny_bundle)
    tiny = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    with pytest.raises(InputProblem, match=r"dot.png: too small to judge: the image is 1x1 pixels"):
        pred.predict(tiny)
    flat = pred.predict(np.full((48, 64, 3), (200, 150, 120), np.uint8))
    assert flat["referral"]["refer"] and "does not look like a dermoscopic image" in flat["referral"]["reasons"][0]
    assert flat["ood_method"] == "mahalanobis"


#: Every bundle the repository ships (the default and the ones kept beside it).
BUNDLED = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "models").glob("*/model.json"))


def _screenshot() -> np.ndarray:
    """A page as a screenshot shows it: white, a coloured header and button, lines of text."""
    from PIL import ImageDraw

    page = Image.new("RGB", (900, 600), "white")
    d = ImageDraw.Draw(page)
    d.rectangle((0, 0, 900, 60), fill=(249, 115, 22))
    d.rectangle((40, 480, 200, 520), fill=(37, 99, 235))
    for i in range(14):
        d.text(
            (40, 90 + 26 * i),
            "Calibrated probabilities: melanocytic nevus 57 % - decision support only " * 2,
            fill=(30, 30, 30),
        )
    return np.asarray(page)


@pytest.mark.skipif(not BUNDLED, reason="no bundled model in this checkout")
@pytest.mark.parametrize("bundle", BUNDLED, ids=lambda p: p.name)
def test_the_bundled_model_refers_what_is_not_dermoscopy(bundle: Path) -> None:
    """The issue's examples, read as a clinician would: each referred with a plain reason."""
    from dermaclass.serving.refer import InputProblem

    pred = Predictor(bundle)
    w, h = 400, 300
    gradient = (np.linspace(0, 1, w)[None, :, None] * np.array([230, 120, 60]) + 20).astype(np.uint8)
    gradient = np.ascontiguousarray(np.broadcast_to(gradient, (h, w, 3)))
    skin = np.full((h, w, 3), (224, 172, 150), np.uint8)
    for image in (gradient, skin, _screenshot()):
        r = pred.predict(image)
        assert r["referral"]["refer"], r["referral"]
        assert any("does not look like a dermoscopic image" in reason for reason in r["referral"]["reasons"])
    with pytest.raises(InputProblem, match="too small to judge"):
        pred.predict(np.zeros((1, 1, 3), np.uint8))

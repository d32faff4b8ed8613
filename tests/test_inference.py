"""Predictor: the training preprocessing, calibrated probabilities, operating-point flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermaclass.data import DecodeCache
from dermaclass.evaluate.metrics import softmax
from dermaclass.inference import Predictor
from dermaclass.models import ModelError


def test_predict_one_file(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    out = pred.predict(colour_data / "mel" / "3.png")
    probs = out["probabilities"]
    assert list(probs) and abs(sum(probs.values()) - 1) < 1e-5
    assert list(probs.values()) == sorted(probs.values(), reverse=True) and out["top"] == next(iter(probs))
    assert set(out["flags"]) <= {"mel"}


def test_preprocess_matches_the_training_cache(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    pred = Predictor(tiny_bundle)
    path = colour_data / "nv" / "5.png"
    cached = DecodeCache(tmp_path, pred.input_size).ensure([str(path)], ["h"], workers=1)[0]
    for source in (path, path.read_bytes(), Image.open(path), np.asarray(Image.open(path))):
        assert np.array_equal(pred.preprocess(source), cached)


def test_temperature_divides_the_logits(tiny_bundle: Path, colour_data: Path) -> None:
    pred = Predictor(tiny_bundle)
    x = [pred.preprocess(colour_data / "bkl" / f"{i}.png") for i in range(4)]
    logits = pred.logits(x)
    assert np.allclose(pred.probabilities(x), softmax(logits, pred.temperature))
    assert pred.temperature == pytest.approx(pred.meta["calibration"]["temperature"])


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model bundle"):
        Predictor(tmp_path)

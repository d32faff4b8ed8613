"""ui.views: what the app shows: bad uploads, the banner, reports, the status line, the card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermaclass import DISCLAIMER
from dermaclass.serving.predictor import Predictor
from dermaclass.ui import MAX_BYTES, UploadError, check_upload, diagnose_markdown, report_views


def test_check_upload_names_each_problem(tmp_path: Path, colour_data: Path) -> None:
    with pytest.raises(UploadError, match="No image yet"):
        check_upload(None)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UploadError, match=r"empty.jpg: the file is empty"):
        check_upload(str(empty))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(UploadError, match=r"notes.jpg: not a readable image"):
        check_upload(str(text))
    good = colour_data / "mel" / "0.png"
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UploadError, match=r"cut.png: not a readable image"):
        check_upload(str(truncated))
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: no disk use
    with pytest.raises(UploadError, match="too large"):
        check_upload(str(huge))
    assert check_upload(str(good)).shape == (24, 32, 3)


def test_banner_says_refer_and_disclaimer(tiny_bundle: Path) -> None:
    p = Predictor(tiny_bundle)
    p.refer_below = 1.01  # force a referral
    result = p.predict(np.full((24, 32, 3), 90, np.uint8))
    md = diagnose_markdown(p, result)
    assert "Refer to a dermatologist" in md and DISCLAIMER in md
    assert 'class="refer-banner" role="alert"' in md  # a warning block, not an ordinary heading


def test_the_banner_says_an_ensemble_answered_and_when_its_networks_disagree(tiny_ensemble: Path) -> None:
    p = Predictor(tiny_ensemble)
    result = p.predict(np.full((24, 32, 3), 90, np.uint8))
    result["agreement"] = {
        "member_top": ["mel", "nv"],
        "share": 0.5,
        "disagree": True,
        "member_probability": [0.81, 0.32],
    }
    result["top"], result["top_k"][0]["name"] = "mel", "melanoma"
    md = diagnose_markdown(p, result)
    assert "answered by an ensemble of 2 networks" in md and 'class="disagree-banner"' in md
    assert "with flip TTA (flips4)" in md  # the views it averaged
    assert "1 of 2 answer melanoma" in md and "the others answer melanocytic nev" in md.lower()
    assert "32% to 81%" in md
    result["agreement"] = {
        "member_top": ["mel", "mel"],
        "share": 1.0,
        "disagree": False,
        "member_probability": [0.8, 0.7],
    }
    md = diagnose_markdown(p, result)
    assert "All 2 networks of the ensemble give this answer" in md and "disagree-banner" not in md


def test_report_views(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.config import load_config
    from dermaclass.evaluate.run import evaluate_bundle
    from dermaclass.report import write_report

    write_report(
        evaluate_bundle(tiny_bundle, colour_data, cfg=load_config(cache_dir=str(tmp_path / "c")), n_boot=20),
        tmp_path / "rep",
    )
    md, png, table = report_views(tmp_path / "rep")
    assert "balanced accuracy" in md and Path(png).is_file()
    assert isinstance(table, pd.DataFrame) and len(table) == 3 and "sensitivity" in table
    with pytest.raises(UploadError, match="no report.json"):
        report_views(tmp_path)


def test_pixel_limit_and_weak_model_warning(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    from dermaclass.ui import MAX_PIXELS, model_status

    big = tmp_path / "big.png"
    Image.new("L", (7000, 7000)).save(big)  # 49 Mpx in a small file
    assert 7000 * 7000 > MAX_PIXELS
    with pytest.raises(UploadError, match="7000x7000 pixels is too large"):
        check_upload(str(big))
    p = Predictor(tiny_bundle)
    line, _ = model_status(p)
    assert p.bundle.name in line and "trained" in line
    p.meta = p.meta.with_(metrics_valid={"balanced_accuracy": 0.36})  # 3 classes: chance is 0.33
    _, warning = model_status(p)
    assert warning is not None and "close to chance" in warning and "no evaluation report" in warning


def test_side_by_side_shows_the_image_its_overlay_and_a_colour_scale(tiny_bundle: Path, colour_data: Path) -> None:
    from dermaclass.ui import side_by_side

    p = Predictor(tiny_bundle)
    image = np.asarray(Image.open(colour_data / "mel" / "2.png").convert("RGB"))
    _, overlay = p.gradcam(image, display_width=600)
    shown = side_by_side(image, overlay)
    h, w = overlay.shape[:2]
    assert shown.shape[0] > h and shown.shape[1] > 2 * w  # a title row, two panels, the scale
    top, bottom = shown[-h, 2 * w + 20 + 4], shown[-1, 2 * w + 20 + 4]
    assert top[0] > top[2] and bottom[2] > bottom[0]  # jet: red at the top (high), blue at the bottom (low)


def test_model_card_without_a_card_file_is_the_rendered_card(tiny_bundle: Path) -> None:
    from dermaclass.report import model_card_markdown
    from dermaclass.ui import model_card

    p = Predictor(tiny_bundle)
    assert not (tiny_bundle / "MODEL_CARD.md").exists()
    card = model_card(p)
    assert card == model_card_markdown(p.meta, None, name=tiny_bundle.name) and DISCLAIMER in card

"""Deployment exports: ONNX and OpenVINO (float and int8) round trips on a tiny bundle, and
the int8 refusal when it costs accuracy. Each backend's test is skipped, with the reason,
where its package is absent."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dermaclass.config import load_config
from dermaclass.serving.export import (
    ExportError,
    check_bf16_bundle,
    cpu_has_bf16,
    export_onnx,
    export_openvino,
    quantize_bundle,
)
from dermaclass.serving.predictor import Predictor

needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
)
needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="openvino and nncf are not installed (pip install 'dermaclass[openvino]')",
)


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _images(pred: Predictor, colour_data: Path) -> list[np.ndarray]:
    return [pred.preprocess(p) for c in ("mel", "nv") for p in sorted((colour_data / c).iterdir())[:3]]


def _same(a: Predictor, b: Predictor, x: list[np.ndarray], atol: float = 1e-4) -> None:
    (la, fa), (lb, fb) = a.forward(x, tta=False), b.forward(x, tta=False)
    assert fa is not None and fb is not None and fa.shape == fb.shape
    assert np.abs(la - lb).max() < atol and np.abs(fa - fb).max() < atol


@needs_onnxruntime
def test_onnx_export_matches_torch(bundle: Path, colour_data: Path) -> None:
    info = export_onnx(bundle)
    assert info["max_abs_diff"] < 1e-4 and (bundle / "model.onnx").is_file()
    with pytest.raises(FileExistsError):
        export_onnx(bundle)
    onnx_pred, torch_pred = Predictor(bundle), Predictor(bundle, backend="torch")
    assert onnx_pred.backend == "onnx" and torch_pred.backend == "torch"
    _same(onnx_pred, torch_pred, _images(torch_pred, colour_data))


@needs_openvino
def test_openvino_export_matches_torch_and_serves(bundle: Path, colour_data: Path) -> None:
    info = export_openvino(bundle)
    assert info["max_abs_diff"] < 1e-4
    assert (bundle / "model.xml").is_file() and (bundle / "model.bin").is_file()
    assert not any(p.name.startswith(".") for p in bundle.iterdir())  # no temporary folder left behind
    with pytest.raises(FileExistsError):
        export_openvino(bundle)
    ov_pred, torch_pred = Predictor(bundle), Predictor(bundle, backend="torch")
    assert ov_pred.backend == "openvino"  # auto: the OpenVINO export is used when present
    x = _images(torch_pred, colour_data)
    _same(ov_pred, torch_pred, x)
    assert sorted(ov_pred.runner.static) == [1, 2, 4]  # one image and its two or four flips: static shapes
    for n in (1, 2, 4, 5):  # the static models and the dynamic one give torch's outputs
        _same(ov_pred, torch_pred, x[:n])
    r = ov_pred.predict(x[0])
    assert r["backend"] == "openvino" and abs(sum(r["probabilities"].values()) - 1) < 1e-6


@needs_openvino
def test_int8_is_refused_when_it_costs_accuracy_and_kept_when_it_does_not(
    bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    cfg = load_config(cache_dir=str(tmp_path / "cache"))
    # A limit no model can meet: the export must refuse and write nothing.
    with pytest.raises(ExportError, match=r"int8 loses .* balanced accuracy on the valid split .* not written"):
        quantize_bundle(bundle, colour_data, cfg=cfg, n_calibration=20, max_drop=-1.0)
    assert not (bundle / "model-int8.xml").exists() and not (bundle / "model-int8.bin").exists()
    assert "openvino-int8" not in json.loads((bundle / "model.json").read_text()).get("exports", {})
    info = quantize_bundle(bundle, colour_data, cfg=cfg, n_calibration=20, max_drop=1.0)
    assert (bundle / "model-int8.xml").is_file() and info["calibration"] == "train split, 20 images"
    record = json.loads((bundle / "model.json").read_text())["exports"]["openvino-int8"]
    assert record["drop"] == pytest.approx(
        record["valid_balanced_accuracy_float"] - record["valid_balanced_accuracy_int8"]
    )
    first, last = record["float_layers"]  # the stem convolution and the classifier stay float
    assert "Conv" in first and last
    pred = Predictor(bundle, backend="openvino-int8")
    assert pred.backend == "openvino-int8" and Predictor(bundle).backend == "openvino"  # int8 only when asked
    assert pred.predict(_images(pred, colour_data)[0])["backend"] == "openvino-int8"


def test_a_missing_export_is_a_clear_error(bundle: Path) -> None:
    from dermaclass.models import ModelError

    with pytest.raises(ModelError, match="no OpenVINO export"):
        Predictor(bundle, backend="openvino")


@needs_openvino
def test_an_export_of_other_weights_is_never_served(bundle: Path) -> None:
    from dermaclass.models import ModelError

    export_openvino(bundle)
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["exports"]["openvino"]["weights_sha256"] == meta["weights_sha256"]
    meta["exports"]["openvino"]["weights_sha256"] = "0" * 64  # as if the bundle had been retrained in place
    (bundle / "model.json").write_text(json.dumps(meta))
    assert Predictor(bundle).backend != "openvino"
    with pytest.raises(ModelError, match="stale export"):
        Predictor(bundle, backend="openvino")


@needs_openvino
def test_bf16_is_served_only_after_its_valid_check(bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    from dermaclass.models import ModelError

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bfloat16 (OpenVINO would compute in float32)")
    cfg = load_config(cache_dir=str(tmp_path / "cache"))
    export_openvino(bundle)
    with pytest.raises(ModelError, match="bfloat16 inference has not been checked"):
        Predictor(bundle, backend="openvino-bf16")
    with pytest.raises(ExportError, match=r"bfloat16 inference loses .* not recorded"):
        check_bf16_bundle(bundle, colour_data, cfg=cfg, max_drop=-1.0)
    assert "openvino-bf16" not in json.loads((bundle / "model.json").read_text())["exports"]
    info = check_bf16_bundle(bundle, colour_data, cfg=cfg, max_drop=1.0)
    assert info["precision"] == "bf16" and info["drop"] <= 1.0
    bf16, f32 = Predictor(bundle, backend="openvino-bf16"), Predictor(bundle, backend="openvino")
    assert Predictor(bundle).backend == "openvino"  # bfloat16 only when asked
    x = _images(f32, colour_data)
    lb, lf = bf16.logits(x, tta=False), f32.logits(x, tta=False)
    assert 0 < np.abs(lb - lf).max() < 0.5  # bfloat16 rounding: close, not equal
    assert bf16.predict(x[0])["backend"] == "openvino-bf16"


def test_calibration_pick_draws_every_class_equally_then_fills_at_random() -> None:
    from dermaclass.serving.export import calibration_pick

    labels = ["nv"] * 90 + ["mel"] * 8 + ["df"] * 2
    pick = calibration_pick(labels, 12)
    drawn = [labels[i] for i in pick]
    assert len(pick) == 12 == len(set(pick.tolist())) and list(pick) == sorted(pick)
    assert drawn.count("df") == 2 and drawn.count("mel") >= 4  # the rare classes are all there, not ~1 in 8
    assert np.array_equal(pick, calibration_pick(labels, 12))  # the same draw every time
    assert len(calibration_pick(labels, 500)) == 100  # never more than there are


@needs_openvino
def test_an_ensemble_is_exported_and_published_member_by_member(
    tiny_ensemble: Path, colour_data: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from dermaclass.cli import app

    ens = tmp_path / "ens"
    shutil.copytree(tiny_ensemble, ens)
    result = CliRunner().invoke(app, ["export", str(ens), "--openvino"])
    assert result.exit_code == 0, result.output
    assert "member members/m1:" in result.output
    assert all((ens / "members" / m / "model.xml").is_file() for m in ("m0", "m1"))
    served, torch_pred = Predictor(ens), Predictor(ens, backend="torch")
    assert served.backend == "openvino" and torch_pred.backend == "torch"
    x = _images(torch_pred, colour_data)
    assert np.abs(served.logits(x, tta=False) - torch_pred.logits(x, tta=False)).max() < 1e-4
    # A published ensemble names its members' new (float16) weights and still serves.
    result = CliRunner().invoke(app, ["export", str(ens), "--no-onnx", "--publish", str(tmp_path / "pub")])
    assert result.exit_code == 0, result.output
    pub = json.loads((tmp_path / "pub" / "model.json").read_text())
    orig = json.loads((ens / "model.json").read_text())
    assert [m["weights_sha256"] for m in pub["members"]] != [m["weights_sha256"] for m in orig["members"]]
    assert pub["weights_dtype"] == "float16"
    published = Predictor(tmp_path / "pub", backend="torch")
    assert np.abs(published.logits(x, tta=False) - torch_pred.logits(x, tta=False)).max() < 0.05

"""Deployment exports of a bundle for a clinic's CPU: ONNX, and OpenVINO IR in float and int8.

Seed 002's training pipeline ends in OpenVINO on a CPU, and a clinic's workstation is a
CPU. Each export is written beside the bundle's weights, checked before it is kept, and
then served by the ``Predictor`` (serving.predictor, through serving.backends) when present:

- ``model.onnx`` (``export_onnx``): the torch network traced to ONNX with two outputs
  (logits, and the pooled backbone features the out-of-distribution score reads), kept
  only when onnxruntime's outputs match torch within ``atol``.
- ``model.xml`` + ``model.bin`` (``export_openvino``): the ONNX graph converted by
  ``openvino.convert_model``, compiled at float32 precision (this CPU would otherwise pick
  bfloat16), kept only when its outputs match torch within ``atol``.
- ``model-int8.xml`` + ``.bin`` (``export_int8``): NNCF post-training quantisation
  (``nncf.quantize``) calibrated on training-split images only (never test images), kept
  only when balanced accuracy on the valid split, with the bundle's test-time augmentation,
  drops by no more than ``max_drop`` (0.01) against the float model. The check is recorded
  in ``model.json`` (``exports.openvino-int8``). The first convolution and the classifier
  stay float (by measurement: valid top-1 agreement with float 0.985 against 0.961 with every
  layer int8, and derm7pt balanced accuracy -0.004 against -0.030). The calibration images
  are drawn class-balanced (``calibration_pick``) and NNCF runs its full bias correction: on
  the bundled model's valid split, top-1 agreement with float 0.990 and mean probability
  shift 0.016, against 0.985 and 0.018 for 300 random images with fast bias correction (seven
  settings compared on the valid split only: benchmarks/results/int8.json).
- ``openvino-bf16`` (``check_bf16``): no new file; the float IR run at bfloat16 inference
  precision on CPUs with native bfloat16 (AVX-512 BF16 or AMX), about half the float32
  latency here. Its outputs differ from torch by more than 1e-4, so it is served only after
  the same valid-split check as int8, recorded in ``exports.openvino-bf16``.

Every file is written to a temporary name and renamed; an existing export is replaced only
with ``force``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from dermaclass import models
from dermaclass.data.labels import class_indices
from dermaclass.fileio import atomic_path
from dermaclass.serving.backends import (
    BF16,
    ONNX_FILE,
    OPENVINO_FILE,
    OPENVINO_INT8_FILE,
    CompiledIR,
    ExportError,
    openvino,
)
from dermaclass.serving.predictor import Predictor

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The largest drop in valid balanced accuracy an int8 export (or bfloat16 inference) may cost.
INT8_MAX_DROP = 0.01


def _features_net(bundle: Path) -> tuple[torch.nn.Module, models.BundleMeta]:
    model, meta = models.load_bundle(bundle)
    # Two outputs: the logits, and the pooled backbone features that the out-of-distribution score reads.
    return models.WithFeatures(model, split=True, layer=meta.ood.get("layer", "auto")).eval(), meta


def _probe(meta: models.BundleMeta, n: int = 4) -> torch.Tensor:
    w, h = meta.input_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def _record(bundle: Path, backend: str, record: dict[str, Any]) -> None:
    """Note the export in model.json with the sha256 of the weights it was made from: the
    Predictor never serves an export of other weights (a bundle retrained in place)."""
    meta = models.read_bundle_meta(bundle)
    models.write_bundle_meta(
        bundle, meta.with_(exports={**meta.exports, backend: {**record, "weights_sha256": meta.weights_sha256}})
    )


def _to_onnx(net: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """Trace ``net`` to ONNX: one input, two outputs (logits, features), a dynamic batch axis."""
    torch.onnx.export(
        net,
        (x,),
        str(path),
        input_names=["input"],
        output_names=["logits", "features"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def _max_diff(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(g) - np.asarray(r)).max()) for g, r in zip(got, ref))


def export_onnx(bundle: str | Path, *, force: bool = False, atol: float = 1e-4) -> dict[str, Any]:
    """Write ``model.onnx`` beside the bundle's weights and check it against torch.

    Returns the path and the largest absolute output difference on random inputs; refuses to
    replace an existing export unless ``force`` and fails when the outputs differ by more
    than ``atol``.
    """
    bundle = Path(bundle)
    out = bundle / ONNX_FILE
    if out.exists() and not force:
        raise FileExistsError(f"{out}: an ONNX export is already there")
    net, meta = _features_net(bundle)
    x = _probe(meta)
    with atomic_path(out) as tmp:
        _to_onnx(net, x, tmp)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = [t.numpy() for t in net(x)]
        diff = _max_diff(sess.run(None, {"input": x.numpy()}), ref)
        if diff > atol:
            raise ExportError(f"{out}: ONNX outputs differ from torch by {diff:.2e} (> {atol:g}); not written")
    _record(bundle, "onnx", {"file": ONNX_FILE, "max_abs_diff": diff})
    return {"path": str(out), "max_abs_diff": diff}


# ---- OpenVINO ------------------------------------------------------------------------------
def _save_ir(ov_model: Any, target: Path, *, force: bool, check: Callable[[Path], T]) -> T:
    """Write ``target`` (.xml) and its .bin beside it through a temporary folder, once:
    ``check(temporary .xml)`` runs on the written files and raises to keep nothing; then the
    .xml is renamed last, so its presence marks a complete export. Returns what ``check`` returns."""
    ov = openvino()
    if target.exists() and not force:
        raise FileExistsError(f"{target}: an OpenVINO export is already there")
    tmp = Path(tempfile.mkdtemp(prefix=".openvino-", dir=target.parent))
    try:
        ov.save_model(ov_model, str(tmp / target.name), compress_to_fp16=False)
        result = check(tmp / target.name)
        target.unlink(missing_ok=True)  # the old .xml goes first: never a new .bin read by an old .xml
        os.replace(tmp / target.with_suffix(".bin").name, target.with_suffix(".bin"))
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _convert(bundle: Path, net: torch.nn.Module, meta: models.BundleMeta) -> Any:
    """The bundle's network as an OpenVINO model, from its ONNX export (made in a temporary
    folder when the bundle has none)."""
    ov = openvino()
    onnx = bundle / ONNX_FILE
    with tempfile.TemporaryDirectory() as tmp:
        if not onnx.is_file():
            onnx = Path(tmp) / ONNX_FILE
            _to_onnx(net, _probe(meta), onnx)
        return ov.convert_model(str(onnx))


def export_openvino(bundle: str | Path, *, force: bool = False, atol: float = 1e-4) -> dict[str, Any]:
    """Write the float OpenVINO IR (``model.xml`` + ``model.bin``) and check it against torch."""
    bundle = Path(bundle)
    target = bundle / OPENVINO_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target}: an OpenVINO export is already there")
    net, meta = _features_net(bundle)
    x = _probe(meta)
    with torch.no_grad():
        ref = [t.numpy() for t in net(x)]

    def matches_torch(xml: Path) -> float:
        compiled = CompiledIR(xml)
        # Every compiled shape: the static batches of 4 and 1, and the dynamic batch (3).
        diff = max(_max_diff(compiled(x[:n].numpy()), [r[:n] for r in ref]) for n in (4, 1, 3))
        if diff > atol:
            raise ExportError(f"{target}: OpenVINO outputs differ from torch by {diff:.2e} (> {atol:g}); not written")
        return diff

    diff = _save_ir(_convert(bundle, net, meta), target, force=force, check=matches_torch)
    _record(bundle, "openvino", {"file": OPENVINO_FILE, "max_abs_diff": diff, "precision": "f32"})
    return {"path": str(target), "max_abs_diff": diff}


def logits_balanced_accuracy(logits: np.ndarray, labels: Sequence[str], classes: Sequence[str]) -> float:
    from sklearn.metrics import balanced_accuracy_score

    y = class_indices(labels, classes, source="the valid split")
    return float(balanced_accuracy_score(y, logits.argmax(axis=1)))


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 natively here (else it computes in float32)."""
    return "BF16" in openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _float_layers(ov_model: Any) -> list[str]:
    """The layers int8 leaves in float: the first convolution (it reads the normalised image)
    and the last matrix multiply (the classifier), where quantisation error costs the most."""
    ops = ov_model.get_ordered_ops()
    convs = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    matmuls = [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]
    return convs[:1] + matmuls[-1:]


def _valid_check(
    pred: Any,
    *,
    kind: str,
    backend: str,
    float_ba: float,
    valid_images: Sequence[np.ndarray],
    valid_labels: Sequence[str],
    max_drop: float,
    target: Path,
    refused: str,
) -> dict[str, Any]:
    """Balanced accuracy of ``pred`` (now serving ``backend``) on the valid split against float,
    recorded as ``valid_balanced_accuracy_<kind>``; raises ``ExportError`` when it drops by more
    than ``max_drop``."""
    low_ba = logits_balanced_accuracy(pred.logits(valid_images), valid_labels, pred.classes)
    drop = float_ba - low_ba
    if drop > max_drop:
        raise ExportError(
            f"{target}: {backend} loses {drop:.4f} balanced accuracy on the valid split ({float_ba:.4f} -> "
            f"{low_ba:.4f}; the limit is {max_drop:g}); {refused}. Serve the float export instead."
        )
    return {
        "checked_on": f"valid split, {len(valid_images)} images, tta {pred.tta_mode if pred.tta else 'none'}",
        "valid_balanced_accuracy_float": float_ba,
        f"valid_balanced_accuracy_{kind}": low_ba,
        "drop": drop,
        "max_drop": max_drop,
    }


def check_bf16(
    bundle: str | Path,
    *,
    valid_images: Sequence[np.ndarray],
    valid_labels: Sequence[str],
    max_drop: float = INT8_MAX_DROP,
) -> dict[str, Any]:
    """Measure the float IR at bfloat16 inference precision on the valid split and record it
    (``exports.openvino-bf16``) when it holds up; the Predictor serves ``openvino-bf16`` only then."""
    bundle = Path(bundle)
    if not cpu_has_bf16():
        raise ExportError(
            f"{bundle}: this CPU has no native bfloat16 (OpenVINO would compute in float32): nothing "
            "to gain; serve --backend openvino"
        )
    if not (bundle / OPENVINO_FILE).is_file():
        export_openvino(bundle)
    if len(valid_images) == 0:
        raise ExportError(f"{bundle}: the bfloat16 check needs the valid split")
    pred = Predictor(bundle, backend="openvino")
    float_ba = logits_balanced_accuracy(pred.logits(valid_images), valid_labels, pred.classes)
    pred.use_openvino(bundle / OPENVINO_FILE, name=BF16)
    record = {
        "file": OPENVINO_FILE,
        "precision": "bf16",
        **_valid_check(
            pred,
            kind="bf16",
            backend="bfloat16 inference",
            float_ba=float_ba,
            valid_images=valid_images,
            valid_labels=valid_labels,
            max_drop=max_drop,
            target=bundle / OPENVINO_FILE,
            refused="not recorded",
        ),
    }
    _record(bundle, BF16, record)
    log.info(
        "%s: bfloat16 valid balanced accuracy %.4f (float %.4f)",
        bundle,
        record["valid_balanced_accuracy_bf16"],
        float_ba,
    )
    return {"path": str(bundle / OPENVINO_FILE), **record}


def quantize_ir(
    pred: Any, calibration_images: Sequence[np.ndarray], *, fast_bias_correction: bool = False
) -> tuple[Any, list[str]]:
    """(the int8 OpenVINO model, the layers kept float) of ``pred``'s bundle's float IR,
    calibrated by NNCF on ``calibration_images`` as ``pred`` preprocesses them."""
    import nncf

    dataset = nncf.Dataset(list(calibration_images), lambda im: pred.normalise([im]))
    float_model = openvino().Core().read_model(str(pred.bundle / OPENVINO_FILE))
    kept_float = _float_layers(float_model)
    quantized = nncf.quantize(
        float_model,
        dataset,
        subset_size=len(calibration_images),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        fast_bias_correction=fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(names=kept_float),
    )
    return quantized, kept_float


def export_int8(
    bundle: str | Path,
    *,
    calibration_images: Sequence[np.ndarray],
    valid_images: Sequence[np.ndarray],
    valid_labels: Sequence[str],
    max_drop: float = INT8_MAX_DROP,
    force: bool = False,
) -> dict[str, Any]:
    """Quantise the float IR to int8 with NNCF and keep it only if it holds up.

    ``calibration_images``: preprocessed (H, W, 3) uint8 training-split images (a few hundred);
    ``valid_images``/``valid_labels``: the valid split, on which balanced accuracy of the
    float and int8 models is compared with the bundle's test-time augmentation. A drop above
    ``max_drop`` raises ``ExportError`` and writes nothing.
    """
    bundle = Path(bundle)
    target = bundle / OPENVINO_INT8_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{target}: an int8 export is already there")
    if not (bundle / OPENVINO_FILE).is_file():
        export_openvino(bundle)
    if len(calibration_images) == 0 or len(valid_images) == 0:
        raise ExportError(f"{bundle}: int8 calibration needs training-split images and a valid split to check on")
    pred = Predictor(bundle, backend="openvino")
    quantized, kept_float = quantize_ir(pred, calibration_images)
    float_ba = logits_balanced_accuracy(pred.logits(valid_images), valid_labels, pred.classes)

    def holds_up(xml: Path) -> dict[str, Any]:
        pred.use_openvino(xml, name="openvino-int8")
        return {
            "file": OPENVINO_INT8_FILE,
            "calibration": f"train split, {len(calibration_images)} images",
            "bias_correction": "full",
            "float_layers": kept_float,
            **_valid_check(
                pred,
                kind="int8",
                backend="int8",
                float_ba=float_ba,
                valid_images=valid_images,
                valid_labels=valid_labels,
                max_drop=max_drop,
                target=target,
                refused="not written",
            ),
        }

    record = _save_ir(quantized, target, force=force, check=holds_up)
    int8_ba = record["valid_balanced_accuracy_int8"]
    _record(bundle, "openvino-int8", record)
    log.info("%s: int8 valid balanced accuracy %.4f (float %.4f)", target, int8_ba, float_ba)
    return {"path": str(target), **record}


def calibration_pick(labels: Sequence[str], n: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` images drawn class-balanced from ``labels``: an equal share of
    each class (all of a class smaller than its share), the rest at random from what is left.

    A random draw from HAM10000's train split holds about three dermatofibromas in 300, so
    the activation ranges int8 keeps would be those of naevi; the classes the model must not
    miss are also the rare ones.
    """
    labels = np.asarray(labels)
    n = min(n, len(labels))
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels.tolist()))
    share = n // max(len(classes), 1)
    chosen = [i for c in classes for i in rng.permutation(np.flatnonzero(labels == c))[:share]]
    rest = rng.permutation(np.setdiff1d(np.arange(len(labels)), chosen))[: n - len(chosen)]
    return np.sort(np.concatenate([np.asarray(chosen, dtype=int), rest.astype(int)]))


def quantize_bundle(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    cfg: Any = None,
    split_file: str | Path | None = None,
    n_calibration: int = 600,
    max_drop: float = INT8_MAX_DROP,
    force: bool = False,
) -> dict[str, Any]:
    """``dermaclass export --int8 --calibration DATA``: ``n_calibration`` images drawn
    class-balanced from the train split of ``data`` (by the bundle's split file) calibrate the
    int8 model, and the valid split checks it (``export_int8``). Test images are never read."""
    from dermaclass.evaluate.run import split_images

    parts = split_images(bundle, data, splits=("train", "valid"), split_file=split_file, cfg=cfg)
    train_labels, train_images = parts["train"]
    pick = calibration_pick(train_labels, n_calibration)
    return export_int8(
        bundle,
        calibration_images=[train_images[int(i)] for i in pick],
        valid_images=parts["valid"][1],
        valid_labels=parts["valid"][0],
        max_drop=max_drop,
        force=force,
    )


def check_bf16_bundle(
    bundle: str | Path,
    data: str | Path | Sequence[str | Path],
    *,
    cfg: Any = None,
    split_file: str | Path | None = None,
    max_drop: float = INT8_MAX_DROP,
) -> dict[str, Any]:
    """``dermaclass export --bf16 --calibration DATA``: ``check_bf16`` on the valid split of ``data``."""
    from dermaclass.evaluate.run import split_images

    labels, images = split_images(bundle, data, splits=("valid",), split_file=split_file, cfg=cfg)["valid"]
    return check_bf16(bundle, valid_images=images, valid_labels=labels, max_drop=max_drop)

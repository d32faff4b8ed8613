"""The runtimes a bundle is served on, behind one small interface: a runner is called with a
normalised NCHW float32 batch and returns (logits, pooled backbone features or None).

- ``TorchRunner``: the bundle's torch network (``models.WithFeatures``), always available;
- ``OnnxRunner``: onnxruntime on ``model.onnx``;
- ``CompiledIR``: OpenVINO on ``model.xml`` (float32 or bfloat16 inference precision) or
  ``model-int8.xml`` (NNCF int8).

Seed 002's pipeline ends in OpenVINO on a CPU, and a clinic's workstation is a CPU. The
exports themselves are written and checked by ``serving.export``; this module only opens
them. ``open_runner`` picks the backend a ``Predictor`` asked for (``auto``: the first
export present in ``AUTO_ORDER``, fastest first by measurement, see
benchmarks/results/inference.json) and refuses an export made from other weights.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dermaclass import models
from dermaclass.errors import ExportError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"  # + model.bin
OPENVINO_INT8_FILE = "model-int8.xml"  # + model-int8.bin
BF16 = "openvino-bf16"  # the float IR at bfloat16 inference precision: a backend without a file of its own

#: Serving backends; ``auto`` takes the first of ``AUTO_ORDER`` whose export the bundle has.
BACKENDS = ("torch", "onnx", "openvino", BF16, "openvino-int8")
EXPORT_FILES = {"onnx": ONNX_FILE, "openvino": OPENVINO_FILE, BF16: OPENVINO_FILE, "openvino-int8": OPENVINO_INT8_FILE}
RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino", BF16: "openvino", "openvino-int8": "openvino"}
#: Fastest first on one image with flip TTA (benchmarks/results/inference.json has the figures).
AUTO_ORDER = ("openvino", "onnx", "torch")


class Runner(Protocol):
    """What a ``Predictor`` calls: a normalised NCHW float32 batch -> (logits, features or None)."""

    name: str

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


class TorchRunner:
    """The torch network with its feature tap: one forward returns ``cat(logits, features)``."""

    name = "torch"

    def __init__(self, net: models.WithFeatures, n_classes: int) -> None:
        self.net, self.n_classes = net, n_classes

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self.net.eval()
        with torch.no_grad():
            both = self.net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()
        return both[:, : self.n_classes], both[:, self.n_classes :]


class OnnxRunner:
    """onnxruntime on an ONNX export (one input; outputs logits and, since features were
    exported, the pooled features)."""

    name = "onnx"

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise models.ModelError(f"{path}: no ONNX model; run `dermaclass export {path.parent} --onnx` first")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.has_features = len(self.session.get_outputs()) > 1

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(None, {"input": x})
        return out[0], (out[1] if len(out) > 1 else None)


def openvino() -> Any:
    """The openvino module, with a clear error when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("the openvino package is not installed; pip install 'dermaclass[openvino]'") from None
    return ov


#: Batch sizes compiled with a static shape beside the dynamic-batch model: one image (the
#: app and ``predict``) and its two or four flips (the bundle's TTA). OpenVINO's CPU plugin plans
#: a static shape once instead of per call (measured faster at 1 and 4:
#: benchmarks/results/inference.json).
STATIC_BATCHES = (1, 2, 4)


class CompiledIR:
    """An OpenVINO IR compiled for this CPU at ``precision``: a static-shape model for each of
    ``STATIC_BATCHES`` and a dynamic-batch one for every other batch. Calling it with a
    normalised NCHW float32 batch returns (logits, features).

    f32 by default: OpenVINO would otherwise run float models in bfloat16 on CPUs that have
    it, and the outputs would no longer match torch; an int8 IR keeps its int8 layers either
    way. ``bf16`` is what ``serving.export.check_bf16`` measures.
    """

    def __init__(self, xml: str | Path, *, threads: int = 0, precision: str = "f32", name: str = "openvino") -> None:
        self.name = name
        core = openvino().Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(xml))  # read once; the static shapes are reshaped clones
        # Positions of the two outputs, the same in every compiled shape (looked up once, not by name per call).
        names = [out.get_any_name() for out in model.outputs]
        self._outputs = (names.index("logits"), names.index("features"))
        self.static: dict[int, Any] = {}
        partial = model.input(0).get_partial_shape()
        shape = list(partial) if partial.rank.is_static else []
        if shape and all(d.is_static for d in shape[1:]):
            for n in STATIC_BATCHES:
                fixed = model.clone()
                fixed.reshape([n, *(d.get_length() for d in shape[1:])])
                self.static[n] = core.compile_model(fixed, "CPU", config)
        self.dynamic = core.compile_model(model, "CPU", config)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.static.get(len(x), self.dynamic)(x)
        return np.asarray(out[self._outputs[0]]), np.asarray(out[self._outputs[1]])


def open_openvino(bundle: Path, xml: Path, *, name: str = "openvino", threads: int = 0) -> CompiledIR:
    """The OpenVINO runner of ``xml`` (``name`` ``openvino-bf16`` compiles it at bfloat16)."""
    if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
        raise models.ModelError(f"{xml}: no OpenVINO export; run `dermaclass export {bundle} --openvino` first")
    return CompiledIR(xml, threads=threads, precision="bf16" if name == BF16 else "f32", name=name)


def fresh(bundle: Path, meta: models.BundleMeta, backend: str) -> bool:
    """Whether ``backend``'s export was made from these weights (exports made before dermaclass
    recorded it are trusted)."""
    made_from = (meta.exports.get(backend) or {}).get("weights_sha256")
    if made_from is not None and made_from != meta.weights_sha256:
        log.warning("%s: a stale export (made from other weights); not served", bundle / EXPORT_FILES[backend])
        return False
    return True


def pick_backend(bundle: Path, meta: models.BundleMeta, backend: str) -> str:
    """The backend to serve: ``auto`` resolved to the fastest fresh export whose runtime is
    installed, or the one asked for, refused when its export is stale or unchecked."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return next(
            b
            for b in AUTO_ORDER
            if b == "torch"
            or (
                (bundle / EXPORT_FILES[b]).is_file()
                and importlib.util.find_spec(RUNTIMES[b]) is not None
                and fresh(bundle, meta, b)
            )
        )
    if backend == BF16 and BF16 not in meta.exports:
        raise models.ModelError(
            f"{bundle}: bfloat16 inference has not been checked for this bundle; run "
            f"`dermaclass export {bundle} --bf16 --calibration DATA` first"
        )
    if backend != "torch" and not fresh(bundle, meta, backend):
        raise models.ModelError(
            f"{bundle / EXPORT_FILES[backend]}: made from other weights than "
            f"{models.BUNDLE_WEIGHTS} (a stale export); re-export with `dermaclass export "
            f"{bundle} --force`"
        )
    return backend


def open_runner(
    bundle: Path,
    meta: models.BundleMeta,
    backend: str,
    *,
    torch_runner: TorchRunner,
    threads: int = 0,
    needs_features: bool = False,
) -> Runner:
    """The runner of ``backend`` (``pick_backend``) for the bundle; ``torch_runner`` when the
    runtime is missing or an ONNX export lacks the features output the OOD score needs."""
    backend = pick_backend(bundle, meta, backend)
    if backend == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            log.warning("onnxruntime is not installed; using torch")
            return torch_runner
        runner = OnnxRunner(bundle / ONNX_FILE, threads=threads)
        if needs_features and not runner.has_features:
            log.warning(
                "%s: the ONNX export has no features output (made before features were exported); "
                "using torch (re-export with `dermaclass export %s --force`)",
                bundle / ONNX_FILE,
                bundle,
            )
            return torch_runner
        return runner
    if backend.startswith("openvino"):
        return open_openvino(bundle, bundle / EXPORT_FILES[backend], name=backend, threads=threads)
    return torch_runner

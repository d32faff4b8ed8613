"""Calibrated predictions from a model bundle, with exactly the preprocessing of training.

A ``Predictor`` is built from a bundle folder (``model.safetensors`` + ``model.json``; never
a pickle). It decodes any clinic image the data layer accepts, resizes it as the decode
cache did during training (cover + centre crop to the bundle's input size), normalises with
the bundle's statistics, and turns logits into probabilities with the bundle's temperature
(fitted on the validation split at the end of training). Operating points stored in the
bundle (e.g. a melanoma threshold for 90 % validation sensitivity) flag images whatever
the argmax says.

Batches go through fastai's ``Learner.get_preds`` on a ``TfmdDL``: the library's loop, not
ours. When the bundle folder holds ``model.onnx`` (``dermaclass export``) and onnxruntime is
installed, predictions run there instead (faster single-image latency on CPU).

Referral (refer.py): an image too small to judge is refused before the model sees it; the
result says "refer to a dermatologist" when the image is mostly one colour, when its
out-of-distribution score (the bundle's method: kNN on features, Sun et al. 2022;
Mahalanobis, Lee et al. 2018; or energy, Liu et al. 2020) is below the cut-off that 95 % of
validation images pass, i.e. it looks unlike the training data, or when the top calibrated
probability is below the bundle's floor.
Test-time augmentation averages the logits over flips (a dermoscopic image has no canonical
orientation). Grad-CAM (the grad-cam package) explains the predicted class.

This is decision support, not a diagnostic device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.data.core import DataLoaders, Datasets, TfmdDL
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

from dermaclass import models, refer
from dermaclass.data.images import COLOUR_CONSTANCY, apply_colour, fit_to_size, load_rgb
from dermaclass.data.loaders import ColourConstancy, ReadCached

log = logging.getLogger(__name__)


ONNX_FILE = "model.onnx"
REFER_MESSAGE = "Refer to a dermatologist"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of logits divided by the bundle's temperature (scipy's stable softmax)."""
    from scipy.special import softmax as _softmax

    return _softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def _cam(name: str) -> Any:
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, name)


#: The class-activation maps on offer (pytorch-grad-cam), loaded lazily.
CAM_METHODS: dict[str, Any] = {
    "gradcam": lambda: _cam("GradCAM"), "gradcam++": lambda: _cam("GradCAMPlusPlus"),
    "layercam": lambda: _cam("LayerCAM"), "eigencam": lambda: _cam("EigenCAM"),
}
#: Picked by measurement (benchmarks/results/refer.json, "cam"; 300 HAM10000 test images with
#: lesion masks): LayerCAM at stride 16 (8x6 at 128x96) put its peak inside the lesion in
#: 86 % of images and 55 % of its mass there, against Grad-CAM at the last block's 44 % and
#: 39 %; EigenCAM at the same layer scored 81 % / 57 % but is class-agnostic.
CAM_METHOD = "layercam"
CAM_STRIDE: int | None = 16


class Predictor:
    """A loaded bundle: classes, input size, normalisation, temperature and operating points."""

    def __init__(self, bundle: str | Path, *, threads: int = 0, backend: str = "auto") -> None:
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be auto, torch or onnx, not {backend!r}")
        self.bundle = Path(bundle)
        self.model, self.meta = models.load_bundle(self.bundle)
        if threads:  # only when asked: a library object must not change the process's torch settings
            models.set_threads(threads)
        # One model call at a time: Grad-CAM hooks and autograd on a shared module are not
        # thread-safe (concurrent app requests crashed the process), and 2 cores gain nothing.
        self._lock = threading.RLock()
        self.session = None
        onnx_path = self.bundle / ONNX_FILE
        if backend == "onnx" or (backend == "auto" and onnx_path.is_file()):
            self.session = _onnx_session(onnx_path, threads)
        self.backend = "onnx" if self.session is not None else "torch"
        self.classes: list[str] = list(self.meta["classes"])
        self.class_names: dict[str, str] = dict(self.meta.get("class_names") or {c: c for c in self.classes})
        self.input_size: tuple[int, int] = (int(self.meta["input_size"][0]), int(self.meta["input_size"][1]))
        # An image as large as the network's input is never too small to judge (a model trained
        # at 32x24 accepts 32x24); at 128x96, refer.MIN_SIDE (64 px) applies.
        self.min_side = min(refer.MIN_SIDE, min(self.input_size))
        calibration = self.meta.get("calibration") or {}
        self.temperature = float(calibration.get("temperature", 1.0))
        if not calibration:
            log.warning("%s: bundle has no calibration; probabilities are the uncalibrated softmax", self.bundle)
        self.operating_points: dict[str, dict[str, Any]] = {
            c: op for c, op in (self.meta.get("operating_points") or {}).items() if op.get("threshold") is not None
        }
        refer_cfg = calibration.get("refer") or {}
        self.refer_below = float(refer_cfg.get("min_top_probability", 0.0))
        ood = refer_cfg.get("ood") or {}
        self.ood_threshold: float | None = ood.get("threshold")
        self.ood_method: str = ood.get("method", "energy")
        if self.ood_method not in refer.OOD_METHODS:
            raise models.ModelError(f"{self.bundle / models.BUNDLE_META}: unknown out-of-distribution method "
                                    f"{self.ood_method!r}; this dermaclass knows {', '.join(refer.OOD_METHODS)}")
        self.ood_stats = refer.load_stats(self.bundle, self.ood_method) if self.ood_threshold is not None else {}
        # One feature tap for the life of the Predictor, at the layer the score was fitted on.
        self.feature_layer: str | None = ood.get("layer", "auto")
        self._net = models.WithFeatures(self.model, layer=self.feature_layer)
        self.feature_layer = self._net.layer
        if self.session is not None and self.ood_method != "energy" and len(self.session.get_outputs()) < 2:
            log.warning("%s: the ONNX export has no features output (made before features were exported); "
                        "using torch (re-export with `dermaclass export %s --force`)", onnx_path, self.bundle)
            self.session = None
            self.backend = "torch"
        self.colour_constancy: str = (self.meta.get("preprocessing") or {}).get("colour_constancy") or "none"
        # The bundle's test-time augmentation: its temperature and thresholds were fitted with it.
        self.tta: bool = self.meta.get("tta") == "flips4"
        if self.colour_constancy not in COLOUR_CONSTANCY:
            raise models.ModelError(f"{self.bundle / models.BUNDLE_META}: unknown colour_constancy "
                                    f"{self.colour_constancy!r}; this dermaclass knows {', '.join(COLOUR_CONSTANCY)}")

    def name(self, code: str) -> str:
        return self.class_names.get(code, code)

    # ---- preprocessing -------------------------------------------------------------------
    @staticmethod
    def _rgb(source: str | Path | bytes | Any) -> Any:
        from PIL import Image

        from dermaclass.data.images import to_rgb

        if isinstance(source, np.ndarray):
            source = Image.fromarray(np.asarray(source).astype(np.uint8))
        return to_rgb(source) if isinstance(source, Image.Image) else load_rgb(source)

    def preprocess(self, source: str | Path | bytes | Any) -> np.ndarray:
        """Any image (path, bytes, PIL image or HxWx3 uint8 array) -> (H, W, 3) uint8 at the input size."""
        return fit_to_size(self._rgb(source), self.input_size)

    # ---- predictions ---------------------------------------------------------------------
    def _normalise(self, images: Sequence[np.ndarray]) -> np.ndarray:
        norm = self.meta["normalization"]
        x = np.stack([apply_colour(np.asarray(im), self.colour_constancy) for im in images]).astype(np.float32) / 255.0
        x = (x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def logits(self, images: Sequence[np.ndarray], *, batch_size: int = 64, tta: bool | None = None) -> np.ndarray:
        """Raw logits for preprocessed (H, W, 3) uint8 arrays (e.g. a decode-cache view).

        ``tta``: the mean of the logits of the image and its horizontal, vertical and double flips;
        None: what the bundle records (``self.tta``).
        """
        return self.forward(images, batch_size=batch_size, tta=tta)[0]

    def forward(self, images: Sequence[np.ndarray], *, batch_size: int = 64,
                tta: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, C), pooled backbone features (N, D) or None) for preprocessed images.

        With ``tta`` both are the means over the four flips. Features are None only from an
        ONNX export made before features were exported and when the torch model is not wanted.
        """
        tta = self.tta if tta is None else tta
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32), None
        if tta:
            views = [lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1]]
            outs = [self.forward([np.ascontiguousarray(v(np.asarray(im))) for im in images],
                                 batch_size=batch_size, tta=False) for v in views]
            feats = None if any(o[1] is None for o in outs) else np.mean([o[1] for o in outs], axis=0)
            return np.mean([o[0] for o in outs], axis=0), feats
        with self._lock:
            return self._forward(images, batch_size=batch_size)

    def _forward(self, images: Sequence[np.ndarray], *, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        n_classes = len(self.classes)
        if self.session is not None:
            out = self.session.run(None, {"input": self._normalise(images)})
            return out[0], (out[1] if len(out) > 1 else None)
        net = self._net
        if len(images) <= batch_size:  # one batch (the app's case): a plain forward, no DataLoader set-up
            net.eval()
            with torch.no_grad():
                x = torch.from_numpy(self._normalise(images)).contiguous(memory_format=torch.channels_last)
                both = net(x).numpy()
            return both[:, :n_classes], both[:, n_classes:]
        norm = self.meta["normalization"]
        dl = TfmdDL(
            Datasets(list(range(len(images))), tfms=[[ReadCached(images), ColourConstancy(self.colour_constancy)]]),
            bs=batch_size, shuffle=False,
            after_batch=[IntToFloatTensor(), Normalize.from_stats(list(norm["mean"]), list(norm["std"]))],
            device=torch.device("cpu"),
        )
        learn = Learner(DataLoaders(dl, dl), net, loss_func=CrossEntropyLossFlat())
        learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
        out, _ = learn.get_preds(dl=dl, act=lambda x: x)
        both = out.numpy()
        return both[:, :n_classes], both[:, n_classes:]

    def probabilities(self, images: Sequence[np.ndarray], *, batch_size: int = 64,
                      tta: bool | None = None) -> np.ndarray:
        """Calibrated class probabilities, (N, C)."""
        return self.checked(softmax(self.logits(images, batch_size=batch_size, tta=tta), self.temperature))

    def checked(self, probs: np.ndarray, what: str = "these images") -> np.ndarray:
        """Refuse to hand out a NaN or Inf probability: a broken model must fail loudly, not read
        'actinic keratosis (nan %)'."""
        if not np.isfinite(probs).all():
            raise models.ModelError(f"{self.bundle}: the model gave non-finite probabilities for {what}; "
                                    "the bundle is broken (retrain or restore it)")
        return probs

    def ood_scores(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """The bundle's out-of-distribution score per image (higher = more like the training data)."""
        return refer.score(self.ood_method, logits=logits, features=features, stats=self.ood_stats)

    def referral(self, top_probability: float, ood_score: float, input_reason: str | None = None) -> dict[str, Any]:
        """Whether to refer instead of trusting the top class, and why (plain words for the UI).

        The reasons come in the order a clinician should read them: what is wrong with the
        image first, the model's uncertainty last.
        """
        reasons = []
        if input_reason:
            reasons.append(input_reason)
        if self.ood_threshold is not None and ood_score < self.ood_threshold:
            reasons.append(f"{refer.NOT_DERMOSCOPY} that the model can judge: it is unlike the images it was trained "
                           f"on (out-of-distribution score {ood_score:.2f}, below the cut-off {self.ood_threshold:.2f})")
        if top_probability < self.refer_below:
            reasons.append(f"the most likely class has only {top_probability:.0%} probability "
                           f"(below the {self.refer_below:.0%} floor)")
        return {"refer": bool(reasons), "message": REFER_MESSAGE if reasons else None, "reasons": reasons}

    def predict(self, source: str | Path | bytes | Any, *, top_k: int = 3, tta: bool | None = None) -> dict[str, Any]:
        """One image -> calibrated probabilities (sorted), top-k, operating-point flags and referral."""
        tta = self.tta if tta is None else tta
        what = str(source) if isinstance(source, (str, Path)) else "this image"
        rgb = self._rgb(source)
        try:
            input_reason = refer.input_problem(rgb, min_side=self.min_side)  # before the model: raises for an image too small to judge
        except refer.InputProblem as exc:
            raise refer.InputProblem(f"{what}: {exc}" if isinstance(source, (str, Path)) else str(exc)) from None
        logits, features = self.forward([fit_to_size(rgb, self.input_size)], tta=tta)
        probs = self.checked(softmax(logits, self.temperature), what)[0]
        ood = float(self.ood_scores(logits, features)[0])
        order = np.argsort(-probs, kind="stable")
        flags = {c: {"probability": float(probs[self.classes.index(c)]), "threshold": op["threshold"],
                     "flagged": bool(probs[self.classes.index(c)] >= op["threshold"]),
                     "target_sensitivity": op.get("target_sensitivity")}
                 for c, op in self.operating_points.items() if c in self.classes}
        return {
            "top": self.classes[int(order[0])],
            "top_k": [{"class": self.classes[i], "name": self.name(self.classes[i]), "probability": float(probs[i])}
                      for i in order[:top_k]],
            "probabilities": {self.classes[i]: float(probs[i]) for i in order},
            "flags": flags,
            "ood_score": ood,
            "ood_method": self.ood_method,
            "referral": self.referral(float(probs[order[0]]), ood, input_reason),
            "backend": self.backend,
            "tta": "flips4" if tta else None,
            "disclaimer": self.meta.get("disclaimer"),
        }

    # ---- explanation -----------------------------------------------------------------------
    def cam_layers(self, stride: int | None = CAM_STRIDE) -> list[torch.nn.Module]:
        """The layer a class-activation map reads: the backbone stage at ``stride`` (timm's
        ``feature_info``; 8x6 at 128x96 for stride 16), or the whole body (its last feature map)
        when ``stride`` is None or the architecture has no such stage."""
        body = self.model[0]
        net = getattr(body, "model", None)
        for f in (getattr(net, "feature_info", None) or []) if stride else []:
            if f.get("reduction") == stride:
                return [net.get_submodule(f["module"])]
        return [body]

    def gradcam(self, source: str | Path | bytes | Any, *, class_index: int | None = None,
                display_width: int | None = None, method: str = CAM_METHOD,
                stride: int | None = CAM_STRIDE) -> tuple[np.ndarray, np.ndarray]:
        """Class-activation map of the predicted (or given) class: (heatmap in [0, 1] at input
        size, RGB overlay uint8).

        ``method`` (``CAM_METHODS``, all pytorch-grad-cam) at the backbone stage of ``stride``:
        the default was picked by the pointing game against HAM10000's lesion masks
        (benchmarks/bench_refer.py). ``display_width``: draw the overlay on the uploaded image
        itself (the same centre crop the model saw) at up to this width, instead of on the
        128x96 model input, so a clinician can check the heat against the lesion.
        """
        from PIL import Image
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        original = self._rgb(source)
        image = fit_to_size(original, self.input_size)
        x = torch.from_numpy(self._normalise([image]))
        if class_index is None:
            class_index = int(self.logits([image]).argmax(1)[0])
        with self._lock, CAM_METHODS[method]()(model=self.model, target_layers=self.cam_layers(stride)) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])[0]
        shown, shown_heat = image, heat
        if display_width:
            w_in, h_in = self.input_size
            w = max(w_in, min(int(display_width), original.width))
            size = (w, max(1, round(w * h_in / w_in)))
            shown = fit_to_size(original, size)
            shown_heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
            shown_heat = np.clip(shown_heat, 0.0, 1.0)
        overlay = show_cam_on_image(shown.astype(np.float32) / 255.0, shown_heat, use_rgb=True, image_weight=0.6)
        return heat, overlay




# ---- ONNX ----------------------------------------------------------------------------------
def _onnx_session(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed; using torch")
        return None
    if not path.is_file():
        raise models.ModelError(f"{path}: no ONNX model; run `dermaclass export {path.parent} --onnx` first")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def export_onnx(bundle: str | Path, *, force: bool = False, atol: float = 1e-4) -> dict[str, Any]:
    """Write ``model.onnx`` beside the bundle's weights and check it against torch.

    Returns the path and the largest absolute logit difference on random inputs; refuses to
    replace an existing export unless ``force`` and fails when the outputs differ by more
    than ``atol``.
    """
    from dermaclass.fileio import atomic_path

    bundle = Path(bundle)
    out = bundle / ONNX_FILE
    if out.exists() and not force:
        raise FileExistsError(f"{out}: an ONNX export is already there")
    model, meta = models.load_bundle(bundle)
    w, h = meta["input_size"]
    x = torch.randn(4, 3, int(h), int(w))
    # Two outputs: the logits, and the pooled backbone features that the out-of-distribution score reads.
    ood = ((meta.get("calibration") or {}).get("refer") or {}).get("ood") or {}
    net = models.WithFeatures(model, split=True, layer=ood.get("layer", "auto")).eval()
    with atomic_path(out) as tmp:
        torch.onnx.export(net, (x,), str(tmp), input_names=["input"], output_names=["logits", "features"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17, dynamo=False)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = [t.numpy() for t in net(x)]
        got = sess.run(None, {"input": x.numpy()})
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        if diff > atol:
            raise models.ModelError(f"{out}: ONNX outputs differ from torch by {diff:.2e} (> {atol:g}); not written")
    return {"path": str(out), "max_abs_diff": diff}

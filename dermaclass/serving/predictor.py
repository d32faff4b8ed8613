"""Calibrated predictions from a model bundle, with exactly the preprocessing of training.

A ``Predictor`` is built from a bundle folder (``model.safetensors`` + ``model.json``; never
a pickle). It decodes any clinic image the data layer accepts, resizes it as the decode
cache did during training (cover + centre crop to the bundle's input size), normalises with
the bundle's statistics, and turns logits into probabilities with the bundle's prior shift
(per-class logit offsets, when it has one) and temperature, both fitted on the validation
split at the end of training. Operating points stored in the
bundle (e.g. a melanoma threshold for 90 % validation sensitivity) flag images whatever
the argmax says.

One forward path, whatever the number of images: the same normalisation (``normalise``)
feeds the network in chunks of ``batch_size`` (bounded memory for a whole test split) on the
serving backend (serving.backends): torch, or an export beside the weights that
serving.export wrote: onnxruntime (``model.onnx``), OpenVINO float (``model.xml``) or
OpenVINO int8 (``model-int8.xml``, used only when asked: it passed its accuracy check, but
float is the default). ``auto`` takes the first export present in ``backends.AUTO_ORDER``,
fastest first by measurement (benchmarks/results/inference.json). Evaluation during
training uses fastai's ``get_preds`` on the training DataLoaders; this module serves bundles.

Referral (serving.refer): an image too small to judge is refused before the model sees it; the
result says "refer to a dermatologist" when the image is mostly one colour, when its
out-of-distribution score (the bundle's method: kNN on features, Sun et al. 2022;
Mahalanobis, Lee et al. 2018; or energy, Liu et al. 2020) is below the cut-off that 95 % of
validation images pass, i.e. it looks unlike the training data, or when the top calibrated
probability is below the bundle's floor.
Test-time augmentation averages the logits over flips (a dermoscopic image has no canonical
orientation). Class-activation maps (serving.explain) show where the answer came from.

This is decision support, not a diagnostic device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermaclass import models
from dermaclass.data.images import apply_colour, fit_to_size, load_rgb
from dermaclass.models import COMBINE_RULES
from dermaclass.serving import backends, explain, refer
from dermaclass.serving.combine import agreement, served

log = logging.getLogger(__name__)


REFER_MESSAGE = "Refer to a dermatologist"
#: the four views of flip test-time augmentation, whose logits are averaged
FLIP_VIEWS = (lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1])
#: the views of each test-time augmentation mode (model.json ``tta``; train.callbacks.FLIPS in
#: the same order): flips2 is the image and its mirror, half the cost of flips4
TTA_VIEWS = {"flips2": FLIP_VIEWS[:2], "flips4": FLIP_VIEWS}


class Predictor:
    """A loaded bundle: classes, input size, normalisation, temperature and operating points."""

    def __init__(self, bundle: str | Path, *, threads: int = 0, backend: str = "auto") -> None:
        if backend not in ("auto", *backends.BACKENDS):
            raise ValueError(f"backend must be auto or one of {', '.join(backends.BACKENDS)}, not {backend!r}")
        self.bundle = Path(bundle)
        self.threads = threads
        # One model call at a time: Grad-CAM hooks and autograd on a shared module are not
        # thread-safe (concurrent app requests crashed the process), and 2 cores gain nothing.
        self.lock = threading.RLock()
        #: an ensemble's networks, each a one-network Predictor on its member folder; [] for one network
        self.members: list[Predictor] = []
        meta = models.read_bundle_meta(self.bundle)
        if meta.is_ensemble:
            self._load_members(meta, backend)
        else:
            self._load_network(backend)
        self.classes: list[str] = list(self.meta.classes)
        self.class_names: dict[str, str] = self.meta.names
        # An image as large as the network's input is never too small to judge (a model trained
        # at 32x24 accepts 32x24); at 128x96, refer.MIN_SIDE (64 px) applies.
        self.min_side = min(refer.MIN_SIDE, *(min(n.input_size) for n in self.networks))
        self.temperature = self.meta.temperature
        # The prior shift (calibration.offsets): added to the logits before the temperature.
        self.offsets = None if self.meta.offsets is None else np.asarray(self.meta.offsets, dtype=np.float64)
        if not self.meta.calibration:
            log.warning("%s: bundle has no calibration; probabilities are the uncalibrated softmax", self.bundle)
        self.operating_points: dict[str, dict[str, Any]] = {
            c: op for c, op in self.meta.operating_points.items() if op.get("threshold") is not None
        }
        self.refer_below = float(self.meta.refer.get("min_top_probability", 0.0))
        # The bundle's test-time augmentation: its temperature and thresholds were fitted with it.
        self.tta: bool = self.meta.tta is not None
        #: the views averaged when TTA is on: the bundle's mode, or the four flips when a bundle
        #: without TTA is asked for it
        self.tta_mode: str = self.meta.tta or "flips4"
        #: how an ensemble's networks are combined (``combine``); a single network has nothing to combine
        self.combine_rule: str = self.meta.ensemble.get("combine", COMBINE_RULES["logits"])

    @property
    def networks(self) -> list[Predictor]:
        """The networks that answer: an ensemble's members, or this Predictor's own network."""
        return self.members or [self]

    @property
    def input_sizes(self) -> list[tuple[int, int]]:
        """Every input size a network of the bundle reads (one for a single network)."""
        return list(dict.fromkeys(tuple(n.input_size) for n in self.networks))

    def _load_members(self, meta: models.BundleMeta, backend: str) -> None:
        """An ensemble: each member folder is a one-network bundle, checked against the list."""
        self.meta = meta
        for entry, folder in zip(meta.members, meta.member_folders(self.bundle)):
            if not (folder / models.BUNDLE_META).is_file():
                raise models.ModelError(
                    f"{folder}: member {entry['path']} of the ensemble {self.bundle} is missing; "
                    "the bundle is incomplete (copy the whole folder, or retrain)"
                )
            member = Predictor(folder, threads=self.threads, backend=backend)
            if member.members:
                raise models.ModelError(f"{folder}: a member of {self.bundle} is itself an ensemble")
            if member.meta.weights_sha256 != entry["weights_sha256"]:
                raise models.ModelError(
                    f"{folder}: not the network {self.bundle / models.BUNDLE_META} lists (sha256 "
                    "mismatch: a member was replaced or retrained); retrain or restore the bundle"
                )
            if member.classes != list(meta.classes):
                raise models.ModelError(
                    f"{folder}: classes {member.classes} differ from the ensemble's {list(meta.classes)}"
                )
            self.members.append(member)
        self.model = self.members[0].model
        self.runner = None  # each member runs its own network
        self.backend = "+".join(dict.fromkeys(m.backend for m in self.members))
        # The largest member's size: what the app shows and what a caller preprocesses to.
        self.input_size = max((tuple(m.input_size) for m in self.members), key=lambda s: s[0] * s[1])
        self.colour_constancy = meta.colour_constancy
        ood = meta.ood
        self.ood_method = ood.get("method", refer.ENSEMBLE_OOD)
        self.ood_threshold = ood.get("threshold") if any(m.ood_threshold is not None for m in self.members) else None
        self.ood_stats, self.feature_layer = {}, None

    def _load_network(self, backend: str) -> None:
        self.model, self.meta = models.load_bundle(self.bundle)
        # (x / 255 - mean) / std as one per-channel multiply-add (NCHW broadcast), fixed per bundle.
        std = np.asarray(self.meta.normalization["std"], np.float32)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
        self._shift = (-np.asarray(self.meta.normalization["mean"], np.float32) / std).astype(np.float32)[:, None, None]
        threads = self.threads
        if threads:  # only when asked: a library object must not change the process's torch settings
            models.set_threads(threads)
        self.input_size: tuple[int, int] = self.meta.input_size
        ood = self.meta.ood
        self.ood_threshold: float | None = ood.get("threshold")
        self.ood_method: str = ood.get("method", "energy")
        self.ood_stats = refer.load_stats(self.bundle, self.ood_method) if self.ood_threshold is not None else {}
        # One feature tap for the life of the Predictor, at the layer the score was fitted on.
        self.feature_layer: str | None = ood.get("layer", "auto")
        self._net = models.WithFeatures(self.model, layer=self.feature_layer)
        self.feature_layer = self._net.layer
        self.runner: backends.Runner = backends.open_runner(
            self.bundle,
            self.meta,
            backend,
            threads=threads,
            needs_features=self.ood_method != "energy",
            torch_runner=backends.TorchRunner(self._net, len(self.meta.classes)),
        )
        self.backend = self.runner.name
        self.colour_constancy: str = self.meta.colour_constancy

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
    def use_openvino(self, xml: str | Path, *, name: str = "openvino") -> None:
        """Serve from this OpenVINO IR from now on (``dermaclass export --openvino`` / ``--int8``)."""
        self.runner = backends.open_openvino(self.bundle, Path(xml), name=name, threads=self.threads)
        self.backend = name

    def normalise(self, images: Sequence[np.ndarray], *, colour: bool = True) -> np.ndarray:
        """Preprocessed (H, W, 3) uint8 images -> the normalised NCHW float32 batch every backend reads.

        ``colour=False``: the images have had the bundle's colour step already.
        """
        # The multiply-add on the NCHW float copy that astype makes of the transposed uint8 view:
        # a tenth of the time of three whole-array passes and a transpose (0.15 -> 0.04 ms for
        # one image, 20 -> 1.5 ms for 64), equal to 5e-7.
        x = np.stack(
            [apply_colour(np.asarray(im), self.colour_constancy) if colour else np.asarray(im) for im in images]
        )
        x = x.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        x *= self._scale
        x += self._shift
        return x

    def logits(self, images: Images, *, batch_size: int = 64, tta: bool | None = None) -> np.ndarray:
        """Raw logits for preprocessed (H, W, 3) uint8 arrays (e.g. a decode-cache view).

        ``tta``: the mean of the logits over the views of ``self.tta_mode`` (the image and its
        mirror, or its horizontal, vertical and double flips); None: what the bundle records
        (``self.tta``).
        """
        return self.forward(images, batch_size=batch_size, tta=tta)[0]

    def forward(
        self, images: Images, *, batch_size: int = 64, tta: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, C), pooled backbone features (N, D) or None) for preprocessed images.

        With ``tta`` both are the means over the views of ``self.tta_mode``. Features are None only from an
        ONNX export made before features were exported and when the torch model is not wanted,
        and for an ensemble, whose logits are the members' mean (``combine``) and whose
        members' features live in different spaces (``member_outputs`` has them).
        ``images``: at ``input_size``, or a mapping {input size: images} with every size in
        ``input_sizes`` (an ensemble of members at several sizes, e.g. from the decode cache).
        """
        return self.served(self.member_outputs(images, batch_size=batch_size, tta=tta))

    def served(self, outs: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, features) this bundle serves from its networks' outputs (``member_outputs``),
        combined by its own rule (model.json ``ensemble.combine``) and calibration."""
        return served(outs, self.combine_rule, temperature=self.temperature, offsets=self.offsets)

    def member_outputs(
        self, images: Images, *, batch_size: int = 64, tta: bool | None = None
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(logits, features) of every network (one for a single network), each at its own size."""
        # The ensemble's mode governs its members' views: it was calibrated with them.
        views = TTA_VIEWS[self.tta_mode] if (self.tta if tta is None else tta) else ()
        return [
            n._network_forward(_at(images, n.input_size), batch_size=batch_size, views=views) for n in self.networks
        ]

    def preprocess_all(self, source: str | Path | bytes | Any) -> dict[tuple[int, int], np.ndarray]:
        """Any image -> {input size: (H, W, 3) uint8} for every network's size (decoded once)."""
        rgb = self._rgb(source)
        return {size: fit_to_size(rgb, size) for size in self.input_sizes}

    def _network_forward(
        self, images: Sequence[np.ndarray], *, batch_size: int, views: Sequence[Callable[[np.ndarray], np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32), None
        if views:
            # The views of a group of images go through as one batch (one call for the app's
            # single image, not four in a row), a group at a time to keep memory bounded.
            logits, feats = [], []
            for i in range(0, len(images), batch_size):
                # The colour step once per image, not per view: Shades-of-Gray is independent of
                # pixel order, so the flip of the corrected image is the corrected flip, exactly.
                group = [
                    apply_colour(np.asarray(images[j]), self.colour_constancy)
                    for j in range(i, min(i + batch_size, len(images)))
                ]
                with self.lock:
                    lo, fe = self._forward(
                        [np.ascontiguousarray(v(im)) for v in views for im in group],
                        batch_size=batch_size,
                        colour=False,
                    )
                logits.append(lo.reshape(len(views), len(group), -1).mean(axis=0))
                feats.append(None if fe is None else fe.reshape(len(views), len(group), -1).mean(axis=0))
            return (np.concatenate(logits), None if any(f is None for f in feats) else np.concatenate(feats))
        with self.lock:
            return self._forward(images, batch_size=batch_size)

    def _forward(
        self, images: Sequence[np.ndarray], *, batch_size: int, colour: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        # Chunks of batch_size keep the memory of a whole test split bounded; one image (the
        # app) is one chunk with no DataLoader set-up.
        # Indexed one by one: a decode-cache view (CachedImages) has no slices.
        outs = [
            self.runner(self.normalise([images[j] for j in range(i, min(i + batch_size, len(images)))], colour=colour))
            for i in range(0, len(images), batch_size)
        ]
        features = None if any(f is None for _, f in outs) else np.concatenate([f for _, f in outs])
        return np.concatenate([lo for lo, _ in outs]), features

    def probabilities(self, images: Images, *, batch_size: int = 64, tta: bool | None = None) -> np.ndarray:
        """Calibrated class probabilities, (N, C)."""
        return self.checked(self.calibrated(self.logits(images, batch_size=batch_size, tta=tta)))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities of the logits, shifted by the bundle's prior shift (if any) and divided
        by its temperature (scipy's stable softmax)."""
        from scipy.special import softmax

        z = np.asarray(logits, dtype=np.float64)
        return softmax((z if self.offsets is None else z + self.offsets) / self.temperature, axis=1)

    def checked(self, probs: np.ndarray, what: str = "these images") -> np.ndarray:
        """Refuse to hand out a NaN or Inf probability: a broken model must fail loudly, not read
        'actinic keratosis (nan %)'."""
        if not np.isfinite(probs).all():
            raise models.ModelError(
                f"{self.bundle}: the model gave non-finite probabilities for {what}; "
                "the bundle is broken (retrain or restore it)"
            )
        return probs

    def ood_scores(
        self,
        logits: np.ndarray,
        features: np.ndarray | None,
        *,
        members: Sequence[tuple[np.ndarray, np.ndarray | None]] | None = None,
    ) -> np.ndarray:
        """The bundle's out-of-distribution score per image (higher = more like the training data).

        An ensemble needs ``members`` (``member_outputs``): its score is the mean of the members'
        margins above their own cut-offs (``refer.member_margins``).
        """
        if not self.members:
            return refer.score(self.ood_method, logits=logits, features=features, stats=self.ood_stats)
        if members is None or len(members) != len(self.members):
            raise ValueError("an ensemble's out-of-distribution score needs every member's outputs (member_outputs)")
        scored = [(m, out) for m, out in zip(self.members, members) if m.ood_threshold is not None]
        if not scored:
            return np.zeros(len(logits))
        return refer.member_margins(
            [m.ood_scores(*out) for m, out in scored],
            [m.ood_threshold for m, _ in scored],
            [m.meta.ood.get("scale") or 0.0 for m, _ in scored],
        )

    def referral(self, top_probability: float, ood_score: float, input_reason: str | None = None) -> dict[str, Any]:
        """Whether to refer instead of trusting the top class, and why (plain words for the UI).

        The reasons come in the order a clinician should read them: what is wrong with the
        image first, the model's uncertainty last.
        """
        reasons = []
        if input_reason:
            reasons.append(input_reason)
        if self.ood_threshold is not None and ood_score < self.ood_threshold:
            reasons.append(
                f"{refer.NOT_DERMOSCOPY} that the model can judge: it is unlike the images it was trained "
                f"on (out-of-distribution score {ood_score:.2f}, below the cut-off {self.ood_threshold:.2f})"
            )
        if top_probability < self.refer_below:
            reasons.append(
                f"the most likely class has only {top_probability:.0%} probability "
                f"(below the {self.refer_below:.0%} floor)"
            )
        return {"refer": bool(reasons), "message": REFER_MESSAGE if reasons else None, "reasons": reasons}

    def predict(self, source: str | Path | bytes | Any, *, top_k: int = 3, tta: bool | None = None) -> dict[str, Any]:
        """One image -> calibrated probabilities (sorted), top-k, operating-point flags and referral."""
        tta = self.tta if tta is None else tta
        what = str(source) if isinstance(source, (str, Path)) else "this image"
        rgb = self._rgb(source)
        try:
            input_reason = refer.input_problem(
                rgb, min_side=self.min_side
            )  # before the model: raises for an image too small to judge
        except refer.InputProblem as exc:
            raise refer.InputProblem(f"{what}: {exc}" if isinstance(source, (str, Path)) else str(exc)) from None
        outs = self.member_outputs({size: [fit_to_size(rgb, size)] for size in self.input_sizes}, tta=tta)
        logits, features = self.served(outs)
        probs = self.checked(self.calibrated(logits), what)[0]
        ood = float(self.ood_scores(logits, features, members=outs)[0])
        order = np.argsort(-probs, kind="stable")
        flags = {
            c: {
                "probability": float(probs[self.classes.index(c)]),
                "threshold": op["threshold"],
                "flagged": bool(probs[self.classes.index(c)] >= op["threshold"]),
                "target_sensitivity": op.get("target_sensitivity"),
                "fitted_on": models.operating_point_origin(op, self.meta.calibration),
            }
            for c, op in self.operating_points.items()
            if c in self.classes
        }
        return {
            "top": self.classes[int(order[0])],
            "top_k": [
                {"class": self.classes[i], "name": self.name(self.classes[i]), "probability": float(probs[i])}
                for i in order[:top_k]
            ],
            "probabilities": {self.classes[i]: float(probs[i]) for i in order},
            "flags": flags,
            "ood_score": ood,
            "ood_method": self.ood_method,
            "referral": self.referral(float(probs[order[0]]), ood, input_reason),
            "backend": self.backend,
            "tta": self.tta_mode if tta else None,
            "networks": len(self.networks),
            "agreement": agreement([self.calibrated(lo)[0] for lo, _ in outs], int(order[0]), self.classes),
            "disclaimer": self.meta.disclaimer,
        }

    # ---- explanation -----------------------------------------------------------------------
    def gradcam(
        self,
        source: str | Path | bytes | Any,
        *,
        class_index: int | None = None,
        display_width: int | None = None,
        method: str = explain.CAM_METHOD,
        stride: int | None = explain.CAM_STRIDE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class-activation map of the predicted (or given) class: (heatmap in [0, 1] at input
        size, RGB overlay uint8); ``serving.explain.explain`` says which map and why."""
        return explain.explain(
            self, self._rgb(source), class_index=class_index, display_width=display_width, method=method, stride=stride
        )


# ---- images at each network's size ---------------------------------------------------------
#: Preprocessed images: one sequence at the bundle's input size, or {input size: sequence}.
Images = Sequence[np.ndarray] | Mapping[tuple[int, int], Sequence[np.ndarray]]


class _Resized(Sequence):
    """Preprocessed images seen at another input size, resized one by one when read (cover and
    centre crop again, as ``fit_to_size`` does)."""

    def __init__(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> None:
        self.images, self.size = images, tuple(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        from PIL import Image

        im = np.asarray(self.images[i])
        return im if im.shape[1::-1] == self.size else fit_to_size(Image.fromarray(im), self.size)


def _at(images: Images, size: tuple[int, int]) -> Sequence[np.ndarray]:
    """The images a network of ``size`` reads."""
    if isinstance(images, Mapping):
        if tuple(size) not in images:
            raise ValueError(
                f"no images at {size[0]}x{size[1]}, a network's input size "
                f"(given: {', '.join(f'{w}x{h}' for w, h in images)})"
            )
        return images[tuple(size)]
    return _Resized(images, size) if len(images) and np.asarray(images[0]).shape[1::-1] != tuple(size) else images

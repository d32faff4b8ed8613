"""Calibrated predictions from a model bundle, with exactly the preprocessing of training.

A ``Predictor`` is built from a bundle folder (``model.safetensors`` + ``model.json``; never
a pickle). It decodes any clinic image the data layer accepts, resizes it as the decode
cache did during training (cover + centre crop to the bundle's input size), normalises with
the bundle's statistics, and turns logits into probabilities with the bundle's temperature
(fitted on the validation split at the end of training). Operating points stored in the
bundle (e.g. a melanoma threshold for 90 % validation sensitivity) flag images whatever
the argmax says.

Batches go through fastai's ``Learner.get_preds`` on a ``TfmdDL``: the library's loop, not
ours. This is decision support, not a diagnostic device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.data.core import DataLoaders, Datasets, TfmdDL
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat

from dermaclass import models
from dermaclass.data.images import fit_to_size, load_rgb
from dermaclass.data.loaders import ReadCached
from dermaclass.evaluate.metrics import softmax

log = logging.getLogger(__name__)


class Predictor:
    """A loaded bundle: classes, input size, normalisation, temperature and operating points."""

    def __init__(self, bundle: str | Path, *, threads: int = 0) -> None:
        self.bundle = Path(bundle)
        self.model, self.meta = models.load_bundle(self.bundle)
        models.set_threads(threads)
        self.classes: list[str] = list(self.meta["classes"])
        self.class_names: dict[str, str] = dict(self.meta.get("class_names") or {c: c for c in self.classes})
        self.input_size: tuple[int, int] = (int(self.meta["input_size"][0]), int(self.meta["input_size"][1]))
        calibration = self.meta.get("calibration") or {}
        self.temperature = float(calibration.get("temperature", 1.0))
        if not calibration:
            log.warning("%s: bundle has no calibration; probabilities are the uncalibrated softmax", self.bundle)
        self.operating_points: dict[str, dict[str, Any]] = {
            c: op for c, op in (self.meta.get("operating_points") or {}).items() if op.get("threshold") is not None
        }

    # ---- preprocessing -------------------------------------------------------------------
    def preprocess(self, source: str | Path | bytes | Any) -> np.ndarray:
        """Any image (path, bytes, PIL image or HxWx3 uint8 array) -> (H, W, 3) uint8 at the input size."""
        from PIL import Image

        from dermaclass.data.images import to_rgb

        if isinstance(source, np.ndarray):
            source = Image.fromarray(np.asarray(source).astype(np.uint8))
        img = to_rgb(source) if isinstance(source, Image.Image) else load_rgb(source)
        return fit_to_size(img, self.input_size)

    # ---- predictions ---------------------------------------------------------------------
    def logits(self, images: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
        """Raw logits for preprocessed (H, W, 3) uint8 arrays (e.g. a decode-cache view)."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        norm = self.meta["normalization"]
        dl = TfmdDL(
            Datasets(list(range(len(images))), tfms=[[ReadCached(images)]]), bs=batch_size, shuffle=False,
            after_batch=[IntToFloatTensor(), Normalize.from_stats(list(norm["mean"]), list(norm["std"]))],
            device=torch.device("cpu"),
        )
        learn = Learner(DataLoaders(dl, dl), self.model, loss_func=CrossEntropyLossFlat())
        learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
        out, _ = learn.get_preds(dl=dl, act=lambda x: x)
        return out.numpy()

    def probabilities(self, images: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
        """Calibrated class probabilities, (N, C)."""
        return softmax(self.logits(images, batch_size=batch_size), self.temperature)

    def flags(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Per operating class, which rows reach its threshold."""
        return {c: probs[:, self.classes.index(c)] >= op["threshold"] for c, op in self.operating_points.items()
                if c in self.classes}

    def predict(self, source: str | Path | bytes | Any) -> dict[str, Any]:
        """One image -> probabilities per class (sorted), the top class and operating-point flags."""
        probs = self.probabilities([self.preprocess(source)])[0]
        order = np.argsort(-probs, kind="stable")
        flags = {c: {"probability": float(probs[self.classes.index(c)]), "threshold": op["threshold"],
                     "flagged": bool(probs[self.classes.index(c)] >= op["threshold"]),
                     "target_sensitivity": op.get("target_sensitivity")}
                 for c, op in self.operating_points.items() if c in self.classes}
        return {
            "top": self.classes[int(order[0])],
            "probabilities": {self.classes[i]: float(probs[i]) for i in order},
            "flags": flags,
        }

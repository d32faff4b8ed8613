"""fastai DataLoaders over the decode cache.

A ``DataBlock`` whose x-block reads a row of the memory-mapped cache (no JPEG decoding per
epoch), whose y-block is a ``CategoryBlock`` with the vocabulary pinned (a stepwise subset
that lacks a class keeps the head's size), split by a precomputed ``is_valid`` column
(fastai has no group-aware splitter; the lesion-grouped split comes from ``splits``).
Normalisation is part of our own ``batch_tfms``, so it survives swapping ``learn.dls``
between stepwise stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fastai.callback.data  # noqa: F401  (registers DataBlock.weighted_dataloaders)
import numpy as np
import pandas as pd
import torch
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage
from fasttransform import Transform

from dermaclass.data.cache import CachedImages
from dermaclass.data.images import apply_colour


class ReadCached(Transform):
    """Row index -> (3, H, W) uint8 TensorImage from the decode cache."""

    def __init__(self, images: CachedImages) -> None:
        super().__init__()
        self.images = images

    def encodes(self, i) -> TensorImage:  # noqa: ANN001 - fastai dispatches on annotations; rows are ints
        return TensorImage(torch.from_numpy(self.images[int(i)]).permute(2, 0, 1))


class ColourConstancy(Transform):
    """The bundle's colour step on every image (training and validation), before augmentation."""

    order = 1

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method

    def encodes(self, x: TensorImage) -> TensorImage:
        out = apply_colour(np.ascontiguousarray(x.permute(1, 2, 0).numpy()), self.method)
        return TensorImage(torch.from_numpy(out).permute(2, 0, 1))


class Albumentations(Transform):
    """Apply an albumentations pipeline to training images only (split_idx 0)."""

    split_idx = 0
    order = 2

    def __init__(self, pipeline: Any) -> None:
        super().__init__()
        self.pipeline = pipeline

    def encodes(self, x: TensorImage) -> TensorImage:
        out = self.pipeline(image=np.ascontiguousarray(x.permute(1, 2, 0).numpy()))["image"]
        return TensorImage(torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1))


def class_weights(labels: Sequence[str], vocab: Sequence[str], *, power: float = 1.0) -> np.ndarray:
    """Per-class loss weights (1 / frequency)**power, scaled to mean 1 over the vocabulary.

    power 1 is inverse frequency, 0.5 its square root; a class absent from ``labels`` gets
    the largest weight seen rather than infinity.
    """
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray([str(v) for v in labels])
    present = np.array([c in set(labels) for c in vocab])
    w = np.zeros(len(vocab))
    if present.any():  # scikit-learn's "balanced" weights are n / (k * count): inverse frequency
        w[present] = compute_class_weight("balanced", classes=np.array(vocab)[present], y=labels) ** power
    w[~present] = w[present].max() if present.any() else 1.0
    return w / w.mean()


def make_dataloaders(
    table: pd.DataFrame,
    images: CachedImages,
    vocab: Sequence[str],
    *,
    batch_size: int,
    normalization: dict[str, Sequence[float]],
    augment: Any | None = None,
    balanced_sampler: bool = False,
    valid_batch_size: int | None = None,
    colour_constancy: str = "none",
    rows_input: bool = False,
) -> DataLoaders:
    """DataLoaders for rows of ``table`` (columns ``row``, ``label``, ``is_valid``, optional ``weight``).

    ``row`` indexes ``images`` (and is a second input with ``rows_input``); training rows are shuffled, or sampled with replacement with
    weights 1 / class frequency when ``balanced_sampler``, times the ``weight`` column when there
    is one (fastai's ``WeightedDL``); validation rows are not augmented.
    """
    image = TransformBlock(type_tfms=ReadCached(images), batch_tfms=IntToFloatTensor)
    # rows_input: each item's row as a second input, for a callback that looks up per-item data
    # (callbacks.Distill); the image transforms dispatch on TensorImage and leave it alone.
    block = DataBlock(
        blocks=(image, TransformBlock(), CategoryBlock(vocab=list(vocab)))
        if rows_input
        else (image, CategoryBlock(vocab=list(vocab))),
        get_x=[ColReader("row"), ColReader("row")] if rows_input else ColReader("row"),
        n_inp=2 if rows_input else 1,
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=([ColourConstancy(colour_constancy)] if colour_constancy != "none" else [])
        + ([Albumentations(augment)] if augment is not None else []),
        batch_tfms=[Normalize.from_stats(list(normalization["mean"]), list(normalization["std"]))],
    )
    # num_workers=0: on 2 cores, reading the memmap in the main process beats worker processes
    # competing with torch for the same cores.
    common = dict(num_workers=0, device=torch.device("cpu"), val_bs=valid_batch_size or max(batch_size, 64))
    if balanced_sampler or "weight" in table.columns:
        wgts = np.ones(len(table))
        if balanced_sampler:
            wgts = wgts / table["label"].map(table["label"].value_counts()).to_numpy()
        if "weight" in table.columns:
            wgts = wgts * table["weight"].to_numpy(dtype=float)
        return block.weighted_dataloaders(table, wgts=wgts, bs=batch_size, **common)
    return block.dataloaders(table, bs=batch_size, **common)

"""The clinic data layer: one path from an exported image folder to validated, split,
decoded-once training data.

- ``sources``: read a folder-per-class or CSV-manifest layout (HAM10000 loads with no flags);
- ``validate``: decode every file, find duplicates and label problems, count classes/groups;
- ``splits``: train/valid/test stratified by label and grouped by lesion/patient, reusable
  across retraining runs;
- ``cache``: decoded, resized uint8 images memory-mapped on disk, keyed by content hash;
- ``card``: the statistics section of a data card, in Markdown;
- ``images`` / ``labels``: decoding any clinic image to RGB, and class full names.
"""

from dermaclass.data.cache import CachedImages, DecodeCache, default_cache_dir
from dermaclass.data.card import render_card
from dermaclass.data.images import ImageDecodeError, load_rgb
from dermaclass.data.labels import KNOWN_CLASS_NAMES, full_name, load_class_names
from dermaclass.data.sources import PROBLEM_KINDS, Dataset, Problem, load_dataset
from dermaclass.data.splits import assign_split, make_split, read_split, write_split
from dermaclass.data.validate import Validation, validate, validate_source, validate_sources

__all__ = [
    "KNOWN_CLASS_NAMES",
    "PROBLEM_KINDS",
    "CachedImages",
    "Dataset",
    "DecodeCache",
    "ImageDecodeError",
    "Problem",
    "Validation",
    "assign_split",
    "default_cache_dir",
    "full_name",
    "load_class_names",
    "load_dataset",
    "load_rgb",
    "make_split",
    "read_split",
    "render_card",
    "validate",
    "validate_source",
    "validate_sources",
    "write_split",
]

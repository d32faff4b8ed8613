"""The JSON half of a model bundle: ``model.json`` as one typed, checked record, ``BundleMeta``.

Written and read through one frozen record (as timm's ``PretrainedCfg``): ``from_dict`` checks
the format version and every field a consumer reads (types, ranges, a normalisation std of 0,
a class list that does not fit the weights, an ensemble's member list, the calibration), so a
bad bundle is refused at load with exit 4 and a message naming the field, never a NaN
prediction later. ``bundle`` reads and writes it beside the weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermaclass.data.images import COLOUR_CONSTANCY
from dermaclass.errors import ConfigError
from dermaclass.fileio import check_record_header, record_fields
from dermaclass.models.networks import ModelError
from dermaclass.serving.refer import ENSEMBLE_OOD, OOD_METHODS

#: The model.json format this dermaclass writes; it reads this one and every older one.
BUNDLE_FORMAT = 1
MAX_INPUT_SIDE = 2048  # pixels; a larger input is a corrupt bundle, not a model for this tool
#: A bundle's test-time augmentation (model.json ``tta``): None, or the mean of the logits of the
#: image and its mirror (``flips2``) or of the image and its three flips (``flips4``). Latency
#: grows with networks x views, so an ensemble may serve fewer views (benchmarks/bench_tta.py).
TTA_MODES = (None, "flips2", "flips4")
#: Config ``tta`` -> the bundle's mode ("flips" is the four flips, as before flips2 existed).
TTA_OF_SETTING: dict[str, str | None] = {"none": None, "flips": "flips4", "flips2": "flips2"}


def tta_mode(value: str) -> str | None:
    """The bundle's TTA mode for a config setting or a mode name (none, flips, flips2, flips4)."""
    if value in TTA_OF_SETTING:
        return TTA_OF_SETTING[value]
    if value in TTA_MODES:
        return value
    raise ConfigError(f"test-time augmentation must be none, flips2 or flips4, not {value!r}")


def tta_setting(mode: str | None) -> str:
    """The config setting (``tta``) of a bundle's TTA mode."""
    return {v: k for k, v in TTA_OF_SETTING.items()}[mode]


#: How an ensemble's networks are combined: ``--ensemble-combine`` -> model.json
#: ``ensemble.combine`` (serving.combine). A bundle without the key combines logits,
#: as every ensemble did before the choice existed.
COMBINE_RULES = {
    "calibrated": "mean of calibrated probabilities",
    "logits": "mean of logits",
    "probabilities": "mean of probabilities",
}


def operating_point_origin(op: Mapping[str, Any], calibration: Mapping[str, Any]) -> str:
    """Where an operating point's threshold was fitted, in words for the card, report and app:
    a clinic's own images (``dermaclass calibrate --site``), the validation split, or an
    ensemble's out-of-fold predictions."""
    if site := op.get("site"):
        return f"{site['images']} labelled images of {site['name']} ({site['positives']} of the class)"
    return "validation" if calibration.get("fitted_on", "valid") == "valid" else "out-of-fold predictions"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class BundleMeta:
    """The JSON half of a bundle. Built in one place (``train.run.bundle_meta``), changed only
    through ``dataclasses.replace`` (``with_``), written by ``to_dict`` and read by ``from_dict``.

    The nested sections (calibration, metrics, config, ...) stay plain dicts: they are the
    outputs of the pure metric and calibration functions, rendered as they are.
    """

    arch: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]  # (width, height)
    normalization: dict[str, list[float]]  # {"mean": [r, g, b], "std": [r, g, b]}
    class_names: dict[str, str] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    kept_weights: str | None = None
    tta: str | None = None
    head: dict[str, Any] = field(default_factory=lambda: {"kind": "fastai", "ps": 0.5})
    metrics_valid: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    range_tests: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    parent: dict[str, Any] | None = None
    package_version: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    git_commit: str | None = None
    created: str | None = None
    disclaimer: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed: bool = False
    processes: int = 1
    weights_dtype: str = "float32"
    published_from: str | None = None
    weights_sha256: str | None = None
    #: deployment exports beside the weights and the checks they passed (serving.export)
    exports: dict[str, Any] = field(default_factory=dict)
    #: an ensemble (train/ensemble.py): one entry per network, each a bundle in a sub-folder
    #: (path relative to this one, weights_sha256, arch, input_size, seed, fold); empty: one network
    members: list[dict[str, Any]] = field(default_factory=list)
    #: how the members are combined and what the ensemble's calibration was fitted on
    ensemble: dict[str, Any] = field(default_factory=dict)
    format: int = BUNDLE_FORMAT
    #: keys this version does not know (written by a newer minor change): kept on rewrite
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived views (one place for every default) ----------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> dict[str, str]:
        """Display name of every class (the code itself where the bundle has none)."""
        return {c: self.class_names.get(c, c) for c in self.classes}

    @property
    def head_ps(self) -> float:
        return float(self.head.get("ps", 0.5))

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))

    @property
    def offsets(self) -> list[float] | None:
        """Per-class offsets added to the logits before the temperature (the prior shift)."""
        return self.calibration.get("offsets")

    @property
    def refer(self) -> dict[str, Any]:
        return dict(self.calibration.get("refer") or {})

    @property
    def ood(self) -> dict[str, Any]:
        return dict(self.refer.get("ood") or {})

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    def member_folders(self, folder: str | Path) -> list[Path]:
        """The bundle folder of every network: the members' sub-folders, or ``folder`` itself."""
        return [Path(folder) / m["path"] for m in self.members] if self.members else [Path(folder)]

    @property
    def colour_constancy(self) -> str:
        return self.preprocessing.get("colour_constancy") or "none"

    def with_(self, **changes: Any) -> BundleMeta:
        """A copy with ``changes`` (the record is frozen)."""
        return dataclasses.replace(self, **changes)

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**record_fields(self, skip=("extra",)), **self.extra}

    @classmethod
    def from_dict(cls, meta: Any, source: str | Path = "model.json") -> BundleMeta:
        """The record of a parsed ``model.json``; ``ModelError`` (exit 4) naming the field when
        the format is unknown or newer, a key is missing, or a value is out of range."""
        check_bundle_meta(meta, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in meta.items() if k in known and v is not None}  # None: the default
        kwargs["classes"] = tuple(meta["classes"])
        kwargs["input_size"] = (int(meta["input_size"][0]), int(meta["input_size"][1]))
        kwargs["normalization"] = {k: [float(x) for x in meta["normalization"][k]] for k in ("mean", "std")}
        kwargs["format"] = meta.get("format", BUNDLE_FORMAT)
        return cls(**kwargs, extra={k: v for k, v in meta.items() if k not in known})


def check_bundle_meta(meta: Any, path: str | Path) -> None:
    """Refuse (``ModelError``, exit 4) bundle metadata that would give NaN or nonsense predictions:
    wrong types, non-finite or out-of-range numbers, an unknown or newer format."""

    def bad(field: str, problem: str) -> ModelError:
        return ModelError(f"{path}: {field} {problem}; the bundle is corrupt or was edited by hand")

    check_record_header(
        meta,
        source=path,
        kind="bundle metadata",
        current=BUNDLE_FORMAT,
        error=ModelError,
        required=("arch", "classes", "input_size", "normalization"),
    )
    if not isinstance(meta["arch"], str) or not meta["arch"]:
        raise bad("arch", f"is {meta['arch']!r}, not an architecture name")
    classes = meta["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise bad("classes", "must be a list of at least two distinct class codes")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, dict) and all(isinstance(v, str) for v in names.values())):
        raise bad("class_names", "must map class codes to names")
    size = meta["input_size"]
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_INPUT_SIDE for v in size)
    ):
        raise bad("input_size", f"is {str(size)[:60]}, not [width, height] in pixels between 8 and {MAX_INPUT_SIDE}")
    norm = meta["normalization"]
    if not isinstance(norm, dict):
        raise bad("normalization", "must be an object with mean and std")
    for key in ("mean", "std"):
        v = norm.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_finite(x) for x in v)):
            raise bad(f"normalization.{key}", f"is {str(v)[:60]}, not three finite numbers")
    if not all(x > 0 for x in norm["std"]):
        raise bad("normalization.std", f"is {norm['std']}; every channel's std must be > 0 (it divides)")
    head = {} if meta.get("head") is None else meta["head"]
    if not isinstance(head, dict) or not (_finite(head.get("ps", 0.5)) and 0 <= head.get("ps", 0.5) < 1):
        raise bad("head", "must be an object with a dropout ps in [0, 1)")
    for key in ("preprocessing", "metrics_valid", "training", "config", "data", "machine", "exports"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(key, "must be an object")
    colour = (meta.get("preprocessing") or {}).get("colour_constancy") or "none"
    if colour not in COLOUR_CONSTANCY:
        raise bad(
            "preprocessing.colour_constancy", f"is {colour!r}; this dermaclass knows {', '.join(COLOUR_CONSTANCY)}"
        )
    for key in ("stages", "range_tests"):
        if meta.get(key) is not None and not isinstance(meta[key], list):
            raise bad(key, "must be a list")
    _check_calibration(meta.get("calibration"), bad, n_classes=len(meta.get("classes") or []))
    points = meta.get("operating_points")
    if points is not None:
        if not isinstance(points, dict) or not all(isinstance(op, dict) for op in points.values()):
            raise bad("operating_points", "must map class codes to objects")
        for cls, op in points.items():
            th = op.get("threshold")
            if th is not None and not (_finite(th) and 0 <= th <= 1):
                raise bad(f"operating_points.{cls}.threshold", f"is {th!r}, not a probability")
    if meta.get("tta") not in TTA_MODES:
        raise bad("tta", f"is {meta.get('tta')!r}; this dermaclass knows flips2, flips4 or none")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise bad("weights_sha256", "is not a sha256 hex digest")
    _check_members(meta.get("members"), bad)
    ensemble = meta.get("ensemble")
    if ensemble is not None and not isinstance(ensemble, dict):
        raise bad("ensemble", "must be an object")
    rule = (ensemble or {}).get("combine", COMBINE_RULES["logits"])
    if rule not in COMBINE_RULES.values():
        raise bad("ensemble.combine", f"is {rule!r}; this dermaclass knows {', '.join(COMBINE_RULES.values())}")


def _check_members(members: Any, bad: Any) -> None:
    """An ensemble's member list: relative sub-folders inside the bundle, each named once, each
    with the sha256 of its weights (so a member swapped for another network is refused)."""
    if members is None or members == []:
        return
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise bad("members", "must be a list of objects")
    seen = set()
    for i, m in enumerate(members):
        path = m.get("path")
        parts = Path(path).parts if isinstance(path, str) and path else ()
        if not parts or Path(path).is_absolute() or ".." in parts:
            raise bad(f"members[{i}].path", f"is {path!r}, not a sub-folder of the bundle")
        if path in seen:
            raise bad(f"members[{i}].path", f"{path!r} is listed twice")
        seen.add(path)
        digest = m.get("weights_sha256")
        if not (isinstance(digest, str) and len(digest) == 64):
            raise bad(f"members[{i}].weights_sha256", "is not a sha256 hex digest")


def _check_calibration(calibration: Any, bad: Any, *, n_classes: int) -> None:
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise bad("calibration", "must be an object")
    t = calibration.get("temperature", 1.0)
    if not (_finite(t) and t > 0):
        raise bad("calibration.temperature", f"is {t!r}; it must be a finite number > 0")
    offsets = calibration.get("offsets")
    if offsets is not None and not (
        isinstance(offsets, list) and len(offsets) == n_classes and all(_finite(v) for v in offsets)
    ):
        raise bad("calibration.offsets", f"must be {n_classes} finite numbers, one per class (or none)")
    refer = {} if calibration.get("refer") is None else calibration["refer"]
    if not isinstance(refer, dict):
        raise bad("calibration.refer", "must be an object")
    floor = refer.get("min_top_probability", 0.0)
    if not (_finite(floor) and 0 <= floor <= 1):
        raise bad("calibration.refer.min_top_probability", f"is {floor!r}, not a probability")
    ood = refer.get("ood") or {}
    if not isinstance(ood, dict) or not (ood.get("threshold") is None or _finite(ood.get("threshold"))):
        raise bad("calibration.refer.ood", "must have a finite threshold (or none)")
    if ood.get("method", "energy") not in (*OOD_METHODS, ENSEMBLE_OOD):
        raise bad(
            "calibration.refer.ood.method", f"is {ood.get('method')!r}; this dermaclass knows {', '.join(OOD_METHODS)}"
        )
    if not (ood.get("layer") is None or isinstance(ood.get("layer"), str)):
        raise bad("calibration.refer.ood.layer", "must be a layer name")

"""Model bundles: ``model.safetensors`` (weights) + ``model.json`` (a typed ``BundleMeta``).

A bundle holds everything needed to rebuild, use and judge a model, and nothing is ever
unpickled. ``model.json`` is written and read through one frozen record, ``BundleMeta``
(as timm's ``PretrainedCfg``): ``from_dict`` checks the format version and every field a
consumer reads (types, ranges, a normalisation std of 0, a class list that does not fit the
weights), so a bad bundle is refused at load with exit 4 and a message naming the field,
never a NaN prediction later. Bundles are never overwritten without ``force``; the JSON
names the sha256 of the weights it belongs to, so a torn pair is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermaclass.data.images import COLOUR_CONSTANCY
from dermaclass.fileio import atomic_path, check_record_header, record_fields, write_json
from dermaclass.models.networks import ModelError, build_model
from dermaclass.serving.refer import ENSEMBLE_OOD, OOD_METHODS

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
#: The bundled model: what `dermaclass predict`, `serve` and the app load when no --model is given.
#: Three cross-fitted networks (the ensemble issue); the single network ``ham10000-effnet-lite0``
#: stays beside it (the benchmarks' split, and the bundle a one-hour retrain starts from).
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "ham10000-effnet-lite0-x3"
#: The model.json format this dermaclass writes; it reads this one and every older one.
BUNDLE_FORMAT = 1
MAX_INPUT_SIDE = 2048  # pixels; a larger input is a corrupt bundle, not a model for this tool
TTA_MODES = (None, "flips4")


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
        raise bad("tta", f"is {meta.get('tta')!r}; this dermaclass knows flips4 or none")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise bad("weights_sha256", "is not a sha256 hex digest")
    _check_members(meta.get("members"), bad)


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


# ---- reading and writing ------------------------------------------------------------------
def read_bundle_meta(folder: str | Path) -> BundleMeta:
    """The JSON half of a bundle as a checked ``BundleMeta``."""
    folder = Path(folder)
    path = folder / BUNDLE_META
    if not path.is_file():
        raise ModelError(f"{folder}: not a model bundle (no {BUNDLE_META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ModelError(f"{path}: unreadable bundle metadata ({type(exc).__name__}: {str(exc)[:200]})") from None
    return BundleMeta.from_dict(meta, path)


def write_bundle_meta(folder: str | Path, meta: BundleMeta) -> Path:
    """Rewrite ``model.json`` of an existing bundle (atomically), e.g. after refitting its
    out-of-distribution score; the weights and their sha256 stay as they are."""
    return write_json(Path(folder) / BUNDLE_META, meta.to_dict())


def save_bundle(
    model: nn.Module, meta: BundleMeta, folder: str | Path, *, force: bool = False, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model.safetensors`` + ``model.json`` atomically; refuse to replace a bundle unless ``force``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights, meta_path = folder / BUNDLE_WEIGHTS, folder / BUNDLE_META
    if not force and (weights.exists() or meta_path.exists()):
        raise FileExistsError(f"{folder}: a model bundle is already there")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        # A tensor that would overflow the smaller type (e.g. a BatchNorm running variance above
        # float16's 65,504, which became Inf once) stays in float32.
        state = {k: _narrow(v, dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "dermaclass", "version": str(BUNDLE_FORMAT)})
        digest = file_sha256(tmp)
    # The JSON names the weights it belongs to: a crash between the two renames leaves a
    # mismatch that load_bundle refuses, never new weights silently paired with old metadata.
    write_json(meta_path, meta.with_(format=BUNDLE_FORMAT, weights_sha256=digest).to_dict())
    return folder


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    narrow = t.to(dtype)
    return narrow if bool(torch.isfinite(narrow).all()) or not bool(torch.isfinite(t).all()) else t


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (hashlib reads it in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_identity(folder: str | Path) -> str:
    """The sha256 that names a bundle's weights: of ``model.safetensors``, or for an ensemble of
    its members' digests in order (so two reports of one ensemble share it, and any changed
    member changes it)."""
    folder = Path(folder)
    meta = read_bundle_meta(folder)
    if meta.is_ensemble:
        return hashlib.sha256("\n".join(m["weights_sha256"] for m in meta.members).encode()).hexdigest()
    return file_sha256(folder / BUNDLE_WEIGHTS)


def _check_weights_fit(weights: Path, meta: BundleMeta) -> None:
    """Compare the weights file's tensor names and shapes with the architecture built on the meta
    device (no memory, no time) before building it for real: a huge unknown ``arch`` or a class
    count that does not match the weights is refused at once."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise ModelError(f"{weights}: cannot read weights ({exc})") from None
    try:
        with torch.device("meta"):
            skeleton = build_model(meta.arch, meta.n_classes, pretrained=False, ps=meta.head_ps)
    except ModelError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device: the real build checks
        return
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if expected == shapes:
        return
    last = [name for name, m in skeleton[1].named_modules() if isinstance(m, nn.Linear)][-1]
    out_key = f"1.{last}.weight"
    if out_key in shapes and len(shapes[out_key]) == 2 and shapes[out_key][0] != meta.n_classes:
        raise ModelError(
            f"{weights.parent / BUNDLE_META}: classes lists {meta.n_classes} classes but the "
            f"weights' output layer has {shapes[out_key][0]}; the bundle is torn or was edited by hand"
        )
    n_file, n_arch = sum(math.prod(s) for s in shapes.values()), sum(math.prod(s) for s in expected.values())
    wrong = [k for k in expected if k in shapes and expected[k] != shapes[k]][:3]
    raise ModelError(
        f"{weights}: weights do not fit {meta.arch} with {meta.n_classes} classes "
        f"({n_file:,} values in the file, {n_arch:,} in the architecture; "
        f"{len(set(expected) - set(shapes))} tensors missing, {len(set(shapes) - set(expected))} "
        f"unexpected{', shape differs: ' + ', '.join(wrong) if wrong else ''})"
    )


def load_bundle(folder: str | Path) -> tuple[nn.Module, BundleMeta]:
    """Rebuild the network from ``model.json`` and load ``model.safetensors`` (strict), refusing
    weights that are torn from their metadata, non-floating or non-finite."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_bundle_meta(folder)
    if meta.is_ensemble:
        raise ModelError(
            f"{folder}: an ensemble of {len(meta.members)} networks "
            f"({', '.join(m['path'] for m in meta.members)}), not one network; serve it with the "
            f"Predictor, or load one member (e.g. {folder / meta.members[0]['path']})"
        )
    weights = folder / BUNDLE_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: bundle has no {BUNDLE_WEIGHTS}")
    if meta.weights_sha256 and file_sha256(weights) != meta.weights_sha256:
        raise ModelError(
            f"{weights}: the weights are not the ones {BUNDLE_META} was written for (sha256 "
            "mismatch: a torn or tampered bundle); retrain or restore the bundle"
        )
    _check_weights_fit(weights, meta)
    model = build_model(meta.arch, meta.n_classes, pretrained=False, ps=meta.head_ps)
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ModelError(f"{weights}: cannot read weights ({exc})") from exc
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].is_floating_point():
            if not v.is_floating_point():
                raise ModelError(
                    f"{weights}: tensor {k} is {v.dtype}, not floating point; the bundle is corrupt "
                    "(quantised weights need their own export)"
                )
            if not bool(torch.isfinite(v).all()):
                raise ModelError(f"{weights}: tensor {k} holds NaN or Inf; the model would predict nothing useful")
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit {meta.arch} with {meta.n_classes} classes ({exc})") from exc
    model.eval()
    return model, meta


def model_from_bundle(folder: str | Path, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The bundle's network with a head for ``classes`` (a superset of the bundle's).

    The body and the hidden head layers keep their weights; in the final linear layer the
    rows of the bundle's classes are copied to their new positions, and rows for added
    classes keep their fresh initialisation (the head grows, known classes keep what they
    learnt).
    """
    old, meta = load_bundle(folder)
    known = list(meta.classes)
    lost = [c for c in known if c not in classes]
    if lost:
        raise ModelError(f"{folder}: the new class list {classes} drops the bundle's classes {lost}")
    info = {"parent_classes": known, "added": [c for c in classes if c not in known]}
    if known == list(classes):
        return old, info
    new = build_model(meta.arch, len(classes), pretrained=False, ps=meta.head_ps)
    last = [name for name, m in new[1].named_modules() if isinstance(m, nn.Linear)][-1]
    prefix = f"1.{last}."
    rows = torch.tensor([classes.index(c) for c in known])
    target = new.state_dict()
    for key, value in old.state_dict().items():
        if key.startswith(prefix):
            grown = target[key].clone()
            grown[rows] = value
            target[key] = grown
        else:
            target[key] = value
    new.load_state_dict(target, strict=True)
    return new, info


def publish_bundle(src: str | Path, dst: str | Path, *, float16: bool = True, force: bool = False) -> Path:
    """A copy of a bundle fit to ship: weights (float16 halves the size), model.json, and the split
    file reduced to image ids and split (no labels or lesion ids: those are the dataset's metadata).
    An ensemble is published member by member."""
    src, dst = Path(src), Path(dst)
    top = read_bundle_meta(src)
    if top.is_ensemble:  # every member published, and the list names the new weights
        if not force and (dst / BUNDLE_META).exists():
            raise FileExistsError(f"{dst}: a model bundle is already there")
        members = []
        for entry, folder in zip(top.members, top.member_folders(src)):
            publish_bundle(folder, dst / entry["path"], float16=float16, force=force)
            members.append({**entry, "weights_sha256": read_bundle_meta(dst / entry["path"]).weights_sha256})
        write_json(
            dst / BUNDLE_META,
            top.with_(
                members=members, published_from=str(src), weights_dtype="float16" if float16 else "float32"
            ).to_dict(),
        )
        _publish_split(src, dst)
        return dst
    model, meta = load_bundle(src)
    meta = meta.with_(weights_dtype="float16" if float16 else "float32", published_from=str(src))
    save_bundle(model, meta, dst, force=force, dtype=torch.float16 if float16 else None)
    for name in ("ood.safetensors",):  # the out-of-distribution score's arrays go with the weights
        if (src / name).is_file() and not (dst / name).is_file():
            shutil.copy2(src / name, dst / name)
    _publish_split(src, dst)
    return dst


def _publish_split(src: Path, dst: Path) -> None:
    """The split file reduced to image ids, split and fold (no labels or lesion ids)."""
    import pandas as pd

    if (src / "split.csv").is_file():
        split = pd.read_csv(src / "split.csv", dtype=str)
        split = split[[c for c in ("image", "split", "fold") if c in split.columns]]
        with atomic_path(dst / "split.csv") as tmp:
            split.to_csv(tmp, index=False)

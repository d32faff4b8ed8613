"""Model bundles on disk: ``model.safetensors`` (weights) + ``model.json`` (``meta.BundleMeta``).

A bundle holds everything needed to rebuild, use and judge a model, and nothing is ever
unpickled. Bundles are never overwritten without ``force``; the JSON names the sha256 of the
weights it belongs to, so a torn pair is refused, and weights that do not fit the declared
network are refused with the layer that differs. An ensemble's ``model.json`` lists its
member bundles. ``publish_bundle`` writes the shipped, float16 copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermaclass.fileio import atomic_path, write_json
from dermaclass.models.meta import BUNDLE_FORMAT, BundleMeta
from dermaclass.models.networks import ModelError, build_model

BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
#: The bundled model: what `dermaclass predict`, `serve` and the app load when no --model is given.
#: Three cross-fitted networks (the ensemble issue); the single network ``ham10000-effnet-lite0``
#: stays beside it (the benchmarks' split, and the bundle a one-hour retrain starts from).
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "ham10000-effnet-lite0-x3"


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

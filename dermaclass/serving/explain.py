"""Class-activation maps: where in the image the network found its answer (pytorch-grad-cam).

A clinician checks the heat against the lesion: a map that glows on a ruler, a hair or the
vignette says the answer rests on something other than the lesion. The method and layer
were picked by the pointing game against HAM10000's lesion masks
(benchmarks/bench_refer.py, part ``cam``; figures in benchmarks/results/refer.json):
LayerCAM (Jiang et al. 2021) at the backbone stage of stride 16 put its peak inside the
lesion most often, and EigenCAM, close behind, is class-agnostic.

For an ensemble the map is the mean of its members' maps for the ensemble's class, each drawn
at its member's own input size and resized to the largest. pytorch-grad-cam scales every
map to [0, 1], so each network weighs the same, as its logits do in the ensemble's mean.

The functions take a ``Predictor`` (serving.predictor), which calls them; this module
imports nothing of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dermaclass.data.images import fit_to_size


def _cam(name: str) -> Any:
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, name)


#: The class-activation maps on offer (pytorch-grad-cam), loaded lazily.
CAM_METHODS: dict[str, Any] = {
    "gradcam": lambda: _cam("GradCAM"),
    "gradcam++": lambda: _cam("GradCAMPlusPlus"),
    "layercam": lambda: _cam("LayerCAM"),
    "eigencam": lambda: _cam("EigenCAM"),
}
#: Picked by the pointing game (module docstring).
CAM_METHOD = "layercam"
CAM_STRIDE: int | None = 16


def cam_layers(model: torch.nn.Module, stride: int | None = CAM_STRIDE) -> list[torch.nn.Module]:
    """The layer a class-activation map reads: the backbone stage at ``stride`` (timm's
    ``feature_info``; 8x6 at 128x96 for stride 16), or the whole body (its last feature map)
    when ``stride`` is None or the architecture has no such stage."""
    body = model[0]
    net = getattr(body, "model", None)
    for f in (getattr(net, "feature_info", None) or []) if stride else []:
        if f.get("reduction") == stride:
            return [net.get_submodule(f["module"])]
    return [body]


def network_heat(network: Any, image: np.ndarray, class_index: int, method: str, stride: int | None) -> np.ndarray:
    """One network's (a one-network ``Predictor``'s) map of ``class_index`` on one preprocessed image."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.from_numpy(network.normalise([image]))
    with (
        network.lock,
        CAM_METHODS[method]()(model=network.model, target_layers=cam_layers(network.model, stride)) as cam,
    ):
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])[0]


def resize_heat(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map in [0, 1] resized (bilinear) to ``size`` (width, height)."""
    from PIL import Image

    if heat.shape[::-1] == tuple(size):
        return heat
    out = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(tuple(size), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def explain(
    predictor: Any,
    original: Any,
    *,
    class_index: int | None = None,
    display_width: int | None = None,
    method: str = CAM_METHOD,
    stride: int | None = CAM_STRIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """(heatmap in [0, 1] at the bundle's input size, RGB overlay uint8) of ``class_index``
    (default: the predicted class) on ``original`` (a PIL RGB image).

    ``display_width``: draw the overlay on the uploaded image itself (the same centre crop the
    model saw) at up to this width, instead of on the model input, so a clinician can check the
    heat against the lesion.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    image = fit_to_size(original, predictor.input_size)
    if class_index is None:
        class_index = int(predictor.logits({s: [fit_to_size(original, s)] for s in predictor.input_sizes}).argmax(1)[0])
    heat = np.mean(
        [
            resize_heat(
                network_heat(n, fit_to_size(original, n.input_size), class_index, method, stride), predictor.input_size
            )
            for n in predictor.networks
        ],
        axis=0,
    )
    shown, shown_heat = image, heat
    if display_width:
        w_in, h_in = predictor.input_size
        w = max(w_in, min(int(display_width), original.width))
        size = (w, max(1, round(w * h_in / w_in)))
        shown = fit_to_size(original, size)
        shown_heat = resize_heat(heat, size)
    overlay = show_cam_on_image(shown.astype(np.float32) / 255.0, shown_heat, use_rgb=True, image_weight=0.6)
    return heat, overlay

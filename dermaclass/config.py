"""The one run configuration: a frozen dataclass layered as defaults < YAML file < CLI flags.

Every run saves its resolved configuration beside its outputs (as timm saves args.yaml), so a
result can always be traced to the exact settings that made it. Unknown keys in a YAML file
are errors that name the file and suggest the closest key: a typo must never be silently
ignored in a medical tool.

Every check of a configuration runs when it is built (``Config.__post_init__``), before any
data is read, as scikit-learn checks a model's ``_parameter_constraints`` at the start of
``fit``: a range is declared next to its field (``Annotated[int, at_least(1)]``) and a rule
between fields in ``RULES``. A bad combination fails in a second, not after the dataset is
decoded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from dermaclass.errors import ConfigError, DermaclassError
from dermaclass.fileio import write_text

#: The fields that calibration is fitted by (recorded in a bundle's config when refitted).
CALIBRATION_SETTINGS = ("operating_classes", "target_sensitivity", "prior_class", "prior_sensitivity", "refer_below")


@dataclass(frozen=True)
class Check:
    """A constraint on one field's value: ``test(value)`` is true, else ``message`` says why."""

    test: Callable[[Any], bool]
    message: str

    def problem(self, value: Any) -> str | None:
        if value is None:  # an optional field left unset ("not used") is never out of range
            return None
        try:
            return None if self.test(value) else self.message
        except (ValueError, DermaclassError) as exc:
            return str(exc)


def at_least(lo: int) -> Check:
    return Check(lambda v: v >= lo, f"must be at least {lo}" if lo else "must be 0 or more")


positive = Check(lambda v: v > 0, "must be positive")
fraction = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")
open_fraction = Check(lambda v: 0 < v < 1, "must be between 0 and 1 (exclusive)")
min_side = Check(lambda v: min(v) >= 16, "each side must be at least 16 pixels")


def valid(check: Callable[[Any], Any]) -> Check:
    """A constraint that ``check(value)`` breaks by raising ValueError with its reason."""

    def test(value: Any) -> bool:
        check(value)
        return True

    return Check(test, "")


def _split_fractions(v: tuple[float, ...]) -> None:
    from dermaclass.data.splits import check_split_fractions

    check_split_fractions(v)


def _stage_fractions(v: tuple[float, ...]) -> None:
    from dermaclass import schedules

    schedules.check_stage_fractions(v)


def _sizes(v: tuple[str, ...]) -> None:
    from dermaclass import schedules

    for size in v:
        schedules.parse_size(size)


def _member_specs(v: tuple[str, ...]) -> None:
    from dermaclass import schedules

    for spec in v:
        schedules.parse_member(spec)


@dataclass(frozen=True)
class Config:
    """Every setting of a run: data, model, training recipe."""

    # --- data source (see dermaclass.data.sources) ---
    manifest: str | None = None  # CSV manifest; default: the one CSV at the dataset root
    image_col: str | None = None  # default: detected (image_id / image / filename / path)
    label_col: str | None = None  # default: detected (dx / label / diagnosis / class)
    group_col: str | None = None  # default: detected (lesion_id / patient_id)
    class_names: str | None = None  # a clinic's class list with full names (JSON/YAML/CSV)
    min_per_class: Annotated[int, at_least(0)] = 10  # classes with fewer images are reported
    # --- splits (see dermaclass.data.splits) ---
    # train, valid, test
    split_fractions: Annotated[tuple[float, float, float], valid(_split_fractions)] = (0.7, 0.15, 0.15)
    split_file: str | None = None  # reuse this split; new images are added without moving old ones
    seed: int = 42
    # --- decoding ---
    image_size: Annotated[tuple[int, int], min_side] = (128, 96)  # width, height fed to the network
    cache_dir: str | None = None  # default: $DERMACLASS_CACHE or ~/.cache/dermaclass
    workers: Annotated[int, at_least(0)] = 0  # processes for decoding; 0 = all cores
    # --- model (see dermaclass.models) ---
    arch: str = "tf_efficientnet_lite0"  # any timm architecture name
    pretrained: bool = True  # ImageNet weights (bundled for EfficientNet-Lite0/1/2; downloaded for others)
    weights: str | None = None  # a local weights file (.safetensors or .pth state dict) for the body
    init_bundle: str | None = None  # start from this model bundle's weights instead of ImageNet
    # --- training (see dermaclass.train and dermaclass.schedules) ---
    recipe: Literal["baseline", "sgdr", "stepwise"] = "stepwise"
    batch_size: Annotated[int, at_least(1)] = 32  # b of seed 001's Table I; stepwise stages use b, 2b, 3b, 4b, b
    # Base LR; None: an LR range test (fastai lr_find) before each stage picks it. Every default
    # below that was chosen by measurement says so; docs/decisions.md gives the figures.
    lr: Annotated[float | None, positive] = 1e-2
    lr_suggestion: Literal["valley", "slide", "minimum", "steep"] = "valley"
    lr_find_iters: Annotated[int, at_least(1)] = 60  # batches in each range test
    warm_epoch: bool = False  # seed 002: one epoch at warm_lr before the range test
    warm_lr: Annotated[float, positive] = 1e-4
    # Discriminative LRs: slice(lr / lr_ratio, lr).
    lr_ratio: Annotated[float, Check(lambda v: v >= 1, "must be at least 1 (the body's LR is lr / lr_ratio)")] = 100.0
    head_epochs: Annotated[int, at_least(0)] = 1  # coarse fit of the head with the body frozen (seed 003)
    epochs: Annotated[int, at_least(1)] = 3  # baseline: unfrozen one-cycle epochs
    n_cycles: Annotated[int, at_least(1)] = 3  # SGDR cycles (seed 003): 1 + 2 + 4 = 7 epochs per stage
    cycle_len: Annotated[int, at_least(1)] = 1  # epochs in the first cycle
    # SGDR's cycle-length multiplication: an integer >= 2 (1 would repeat equal cycles).
    cycle_mult: Annotated[int, Check(lambda v: v >= 2, "must be at least 2 (SGDR cycle-length multiplication)")] = 2
    # seed 001's nested subsets
    stage_fractions: Annotated[tuple[float, ...], valid(_stage_fractions)] = (0.2, 0.4, 0.6, 0.8, 1.0)
    # Progressive resizing (fastbook): one WIDTHxHEIGHT per stepwise stage, the last = image_size;
    # empty = every stage at image_size.
    stage_sizes: Annotated[tuple[str, ...], valid(_sizes)] = ()
    # LR per stepwise stage: linear = scaled with the stage's batch size (by measurement).
    lr_rule: Literal["eq9", "constant", "linear"] = "linear"
    weight_sharing: bool = True  # False: each stage restarts from the initial weights (Table IV)
    # The balanced sampler by measurement; logit-adjusted: Menon et al. 2021 (train.losses), the
    # data as it comes, no sampler.
    imbalance: Literal["none", "weights", "sqrt-weights", "sampler", "focal", "logit-adjusted"] = "sampler"
    augment: Literal["none", "basic", "zoom", "augmix"] = "basic"
    # Sampling weight of images whose diagnosis was confirmed by histopathology (a dx_type column
    # equal to "histo", as in HAM10000's metadata) relative to the others (follow-up, consensus,
    # confocal): Gessert et al. 2020 weight them up and report +3 % balanced sensitivity. It
    # multiplies the balanced sampler's weights (or is the only weight without it); 1 = off.
    histo_weight: Annotated[float, Check(lambda v: v > 0, "must be positive (1 = every image alike)")] = 1.0
    # Shades-of-Gray colour constancy, applied identically at training and inference (recorded
    # in the bundle): dermatoscopes light and tint images differently from clinic to clinic.
    # On by measurement (the strongest lever on other clinics' images).
    colour_constancy: Literal["none", "shades-of-gray"] = "shades-of-gray"
    # Test-time augmentation the bundle uses by default: "flips" averages the logits of the image
    # and its three flips, "flips2" of the image and its mirror (half the views: an ensemble's
    # latency is networks x views); temperature and thresholds are fitted on the same averaged
    # logits. On by measurement.
    tta: Literal["none", "flips", "flips2"] = "flips"
    label_smoothing: Annotated[float, fraction] = 0.0  # cross-entropy label smoothing (Szegedy et al. 2016); 0 = off
    # Which weights the bundle keeps: the epoch with the best validation balanced accuracy over
    # the run, or the weights at the end of the last (annealed) cycle.
    keep: Literal["best", "last"] = "best"
    # A floor on the running variance of the head's batch norms (train.callbacks.HeadNormFloor):
    # a unit almost never on in training (variance 1e-8 and below) otherwise gives logits of
    # 1e5 to an image that turns it on. Replayed on 16 trained networks (bench_head_bn), 0.1
    # brought the two runaway members' held-out NLL from 436 and 14.6 to 1.05 and 1.40 and
    # left full-budget networks level (HAM test +0.001 ± 0.003). It changes no gradient. 0 = off.
    head_norm_floor: Annotated[float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = off)")] = 0.1
    # Exponential moving average of the weights (timm ModelEmaV3, with warm-up): the bundle keeps
    # the average at the end of training instead of a single epoch's weights. 0 = off.
    ema_decay: Annotated[float, fraction] = 0.0
    # Average of the weights at the last N SGDR cycle ends (SWA, Izmailov et al. 2018, on seed
    # 003's warm restarts; in the stepwise recipe, the ends of each stage's cycles), batch-norm
    # statistics recomputed on the training data: the bundle keeps the average. 0 = off.
    average_cycles: Annotated[int, Check(lambda v: v == 0 or v >= 2, "needs at least 2 cycle ends (0 = off)")] = 0
    # Batch mixing (seed 002 tried both beside AugMix; seed 004 lists them among CIFAR tricks):
    # fastai's MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) callback, with a
    # Beta(mix_alpha, mix_alpha) mixing weight; None = fastai's default (MixUp 0.4, CutMix 1.0).
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: Annotated[
        float | None, Check(lambda v: v is None or v > 0, "must be positive (the Beta distribution's parameter)")
    ] = None
    # Sharpness-aware minimisation (Foret et al. 2021), seed 002's optimizer with rho 0.05: each
    # step takes the gradient at the worst point within rho of the weights (a second forward and
    # backward pass per batch, so about twice the training time). 0 = off.
    sam_rho: Annotated[float, Check(lambda v: v >= 0, "must be 0 (off) or more")] = 0.0
    precision: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast of forward + loss
    # Epochs without balanced-accuracy gain before stopping; 0 = off.
    early_stop_patience: Annotated[int, at_least(0)] = 0
    wd: Annotated[float, Check(lambda v: v >= 0, "must be 0 or more")] = 0.01
    threads: Annotated[int, at_least(0)] = 0  # torch threads; 0 = all cores
    # calibration and operating points (fitted on the validation split after training)
    operating_classes: tuple[str, ...] = ("mel",)  # classes of clinical interest that get a threshold
    # The threshold is the highest one reaching this on validation.
    target_sensitivity: Annotated[float, open_fraction] = 0.90
    # Prior shift (post-hoc logit adjustment, Menon et al. 2021), fitted on the validation split
    # after the temperature: tau * log(train prior) is added to the calibrated logits, with tau
    # the smallest on a 0.1 grid that gives prior_class this sensitivity. The balanced sampler
    # trains towards a uniform prior and then calls a third of nevi something else. 0 = off.
    # On by measurement; a no-op (tau 0) for a model that meets the target already.
    prior_class: str = "nv"
    prior_sensitivity: Annotated[float, fraction] = 0.80
    # Refer to a dermatologist when the top calibrated probability is lower.
    refer_below: Annotated[float, fraction] = 0.5
    # The out-of-distribution cut-off passes this share of validation images.
    ood_keep: Annotated[float, open_fraction] = 0.95
    # Out-of-distribution score (serving.refer), fitted on the train split's features after training.
    # Mahalanobis by measurement (benchmarks/bench_refer.py).
    ood: Literal["knn", "mahalanobis", "energy"] = "mahalanobis"
    # --- deep ensembles (Lakshminarayanan et al. 2017), cross-fitted (train/ensemble.py) ---
    # members > 1: the train+valid pool is cut into this many lesion-grouped, stratified folds;
    # member k trains on the others and picks its checkpoint on fold k, and the ensemble's
    # calibration is fitted on the out-of-fold predictions of the whole pool.
    members: Annotated[int, at_least(1)] = 1
    # Per-member architecture and input size, "ARCH@WxH" or "@WxH" (cycled when shorter than
    # members); empty: every member is arch at image_size, differing in seed and fold.
    member_archs: Annotated[tuple[str, ...], valid(_member_specs)] = ()
    # What the ensemble's temperature, prior shift, operating points and referral floor are fitted
    # on: "out-of-fold" (the folds cut the train+valid pool; each pool image scored by the one
    # member that held it out: K times the images, but single-member logits, not the served mean)
    # or "valid" (the folds cut the train split only; the valid split is held out from every
    # member and scored by the ensemble itself, as it serves).
    ensemble_calibration: Literal["out-of-fold", "valid"] = "out-of-fold"
    # How the members' answers are combined (serving.combine): "logits", the mean of
    # their logits (the geometric mean of their probabilities); "calibrated", the mean of their
    # probabilities, each calibrated by the ensemble's temperature and prior shift (what
    # out-of-fold calibration fits: one member's logits per image); or "probabilities", the mean
    # of their raw softmax, then calibrated. An arithmetic mean gives one network at most 1/K
    # of the answer, however extreme its logits. Full-budget members: "calibrated" +0.003 HAM
    # test, HAM test ECE 0.027 -> 0.042 (over the 0.03), so logits stay the default;
    # short-budget members: "calibrated" +0.016 to +0.027 (docs/decisions.md).
    ensemble_combine: Literal["logits", "calibrated", "probabilities"] = "logits"
    # Distillation (Hinton et al. 2015) into one network: soft targets from this ensemble
    # bundle's out-of-fold predictions (out_of_fold.csv, matched by image id), mixed into the
    # loss with weight distill_alpha at temperature distill_temperature. None = off.
    distill_from: str | None = None
    distill_alpha: Annotated[
        float, Check(lambda v: 0 <= v <= 1, "must be in [0, 1] (the weight of the teacher's soft targets in the loss)")
    ] = 0.5
    distill_temperature: Annotated[float, positive] = 2.0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every constraint this configuration breaks: each field's range, then ``RULES``."""
        out = []
        for name, check in _CHECKS.items():
            value = getattr(self, name)
            problem = check.problem(value)
            if problem:
                out.append(f"{name}={value!r}: {problem}")
        if not out:  # the rules read the fields, so only once every field is in range
            out += [problem for _, rule in RULES if (problem := rule(self))]
        return out

    def source_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``data.validate.validate_source(s)``."""
        keys = ("manifest", "image_col", "label_col", "group_col", "class_names", "min_per_class", "workers")
        return {k: getattr(self, k) for k in keys}

    def range_test_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``train.lr_find.range_test``."""
        return {
            "iters": self.lr_find_iters,
            "suggestion": self.lr_suggestion,
            "warm_epoch": self.warm_epoch,
            "warm_lr": self.warm_lr,
        }

    def calibration_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``evaluate.calibration.calibrate``."""
        return {k: getattr(self, k) for k in CALIBRATION_SETTINGS}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for YAML/JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated like any other layer)."""
        return _apply(self, changes, source="arguments")

    def save(self, path: str | Path) -> Path:
        """Write the resolved configuration as YAML, atomically."""
        return write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_HINTS = typing.get_type_hints(Config)  # without the Annotated checks: the types to coerce to
_CHECKS: dict[str, Check] = {
    name: next(m for m in typing.get_args(hint)[1:] if isinstance(m, Check))
    for name, hint in typing.get_type_hints(Config, include_extras=True).items()
    if typing.get_origin(hint) is Annotated
}
_DEFAULTS = {f.name: f.default for f in fields(Config)}


def _member_sizes(c: Config) -> set[tuple[int, int]]:
    from dermaclass import schedules

    plan = schedules.member_plan(
        c.members, arch=c.arch, image_size=c.image_size, seed=c.seed, member_archs=c.member_archs
    )
    return {m.image_size for m in plan}


def _stage_sizes_problem(c: Config) -> str | None:
    from dermaclass import schedules

    if c.recipe != "stepwise":
        return f"--stage-sizes applies to the stepwise recipe, not {c.recipe}"
    try:
        schedules.stage_sizes(c.stage_sizes, len(c.stage_fractions), c.image_size)
    except ValueError as exc:
        return f"stage sizes: {exc}"
    return None


def _rule(broken: Callable[[Config], bool], message: str) -> Callable[[Config], str | None]:
    return lambda c: message if broken(c) else None


#: Rules between fields: (the fields, the problem of a config or None). Checked after every
#: field's own range, so a rule may rely on each field being valid.
RULES: tuple[tuple[tuple[str, ...], Callable[[Config], str | None]], ...] = (
    (
        ("label_smoothing", "imbalance"),
        _rule(
            lambda c: bool(c.label_smoothing) and c.imbalance == "focal",
            "label smoothing is not available with --imbalance focal; choose one",
        ),
    ),
    (
        ("average_cycles", "ema_decay"),
        _rule(
            lambda c: bool(c.average_cycles) and bool(c.ema_decay),
            "--average-cycles and --ema-decay both replace the final weights; choose one",
        ),
    ),
    (
        ("mix", "imbalance"),
        # fastai's MixUp/CutMix mix the targets of a loss on class indices; the logit-adjusted loss is not one
        _rule(
            lambda c: c.mix != "none" and c.imbalance == "logit-adjusted",
            "--mix is not available with --imbalance logit-adjusted; choose one",
        ),
    ),
    (
        ("distill_from", "mix", "sam_rho"),
        _rule(
            lambda c: bool(c.distill_from) and (c.mix != "none" or bool(c.sam_rho)),
            "--distill-from is not available with --mix or --sam-rho (they recompute the loss without the "
            "teacher's term); choose one",
        ),
    ),
    (
        ("distill_from", "members"),
        _rule(
            lambda c: bool(c.distill_from) and c.members > 1,
            "--distill-from trains one student network; drop --members",
        ),
    ),
    (
        ("stage_sizes", "recipe", "stage_fractions", "image_size"),
        lambda c: _stage_sizes_problem(c) if c.stage_sizes else None,
    ),
    (
        ("stage_sizes", "members", "member_archs"),
        _rule(
            lambda c: bool(c.stage_sizes) and c.members > 1 and len(_member_sizes(c)) > 1,
            "--stage-sizes ends at one image size, but the members differ in size; drop --stage-sizes or give "
            "every member the same size",
        ),
    ),
)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to its field's type; errors name the key and source."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be empty")
    base = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(base)
    try:
        if origin is Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ValueError(f"choose one of {', '.join(map(str, choices))}")
            return value  # a choice needs no range check
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            kinds = typing.get_args(base)
            if isinstance(value, str) and not value.strip():
                items = []
            if len(kinds) == 2 and kinds[1] is Ellipsis:
                if not items:
                    if _DEFAULTS.get(name) == ():
                        return ()  # an optional list (e.g. stage_sizes): empty means "not used"
                    raise ValueError("expected at least one value")
                kinds = (kinds[0],) * len(items)
            if len(items) != len(kinds):
                raise ValueError(f"expected {len(kinds)} values")
            out = tuple(_scalar(k, v) for k, v in zip(kinds, items))
        else:
            out = _scalar(base, value)
        return out
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name}={value!r} is not a valid {_type_name(base)} ({exc})") from None


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in {"true", "yes", "1", "on"}:
                return True
            if value.lower() in {"false", "no", "0", "off"}:
                return False
            raise ValueError("expected true or false")
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if kind is str:
        return str(value)
    return value


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "choice"
    if typing.get_origin(kind) is tuple:
        return "list"
    return getattr(kind, "__name__", str(kind))


def _apply(config: Config, changes: dict[str, Any], *, source: str) -> Config:
    names = {f.name for f in fields(Config)}
    unknown = [k for k in changes if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(names))}"
        raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
    try:
        return dataclasses.replace(config, **{k: _coerce(k, v, source) for k, v in changes.items()})
    except ConfigError as exc:
        if str(exc).startswith(f"{source}: "):
            raise
        raise ConfigError(f"{source}: {exc}") from None


def read_yaml(path: str | Path, *, file: str, content: str) -> Any:
    """A YAML file's data (empty: {}), with errors that name the path: ``file`` not found, or
    cannot read ``content`` (also for the search space of ``dermaclass tune``)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: {file} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read {content} ({exc})") from None


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Resolve the configuration: defaults, then the YAML file, then non-None overrides (CLI flags)."""
    config = Config()
    if path is not None:
        path = Path(path)
        data = read_yaml(path, file="config file", content="config")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        config = _apply(config, data, source=str(path))
    flags = {k: v for k, v in overrides.items() if v is not None}
    return _apply(config, flags, source="command line")

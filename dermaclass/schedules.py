"""Training plans as pure functions: stepwise stages (seed 001), SGDR epoch counts (seed 003).

Nothing here touches a model, so every rule is unit-tested against the papers' numbers and
the whole plan is printed before a run starts.

Seed 001 (Prasad et al., "Rethinking of deep models parameters with respect to data
distribution") trains on nested subsets A < B < C < D < O (20/40/60/80/100 % of the
training set), carrying weights from one to the next, with batch sizes b, 2b, 3b, 4b, b
(Table I: ``A -2b-> B -3b-> C -4b-> D -b-> O``) and the learning rate of Eq. 9:

    lambda' = lambda / b                 for M_i with i = 1 or n
    lambda' = (lambda / 10) / (n * b)    for 1 < i < n

Our reading. Eq. 9 is written for the *summed* gradient of Eq. 7 (lambda' = lambda / b is
the step size per summed example). fastai's losses are batch means, whose gradient already
carries the 1/b, so in fastai's terms Eq. 9 is: the first and last stages train at the
base rate lambda, and the middle stages at lambda / (10 n). "lambda = lambda' for next i"
we read as: the rule is applied per stage to that stage's own base rate (not compounded,
which would shrink the rate geometrically by 1/b per stage). The base rate is the stage's
LR range test (fastai ``lr_find``, run before every stage on the stage's data and batch
size) or a fixed ``--lr``.

The rule is a choice so that benchmarks can compare it:
- ``eq9``: the reading above;
- ``constant``: every stage at its base rate (the range test alone decides);
- ``linear``: the stage-1 rate scaled with the batch size, lr_i = lr_1 * b_i / b_1 (the
  linear scaling rule of Goyal et al.), no further range tests.

Seed 003 (Mishra et al., MVA 2019): SGDR with cycle-length multiplication; fastai's
``fit_sgdr(n_cycles, cycle_len, cycle_mult)`` runs
``cycle_len * (cycle_mult**n_cycles - 1) // (cycle_mult - 1)`` epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

LR_RULES = ("eq9", "constant", "linear")


def sgdr_epochs(n_cycles: int, cycle_len: int, cycle_mult: int) -> int:
    """Epochs of fastai's ``fit_sgdr``: cycles of cycle_len, cycle_len*mult, cycle_len*mult^2, ..."""
    check_sgdr(n_cycles, cycle_len, cycle_mult)
    return cycle_len * (cycle_mult**n_cycles - 1) // (cycle_mult - 1)


def check_sgdr(n_cycles: int, cycle_len: int, cycle_mult: int) -> None:
    """SGDR settings fastai can run; cycle_mult = 1 would divide by zero inside fit_sgdr."""
    if n_cycles < 1 or cycle_len < 1:
        raise ValueError(f"SGDR needs n_cycles >= 1 and cycle_len >= 1, got {n_cycles} and {cycle_len}")
    if int(cycle_mult) != cycle_mult or cycle_mult < 2:
        raise ValueError(f"cycle_mult must be an integer >= 2 (fastai divides by cycle_mult - 1), got {cycle_mult}")


def cycle_end_epochs(lr_at: Callable[[float], float], n_epoch: int) -> list[int]:
    """The epochs (0-based) of a fit that end an annealing cycle: the LR schedule ``lr_at(pos)``
    (pos in [0, 1], fastai's convention) jumps up right after them (a warm restart), or the fit
    ends there. SGDR's cycle ends are the weights snapshot ensembles (Huang et al. 2017) and
    SWA (Izmailov et al. 2018) collect: each sits at the bottom of an annealed cycle.
    """
    if n_epoch < 1:
        raise ValueError(f"a fit has at least one epoch, got {n_epoch}")
    eps = 1e-6 / n_epoch
    ends = []
    for e in range(n_epoch - 1):
        pos = (e + 1) / n_epoch
        if float(np.max(lr_at(pos + eps))) > 2 * float(np.max(lr_at(pos - eps))) + 1e-12:
            ends.append(e)
    return [*ends, n_epoch - 1]


def batch_size_multipliers(n_stages: int) -> list[int]:
    """Seed 001's batch-size steps: b, 2b, ..., (n-1)b, then b for the full set.

    Table I (5 stages): A -2b-> B -3b-> C -4b-> D -b-> O gives [1, 2, 3, 4, 1]; the ablation
    A -2b-> C -b-> O gives [1, 2, 1]; A -2b-> O gives [1, 2].
    """
    if n_stages < 1:
        raise ValueError("at least one stage")
    if n_stages <= 2:
        return list(range(1, n_stages + 1))
    return list(range(1, n_stages)) + [1]


MIN_BATCHES = 2  # full training batches per epoch in the smallest stage (fastai drops the last partial one)
MIN_BATCH_SIZE = 4  # below this, BatchNorm statistics are noise


def largest_batch_size(
    *, n_train: int, batch_size: int, fractions: Sequence[float] | None = None, min_batches: int = MIN_BATCHES
) -> int:
    """The largest batch size <= ``batch_size`` that gives every stage ``min_batches`` full batches.

    ``fractions``: seed 001's stepwise subsets (stage i trains ``round(f_i * n_train)`` images at
    batch ``b * batch_size_multipliers[i]``); None for a single stage on all the images. 0 when
    not even batch size 1 fits. Pure, so the small-data rule is tested without a model.
    """
    stages = (
        [(max(1, round(f * n_train)), m) for f, m in zip(fractions, batch_size_multipliers(len(fractions)))]
        if fractions
        else [(n_train, 1)]
    )
    fits = [b for b in range(batch_size, 0, -1) if all(n // (b * m) >= min_batches for n, m in stages)]
    return fits[0] if fits else 0


def images_needed(*, batch_size: int, fractions: Sequence[float] | None = None, min_batches: int = MIN_BATCHES) -> int:
    """The fewest training images for which ``batch_size`` gives every stage ``min_batches`` batches."""
    n = 1
    while (
        largest_batch_size(n_train=n, batch_size=batch_size, fractions=fractions, min_batches=min_batches) < batch_size
    ):
        n = n * 2 if n < 64 else n + max(1, n // 16)
    lo = n // 2
    while lo < n:  # bisect down to the exact count
        mid = (lo + n) // 2
        if (
            largest_batch_size(n_train=mid, batch_size=batch_size, fractions=fractions, min_batches=min_batches)
            >= batch_size
        ):
            n = mid
        else:
            lo = mid + 1
    return n


def eq9_factor(stage: int, n_stages: int) -> float:
    """Eq. 9 in mean-loss form: 1 for the first and last stage, 1 / (10 n) in between (stage is 1-based)."""
    if not 1 <= stage <= n_stages:
        raise ValueError(f"stage {stage} outside 1..{n_stages}")
    return 1.0 if stage in (1, n_stages) else 1.0 / (10 * n_stages)


def lr_factor(rule: str, stage: int, n_stages: int, batch_size: int, base_batch_size: int) -> float:
    """Multiplier on the base LR of a stage under ``rule`` (see the module docstring)."""
    if rule == "eq9":
        return eq9_factor(stage, n_stages)
    if rule == "constant":
        return 1.0
    if rule == "linear":
        return batch_size / base_batch_size
    raise ValueError(f"unknown LR rule {rule!r}; choose one of {', '.join(LR_RULES)}")


@dataclass(frozen=True)
class Stage:
    """One stage of a plan, as printed before training and recorded in the bundle."""

    stage: int
    fraction: float
    images: int
    batch_size: int
    lr_factor: float
    lr: float | None  # absolute LR when fixed in advance; None when the range test decides
    range_test: bool
    head_epochs: int
    sgdr_epochs: int
    size: tuple[int, int] | None = None  # (width, height) of this stage's images; None: the run's size

    @property
    def epochs(self) -> int:
        return self.head_epochs + self.sgdr_epochs

    def to_dict(self) -> dict:
        return {**asdict(self), "epochs": self.epochs}


def check_stage_fractions(fractions: Sequence[float]) -> list[float]:
    """Stage fractions: increasing, in (0, 1], ending at 1 (the last stage sees all the data)."""
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f <= 1 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])) or fr[-1] != 1.0:
        raise ValueError(f"stage fractions must increase within (0, 1] and end at 1.0, got {list(fractions)}")
    return fr


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """``"128x96"`` (or a pair) -> (width, height); each side at least 16 pixels."""
    try:
        w, h = (int(v) for v in (text.lower().split("x") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT (e.g. 128x96)") from None
    if w < 16 or h < 16 or w > 4096 or h > 4096:
        raise ValueError(f"image size {text!r}: each side must be between 16 and 4096 pixels")
    return w, h


def stage_sizes(sizes: Sequence[str | Sequence[int]], n_stages: int, final: Sequence[int]) -> list[tuple[int, int]]:
    """Progressive resizing (fastbook): the input size of every stepwise stage.

    Empty: every stage at ``final``. Otherwise one size per stage, the last equal to the run's
    image size (the bundle's input size), so the model ends on what it will see in use.
    """
    final = parse_size(final)
    if not sizes:
        return [final] * n_stages
    parsed = [parse_size(x) for x in sizes]
    if len(parsed) != n_stages:
        raise ValueError(f"{len(parsed)} stage sizes for {n_stages} stages; give one per stage")
    if parsed[-1] != final:
        raise ValueError(
            f"the last stage size {parsed[-1][0]}x{parsed[-1][1]} must equal the image size "
            f"{final[0]}x{final[1]} (the size the model is used at)"
        )
    return parsed


def stage_plan(
    *,
    n_train: int,
    fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
    batch_size: int = 32,
    lr: float | None = None,
    lr_rule: str = "eq9",
    head_epochs: int = 1,
    n_cycles: int = 2,
    cycle_len: int = 1,
    cycle_mult: int = 2,
    weight_sharing: bool = True,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Stage]:
    """The stepwise plan of seed 001 for a training set of ``n_train`` images.

    The coarse head-only fit runs in stage 1, and in every stage when weights are not shared
    (each stage then restarts from the initial weights). The stage image count is the size
    of the nested subset (``nested_subsets`` rounds per class, so it can differ by a few).
    """
    fr = check_stage_fractions(fractions)
    check_sgdr(n_cycles, cycle_len, cycle_mult)
    if lr_rule not in LR_RULES:
        raise ValueError(f"unknown LR rule {lr_rule!r}; choose one of {', '.join(LR_RULES)}")
    n = len(fr)
    if sizes is not None and len(sizes) != n:
        raise ValueError(f"{len(sizes)} stage sizes for {n} stages")
    mults = batch_size_multipliers(n)
    plan = []
    for i, (f, m) in enumerate(zip(fr, mults), start=1):
        bs = batch_size * m
        factor = lr_factor(lr_rule, i, n, bs, batch_size)
        plan.append(
            Stage(
                stage=i,
                fraction=f,
                images=int(round(f * n_train)),
                batch_size=bs,
                lr_factor=factor,
                lr=None if lr is None else lr * factor,
                range_test=lr is None and (lr_rule != "linear" or i == 1),
                head_epochs=head_epochs if (i == 1 or not weight_sharing) else 0,
                sgdr_epochs=sgdr_epochs(n_cycles, cycle_len, cycle_mult),
                size=tuple(sizes[i - 1]) if sizes is not None else None,
            )
        )
    return plan


def training_cost(plan: Sequence[Stage]) -> float:
    """Seed 001's cost measure in full-dataset epochs: sum of epochs x fraction of the data."""
    return float(sum(s.epochs * s.fraction for s in plan))


def nested_subsets(labels: Sequence[str], fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Nested, class-stratified index subsets: subset k holds ceil(f_k * n_c) images of class c.

    Every subset contains the previous one (one shuffled order per class, cut at growing
    lengths), and every class with at least one image is present from the first subset on,
    so a 20 % subset keeps rare classes such as dermatofibroma.
    """
    fr = check_stage_fractions(fractions)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    orders = {c: rng.permutation(np.flatnonzero(labels == c)) for c in sorted(set(labels.tolist()))}
    subsets = []
    for f in fr:
        parts = [order[: max(1, math.ceil(f * len(order)))] for order in orders.values()]
        subsets.append(np.sort(np.concatenate(parts)))
    return subsets


def format_plan(plan: Sequence[Stage]) -> list[dict]:
    """Rows for printing: stage, fraction, images, batch size, LR, epochs."""
    rows = []
    for s in plan:
        lr = (
            f"{s.lr:.2e}"
            if s.lr is not None
            else (f"range test x {s.lr_factor:.4g}" if s.range_test else f"stage-1 LR x {s.lr_factor:.4g}")
        )
        rows.append(
            {
                "stage": s.stage,
                "fraction": f"{s.fraction:.0%}",
                "images": s.images,
                "batch size": s.batch_size,
                "LR": lr,
                "epochs": f"{s.head_epochs} head + {s.sgdr_epochs} SGDR",
            }
        )
        if len({p.size for p in plan}) > 1:  # progressive resizing: show each stage's input size
            rows[-1]["size"] = f"{s.size[0]}x{s.size[1]}"
    return rows


# ---- deep ensembles (train/ensemble.py) ------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One network of a cross-fitted ensemble: it trains on every fold but ``fold`` and picks
    its checkpoint on ``fold``."""

    index: int
    fold: int
    arch: str
    image_size: tuple[int, int]
    seed: int

    @property
    def name(self) -> str:
        return f"m{self.index}"


def parse_member(spec: str) -> tuple[str | None, tuple[int, int]]:
    """``"tf_efficientnet_lite1@160x120"`` -> (arch, size); ``"@160x120"`` keeps the run's arch (None)."""
    arch, sep, size = str(spec).strip().rpartition("@")
    if not sep:
        raise ValueError(
            f"member {spec!r} is not ARCH@WIDTHxHEIGHT (e.g. tf_efficientnet_lite1@160x120) or @WIDTHxHEIGHT"
        )
    return (arch.strip() or None), parse_size(size)


def member_plan(
    members: int, *, arch: str, image_size: Sequence[int], seed: int, member_archs: Sequence[str] = ()
) -> list[Member]:
    """The members of a K-network ensemble: member k holds out fold k, trains with seed + k,
    and takes the k-th of ``member_archs`` (cycled), or ``arch`` at ``image_size``."""
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member, got {members}")
    specs = [parse_member(s) for s in member_archs]
    plan = []
    for k in range(members):
        a, size = specs[k % len(specs)] if specs else (None, parse_size(image_size))
        plan.append(Member(index=k, fold=k, arch=a or arch, image_size=size, seed=seed + k))
    return plan

"""Stepwise plans, Eq. 9 and SGDR epoch counts against the numbers in seeds 001 and 003."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dermaclass import schedules as S


def test_table1_batch_sizes() -> None:
    # Table I: A -2b-> B -3b-> C -4b-> D -b-> O ; ablation: A -2b-> C -b-> O and A -2b-> O
    assert S.batch_size_multipliers(5) == [1, 2, 3, 4, 1]
    assert S.batch_size_multipliers(3) == [1, 2, 1]
    assert S.batch_size_multipliers(2) == [1, 2]
    assert S.batch_size_multipliers(1) == [1]


def test_eq9_in_mean_loss_form() -> None:
    # lambda/b at the ends, (lambda/10)/(n b) in between; fastai's mean loss absorbs the 1/b.
    assert [S.eq9_factor(i, 5) for i in range(1, 6)] == [1.0, 0.02, 0.02, 0.02, 1.0]
    assert [S.eq9_factor(i, 3) for i in range(1, 4)] == [1.0, pytest.approx(1 / 30), 1.0]
    with pytest.raises(ValueError):
        S.eq9_factor(6, 5)


def test_paper_cost_footnote() -> None:
    # Footnote 4: baseline 100 x M; stepwise 20 x (0.2 + 0.4 + 0.6 + 0.8 + 1) M = 60 x M: 40 % less.
    plan = S.stage_plan(n_train=50_000, head_epochs=0, n_cycles=1, cycle_len=20, cycle_mult=2)
    assert [s.images for s in plan] == [10_000, 20_000, 30_000, 40_000, 50_000]  # CIFAR-100's A..O
    assert [s.epochs for s in plan] == [20] * 5
    assert S.training_cost(plan) == pytest.approx(60.0)
    assert 1 - S.training_cost(plan) / 100 == pytest.approx(0.40)


def test_plan_with_fixed_lr_and_rules() -> None:
    eq9 = S.stage_plan(n_train=1000, batch_size=24, lr=1e-3)
    assert [s.batch_size for s in eq9] == [24, 48, 72, 96, 24]
    assert [s.lr for s in eq9] == pytest.approx([1e-3, 2e-5, 2e-5, 2e-5, 1e-3])
    assert not any(s.range_test for s in eq9)
    assert [s.head_epochs for s in eq9] == [1, 0, 0, 0, 0]
    linear = S.stage_plan(n_train=1000, batch_size=24, lr=1e-3, lr_rule="linear")
    assert [s.lr for s in linear] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 1e-3])
    const = S.stage_plan(n_train=1000, lr=1e-3, lr_rule="constant")
    assert {s.lr for s in const} == {1e-3}
    auto = S.stage_plan(n_train=1000, lr_rule="linear")
    assert [s.range_test for s in auto] == [True, False, False, False, False]
    no_share = S.stage_plan(n_train=1000, weight_sharing=False)
    assert [s.head_epochs for s in no_share] == [1] * 5


def test_bad_plans() -> None:
    with pytest.raises(ValueError, match="end at 1.0"):
        S.stage_plan(n_train=10, fractions=(0.2, 0.5))
    with pytest.raises(ValueError, match="increase"):
        S.stage_plan(n_train=10, fractions=(0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="cycle_mult"):
        S.stage_plan(n_train=10, cycle_mult=1)
    with pytest.raises(ValueError, match="unknown LR rule"):
        S.stage_plan(n_train=10, lr_rule="sqrt")


def test_sgdr_epochs_match_fastai_formula() -> None:
    assert S.sgdr_epochs(2, 1, 2) == 3  # 1 + 2
    assert S.sgdr_epochs(3, 1, 2) == 7  # 1 + 2 + 4
    assert S.sgdr_epochs(3, 2, 3) == 26  # 2 + 6 + 18
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError):
            S.sgdr_epochs(2, 1, bad)


def fastai_sgdr(n_cycles: int, cycle_len: int, cycle_mult: int, lr_max: float):
    """fastai's SGDR schedule as ``Learner.fit_sgdr`` builds it (pos in [0, 1] -> LR)."""
    from fastai.callback.schedule import SchedCos, combine_scheds

    n_epoch = S.sgdr_epochs(n_cycles, cycle_len, cycle_mult)
    pcts = [cycle_len * cycle_mult**i / n_epoch for i in range(n_cycles)]
    return combine_scheds(pcts, [SchedCos(lr_max, 0) for _ in range(n_cycles)])


def test_fastai_sgdr_is_the_papers_schedule() -> None:
    """Seed 003's SGDR (Loshchilov and Hutter 2017, Eq. 5): cosine from lr_max to 0 within a
    cycle, a warm restart after it, cycle i lasting cycle_len * cycle_mult**i epochs. fastai's
    ``fit_sgdr`` schedule, checked at known points: the recipes compose it, so the library
    keeps no copy of the formula."""
    lr = fastai_sgdr(n_cycles=2, cycle_len=1, cycle_mult=2, lr_max=1.0)
    assert float(lr(0.0)) == pytest.approx(1.0)
    assert float(lr(1 / 6)) == pytest.approx(0.5)  # half-way through the first 1-epoch cycle
    assert float(lr(1 / 3 - 1e-6)) == pytest.approx(0.0, abs=1e-4)  # fastai keeps positions in float32
    assert float(lr(1 / 3 + 1e-6)) == pytest.approx(1.0)  # warm restart
    assert float(lr(2 / 3)) == pytest.approx(0.5)  # the second cycle is twice as long


def test_cycle_end_epochs_are_sgdr_restarts() -> None:
    from fastai.callback.schedule import SchedCos, combine_scheds

    ours = fastai_sgdr(n_cycles=3, cycle_len=1, cycle_mult=2, lr_max=1.0)
    assert S.cycle_end_epochs(ours, 7) == [0, 2, 6]  # cycles of 1, 2 and 4 epochs
    # fastai's own SGDR schedule (fit_sgdr's combine_scheds), with per-group LRs as slice() gives
    lr_max = np.array([1e-4, 1e-3, 1e-2])
    pcts = [1 / 7, 2 / 7, 4 / 7]
    fastai = combine_scheds(pcts, [SchedCos(lr_max, 0)] * 3)
    assert S.cycle_end_epochs(fastai, 7) == [0, 2, 6]
    # one-cycle and flat schedules have one end: the fit's last epoch
    assert S.cycle_end_epochs(lambda pos: 1e-3 * (1 - pos), 4) == [3]
    assert S.cycle_end_epochs(lambda pos: 1e-3, 1) == [0]
    with pytest.raises(ValueError, match="at least one epoch"):
        S.cycle_end_epochs(ours, 0)


def test_nested_subsets_are_nested_and_stratified() -> None:
    labels = np.array(["nv"] * 670 + ["mel"] * 110 + ["df"] * 11 + ["vasc"] * 3)
    subsets = S.nested_subsets(labels, (0.2, 0.4, 0.6, 0.8, 1.0), seed=0)
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) < set(big)
    assert len(subsets[-1]) == len(labels)
    first = labels[subsets[0]]
    assert {c: int((first == c).sum()) for c in ("nv", "mel", "df", "vasc")} == {
        "nv": 134,
        "mel": 22,
        "df": 3,
        "vasc": 1,
    }
    assert np.array_equal(subsets[1], S.nested_subsets(labels, (0.2, 0.4, 0.6, 0.8, 1.0), seed=0)[1])
    assert not np.array_equal(subsets[0], S.nested_subsets(labels, (0.2, 0.4, 0.6, 0.8, 1.0), seed=1)[0])


def test_format_plan_rows() -> None:
    rows = S.format_plan(S.stage_plan(n_train=100))
    assert rows[1]["LR"] == "range test x 0.02" and rows[0]["epochs"] == "1 head + 3 SGDR"
    assert math.isclose(S.lr_factor("linear", 3, 5, 96, 32), 3.0)


def test_stage_sizes_progressive_resizing() -> None:
    assert S.stage_sizes((), 3, (128, 96)) == [(128, 96)] * 3
    assert S.stage_sizes(("96x72", "112x84", "128x96"), 3, (128, 96)) == [(96, 72), (112, 84), (128, 96)]
    with pytest.raises(ValueError, match="must equal the image size"):
        S.stage_sizes(("96x72", "112x84", "160x120"), 3, (128, 96))
    with pytest.raises(ValueError, match="one per stage"):
        S.stage_sizes(("96x72", "128x96"), 3, (128, 96))
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        S.parse_size("128by96")
    with pytest.raises(ValueError, match="between 16 and 4096"):
        S.parse_size("8x8")
    plan = S.stage_plan(n_train=100, fractions=(0.5, 1.0), sizes=[(96, 72), (128, 96)], lr_rule="linear")
    assert [s.size for s in plan] == [(96, 72), (128, 96)]
    rows = S.format_plan(plan)
    assert rows[0]["size"] == "96x72" and rows[1]["size"] == "128x96"
    assert "size" not in S.format_plan(S.stage_plan(n_train=100, fractions=(0.5, 1.0)))[0]


def test_largest_batch_size_gives_every_stage_two_full_batches() -> None:
    fractions = (0.2, 0.4, 0.6, 0.8, 1.0)
    assert S.largest_batch_size(n_train=7009, batch_size=32, fractions=fractions) == 32
    # 45 images: stage 1 has 9 (b = 4 gives 2 batches), stage 4 has 36 at 4b = 16 (2 batches)
    assert S.largest_batch_size(n_train=45, batch_size=32, fractions=fractions) == 4
    assert S.largest_batch_size(n_train=45, batch_size=32) == 22  # one stage: 45 // 22 == 2
    assert S.largest_batch_size(n_train=3, batch_size=32, fractions=fractions) == 0
    for b, fr in ((32, fractions), (4, fractions), (32, None)):
        need = S.images_needed(batch_size=b, fractions=fr)
        assert S.largest_batch_size(n_train=need, batch_size=b, fractions=fr) == b
        assert S.largest_batch_size(n_train=need - 1, batch_size=b, fractions=fr) < b

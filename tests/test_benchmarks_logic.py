"""The benchmarks' own logic that decides what they report: pruner replay and served-against-raw
ranking (bench_tune), the teacher a distillation variant reads (bench_ensemble) and PH2's
per-kind figures (bench_ph2)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench(request: pytest.FixtureRequest):
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling ``common``
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(BENCH))


def _curves(n: int, seed: int = 0) -> list[tuple[list[float], float, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = rng.uniform(0.3, 0.7)
        c = [float(q * (1 - np.exp(-(k + 1) / 2)) + rng.normal(0, 0.01)) for k in range(6)]
        out.append((c, c[-1], 6.0))
    return out


def test_replay_without_pruning_runs_every_epoch(bench) -> None:
    r = bench("bench_tune").replay_pruner(_curves(12), "none")
    assert r["pruned"] == 0 and r["epoch_share"] == 1.0 and r["best_kept"] and r["top5_kept"] == 5
    assert r["minutes_pro_rata"] == r["minutes_unpruned"] == 72.0


@pytest.mark.parametrize("pruner", ["hyperband", "halving", "median"])
def test_replay_prunes_flat_bad_curves_and_counts_what_it_saved(bench, pruner: str) -> None:
    r = bench("bench_tune").replay_pruner(_curves(30), pruner)
    assert 0 < r["pruned"] < 30
    assert r["epochs_used"] < r["epochs_unpruned"] == 180
    assert r["epoch_share"] == pytest.approx(r["epochs_used"] / 180, abs=1e-3)
    assert r["best_value_kept"] <= r["best_value"]
    assert r["best_kept"] == (r["best_value_kept"] == r["best_value"])


def test_served_against_raw_scores_shows_when_the_prior_shift_reorders_trials(bench) -> None:
    f = bench("bench_tune").served_vs_raw
    same = f([(0.50, 0.52), (0.40, 0.43), (0.30, 0.31)])
    assert same["spearman"] == 1.0 and same["same_best"] and same["served_best_raw_rank"] == 1
    assert same["gap_mean"] == pytest.approx(-0.02, abs=1e-4)
    # the raw leader collapses once served (every image called nv): the two scores disagree
    flipped = f([(0.14, 0.60), (0.50, 0.55), (0.45, 0.50)])
    assert not flipped["same_best"] and flipped["served_best_raw_rank"] == 2 and flipped["spearman"] < 1
    assert flipped["gap_min"] == pytest.approx(-0.46) and f([(0.5, 0.5)]) == {"trials": 1}


def test_teacher_placeholder_reads_the_same_seeds_bundle(bench, tmp_path: Path) -> None:
    resolve = bench("bench_ensemble").resolve_teacher
    assert resolve("--recipe", seed=43, use={}, runs_dir=tmp_path) == "--recipe"
    (tmp_path / "k3-full-seed43").mkdir()
    (tmp_path / "k3-full-seed43" / "model.json").write_text("{}")
    assert resolve("{teacher:k3-full}", seed=43, use={}, runs_dir=tmp_path) == str(
        (tmp_path / "k3-full-seed43").resolve()
    )
    given = tmp_path / "elsewhere"
    (given).mkdir()
    (given / "model.json").write_text("{}")
    assert resolve("{teacher:k3-full}", seed=43, use={("k3-full", 43): given}, runs_dir=tmp_path) == str(
        given.resolve()
    )
    with pytest.raises(SystemExit, match="no trained k3-full bundle at seed 44"):
        resolve("{teacher:k3-full}", seed=44, use={}, runs_dir=tmp_path)


def test_ph2_kind_figures_separate_common_from_atypical_nevi(bench) -> None:
    kinds = np.array(["melanoma"] * 4 + ["common_nevus"] * 4 + ["atypical_nevus"] * 4)
    # melanomas high; common nevi low; atypical nevi as high as the melanomas
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.1, 0.2, 0.9, 0.8, 0.7, 0.6])
    f = bench("bench_ph2").kind_figures(p, kinds, threshold=0.5, sensitivities=(0.85,))
    assert f["n"] == {"common_nevus": 4, "atypical_nevus": 4, "melanoma": 4}
    assert f["flag_sensitivity"] == 1.0
    assert f["flag_specificity"] == {"common_nevus": 1.0, "atypical_nevus": 0.0, "all_nevi": 0.5}
    assert f["mel_auroc"]["common_nevus"] == 1.0 and f["mel_auroc"]["atypical_nevus"] == 0.5
    assert f["best_specificity_at"]["common_nevus"]["0.85"] == 1.0


def test_a_framing_crop_makes_the_lesion_fill_the_share_asked(bench) -> None:
    frame_box = bench("bench_ph2").frame_box
    mask = np.zeros((150, 200), np.uint8)
    mask[60:90, 120:160] = 1  # 1,200 of 30,000 pixels: 4 %, off centre
    left, top, right, bottom = frame_box(mask, 0.16)
    assert (right - left, bottom - top) == (100, 75)  # half the sides: four times the share, aspect kept
    assert mask[top:bottom, left:right].mean() == pytest.approx(0.16)
    assert mask[top:bottom, left:right].sum() == mask.sum()  # the whole lesion is in the crop
    # kept inside the image when the lesion sits at an edge
    edge = np.zeros((150, 200), np.uint8)
    edge[0:20, 180:200] = 1
    l2, t2, r2, b2 = frame_box(edge, 0.5)
    assert 0 <= l2 and 0 <= t2 and r2 <= 200 and b2 <= 150
    # a lesion that already fills the share, and an image without one, are left whole
    assert frame_box(np.ones((150, 200), np.uint8), 0.5) == (0, 0, 200, 150)
    assert frame_box(np.zeros((150, 200), np.uint8), 0.5) == (0, 0, 200, 150)


def test_member_disagreement_is_zero_when_networks_agree_and_grows_when_they_contradict(bench) -> None:
    disagreement = bench("bench_refer").member_disagreement
    same = np.array([[0.9, 0.1], [0.5, 0.5]])
    assert np.allclose(disagreement([same, same, same]), 0)  # even an unsure answer, if shared
    sure_apart = disagreement([np.array([[0.99, 0.01]]), np.array([[0.01, 0.99]])])
    mild_apart = disagreement([np.array([[0.6, 0.4]]), np.array([[0.4, 0.6]])])
    assert sure_apart[0] > mild_apart[0] > 0 and sure_apart[0] <= np.log(2) + 1e-9


def test_results_name_runs_relative_to_any_checkout_of_the_repository(bench, tmp_path: Path) -> None:
    import subprocess

    common = bench("common")
    root = common.ROOT
    assert common.repo_relative(root / "models" / "x" / "split.csv") == "models/x/split.csv"
    # Another worktree of this repository, as long benchmarks use: paths in it are recorded
    # relative to it (even before the run folder exists).
    tree = tmp_path / "tree"
    made = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), "HEAD"],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot add a git worktree here: {made.stderr.strip()}")
    try:
        assert common.repo_relative(tree / "runs" / "bench" / "k3-full-seed44") == "runs/bench/k3-full-seed44"
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)
    # A folder outside any checkout of it is kept as given.
    assert common.repo_relative(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")


def test_a_variance_floor_bounds_only_the_units_that_were_almost_never_on(bench) -> None:
    import torch
    from fastai.vision.learner import create_head

    hb = bench("bench_head_bn")
    torch.manual_seed(0)
    head = create_head(8, 3, pool=False).eval()  # fastai's head from its first batch norm on
    # in place of the pool and flatten, so that the norms sit at model[1][2] and [6] as served
    head = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), *head)
    norms = [head[i] for i in hb.HEAD_NORMS]
    assert all(isinstance(m, torch.nn.BatchNorm1d) for m in norms)
    for m in norms:
        m.running_var.fill_(1.0)
    x = np.random.default_rng(0).normal(size=(1, 5, 8)).astype(np.float32)
    as_trained = hb.head_logits(hb.floored_head(head, 0.0), x)
    assert np.allclose(hb.head_logits(hb.floored_head(head, 1e-2), x), as_trained)  # all variances above it
    norms[0].running_var[3] = 1e-12  # a unit that was off in training, on in this image
    wild = hb.head_logits(hb.floored_head(head, 0.0), x)
    tamed = hb.head_logits(hb.floored_head(head, 1e-2), x)
    assert np.abs(wild).max() > 10 * np.abs(tamed).max()
    assert norms[0].running_var[3] == pytest.approx(1e-12)  # the bundle's own head is left as it was
    figures = hb.network_figures(np.array([0, 1, 2, 0, 1]), tamed, wild)
    assert set(figures) == {"nll", "nll_max", "balanced_accuracy", "max_abs_logit", "top_changed"}


def test_the_replayed_head_reproduces_the_served_logits(bench, tiny_bundle: Path, colour_data: Path) -> None:
    from dermaclass.serving.predictor import Predictor

    hb = bench("bench_head_bn")
    pred = Predictor(tiny_bundle, backend="torch")
    images = [pred.preprocess(p) for p in sorted((colour_data / "mel").glob("*.png"))[:3]]
    views, served = hb.pooled_views(pred, images, check=2)
    assert views.shape[:2] == (4, 3) and len(served) == 2
    assert np.allclose(hb.head_logits(hb.floored_head(pred.model[1], 0.0), views)[:2], served, atol=1e-4)

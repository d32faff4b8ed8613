"""refer.py: input checks and the feature-space out-of-distribution scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dermaclass.serving import refer


def _blobs(rng: np.random.Generator, n: int, centre: float) -> np.ndarray:
    """Points around a centre away from the origin, so that directions (knn's unit vectors) differ too."""
    c = np.where(np.arange(16) < 8, 5.0, 0.0) if centre == 0 else np.where(np.arange(16) >= 8, 5.0, 0.0)
    return c + rng.normal(0.0, 1.0, size=(n, 16))


def test_too_small_is_refused_with_its_size() -> None:
    with pytest.raises(refer.InputProblem, match=r"too small to judge: the image is 1x1 pixels"):
        refer.input_problem(np.zeros((1, 1, 3), dtype=np.uint8))
    with pytest.raises(refer.InputProblem, match="16x16"):
        refer.input_problem(np.zeros((16, 16, 3), dtype=np.uint8))


def test_flat_field_is_referred_and_texture_is_not() -> None:
    flat = np.full((150, 200, 3), (224, 172, 150), dtype=np.uint8)
    reason = refer.input_problem(flat)
    assert reason is not None and reason.startswith(refer.NOT_DERMOSCOPY) and "100%" in reason
    rng = np.random.default_rng(0)
    textured = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    assert refer.one_colour_share(textured) < 0.5
    assert refer.input_problem(textured) is None


def test_one_colour_share_counts_the_largest_colour() -> None:
    a = np.zeros((50, 60, 3), dtype=np.uint8)  # under the thumbnail width: no resampling
    a[:, 42:] = 255  # 70 % black, 30 % white
    assert refer.one_colour_share(a) == pytest.approx(0.7)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_feature_scores_rank_far_points_below_training_points(method: str) -> None:
    rng = np.random.default_rng(1)
    train = np.vstack([_blobs(rng, 200, 0.0), _blobs(rng, 200, 4.0)])
    labels = np.repeat([0, 1], 200)
    stats = refer.fit(method, train, labels, 3)  # class 2 absent from training: must not break the fit
    near = np.vstack([_blobs(rng, 50, 0.0), _blobs(rng, 50, 4.0)])
    far = rng.normal(-5.0, 1.0, size=(100, 16))
    s_near = refer.score(method, logits=np.zeros((100, 3)), features=near, stats=stats)
    s_far = refer.score(method, logits=np.zeros((100, 3)), features=far, stats=stats)
    assert s_near.min() > s_far.max()


def test_mahalanobis_is_the_distance_to_the_nearest_mean() -> None:
    stats = {"means": np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32), "precision": np.eye(2, dtype=np.float32)}
    s = refer.mahalanobis_score(np.array([[1.0, 0.0], [7.0, 0.0]]), stats)
    assert s == pytest.approx([-1.0, -9.0])


def test_knn_uses_the_kth_neighbour_on_unit_vectors() -> None:
    bank = np.eye(3, dtype=np.float32)
    stats = {"bank": bank, "k": np.array([2])}
    # (2, 0, 0) normalises to e1: its nearest is e1 (distance 0), its 2nd nearest at sqrt(2).
    assert refer.knn_score(np.array([[2.0, 0, 0]]), stats) == pytest.approx([-np.sqrt(2)], abs=1e-6)


def test_knn_bank_is_capped() -> None:
    stats = refer.fit_knn(np.random.default_rng(0).normal(size=(500, 8)), max_bank=100, k=5)
    assert stats["bank"].shape == (100, 8) and int(stats["k"][0]) == 5


def test_threshold_keeps_the_requested_share() -> None:
    s = np.arange(1000, dtype=float)
    t = refer.threshold(s, keep=0.95)
    assert np.mean(s >= t) == pytest.approx(0.95, abs=0.002)
    with pytest.raises(ValueError, match="no scores"):
        refer.threshold(np.array([]), keep=0.95)


def test_energy_needs_no_stats_and_unknown_method_is_named() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 0.0]])
    s = refer.score(
        "energy", logits=logits, features=None, stats=refer.fit("energy", np.zeros((2, 2)), np.zeros(2, int), 2)
    )
    assert s[0] > s[1]
    with pytest.raises(ValueError, match="unknown out-of-distribution method 'odin'"):
        refer.fit("odin", np.zeros((2, 2)), np.zeros(2, int), 2)
    with pytest.raises(ValueError, match="needs the backbone features"):
        refer.score("knn", logits=logits, features=None, stats={})


def test_stats_round_trip_through_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    stats = refer.fit("mahalanobis", rng.normal(size=(60, 4)), np.repeat([0, 1, 2], 20), 3)
    path = refer.save_stats(tmp_path, stats)
    assert path is not None and path.name == refer.OOD_FILE
    n = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: a length, then a JSON header (no pickle)
    assert b"precision" in path.read_bytes()[8 : 8 + n]
    back = refer.load_stats(tmp_path, "mahalanobis")
    assert np.array_equal(back["precision"], stats["precision"])
    with pytest.raises(ValueError, match="knn needs"):
        refer.load_stats(tmp_path, "knn")
    with pytest.raises(FileNotFoundError, match="fit-ood"):
        refer.load_stats(tmp_path / "nowhere", "knn")
    assert refer.save_stats(tmp_path, {}) is None


def test_greyscale_image_is_referred_for_having_no_colour() -> None:
    rng = np.random.default_rng(3)
    grey = np.repeat(rng.integers(0, 256, size=(150, 200, 1), dtype=np.uint8), 3, axis=2)
    assert refer.colourfulness(grey) == 0.0
    reason = refer.input_problem(grey)
    assert reason is not None and "almost no colour" in reason
    lesion_like = np.zeros((150, 200, 3), dtype=np.uint8)
    lesion_like[..., 0] = rng.integers(150, 230, size=(150, 200))  # skin: red well above blue
    lesion_like[..., 1] = rng.integers(90, 150, size=(150, 200))
    lesion_like[..., 2] = rng.integers(60, 120, size=(150, 200))
    assert refer.colourfulness(lesion_like) > refer.MIN_COLOURFULNESS and refer.input_problem(lesion_like) is None


def test_energy_score_is_a_stable_logsumexp() -> None:
    logits = np.array([[10.0, 0, 0], [0.1, 0, 0], [1000.0, 999.0, 0]])
    e = refer.energy_score(logits)
    assert e[0] > e[1]
    assert e[2] == pytest.approx(1000 + np.log(1 + np.exp(-1)))  # stable for large logits

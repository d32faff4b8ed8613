"""Metrics against hand-computed cases; bootstrap grouping; temperature; operating points."""

import numpy as np
import pytest

from dermaclass.evaluate import metrics as ev

CLASSES = ["a", "b", "c"]


def onehot(pred, k=3, hi=0.8):
    p = np.full((len(pred), k), (1 - hi) / (k - 1))
    p[np.arange(len(pred)), pred] = hi
    return p


def test_perfect_predictions():
    y = np.array([0, 0, 1, 1, 2, 2])
    m = ev.classification_metrics(y, onehot(y), CLASSES)
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == 1.0
    assert m["macro_auroc"] == m["mAP"] == m["top2_accuracy"] == 1.0
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    for c in CLASSES:
        assert m["per_class"][c]["sensitivity"] == m["per_class"][c]["specificity"] == 1.0
    assert m["log_loss"] == pytest.approx(-np.log(0.8))
    assert m["ece"] == pytest.approx(0.2)  # confidence 0.8, accuracy 1


def test_all_one_class_predicted():
    # 4 of class a, 2 of b, 2 of c; the model always says a.
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    m = ev.classification_metrics(y, onehot(np.zeros(8, int)), CLASSES)
    assert m["accuracy"] == 0.5
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)  # recalls 1, 0, 0
    pa = m["per_class"]["a"]
    assert pa["sensitivity"] == 1.0 and pa["specificity"] == 0.0 and pa["precision"] == 0.5
    assert pa["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] is None  # never predicted: not computable
    assert m["per_class"]["b"]["f1"] == 0.0 and m["per_class"]["b"]["specificity"] == 1.0
    assert m["macro_f1"] == pytest.approx((2 / 3) / 3)


def test_missing_class_is_not_computable_not_zero():
    y = np.array([0, 0, 1, 1])  # no c in the data
    p = onehot(np.array([0, 1, 1, 1]))
    m = ev.classification_metrics(y, p, CLASSES)
    c = m["per_class"]["c"]
    assert c["support"] == 0
    assert c["sensitivity"] is None and c["auroc"] is None and c["average_precision"] is None and c["f1"] is None
    assert c["specificity"] == 1.0
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # over the classes present


def test_ties_go_to_the_lowest_index():
    y = np.array([1, 1])
    p = np.full((2, 3), 1 / 3)
    m = ev.classification_metrics(y, p, CLASSES)
    assert m["confusion_matrix"][1] == [2, 0, 0]
    assert m["per_class"]["b"]["auroc"] is None  # only positives of b: no negatives
    assert ev.top_k_accuracy(y, p, 2) == 1.0  # ties: a then b


def test_auroc_and_ap_match_hand_computation():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1, 0], [0.4, 0.6, 0], [0.35, 0.65, 0], [0.8, 0.2, 0]])
    m = ev.classification_metrics(y, p, CLASSES)
    # class a scores: positives 0.9, 0.4; negatives 0.35, 0.8 -> 3 of 4 pairs ordered correctly
    assert m["per_class"]["a"]["auroc"] == pytest.approx(0.75)
    # ranking for a: 0.9(+), 0.8(-), 0.4(+), 0.35(-) -> AP = (1/1 + 2/3) / 2
    assert m["per_class"]["a"]["average_precision"] == pytest.approx((1 + 2 / 3) / 2)


def test_input_shape_errors():
    with pytest.raises(ValueError, match="do not match"):
        ev.classification_metrics([0, 1], np.zeros((3, 3)), CLASSES)
    with pytest.raises(ValueError, match="outside"):
        ev.classification_metrics([0, 5], np.zeros((2, 3)), CLASSES)


def test_confused_pairs_sorted_by_count():
    cm = [[5, 3, 0], [1, 4, 0], [0, 2, 6]]
    pairs = ev.confused_pairs(cm, CLASSES, top=2)
    assert [(d["true"], d["predicted"], d["count"]) for d in pairs] == [("a", "b", 3), ("c", "b", 2)]
    assert pairs[0]["share_of_true"] == pytest.approx(3 / 8)


def test_bootstrap_resamples_whole_groups():
    # Two lesions of 20 images: g1 all right, g2 all wrong. Resampling lesions, a replicate
    # holds 0, 1 or 2 copies of each, so accuracy is 0, 0.5 or 1 and the interval is [0, 1];
    # resampling images (ignoring the lesions) gives a falsely narrow interval around 0.5.
    y = np.zeros(40, int)
    pred = np.repeat([0, 1], 20)
    groups = np.repeat(["g1", "g2"], 20)
    out = ev.bootstrap_intervals(y, onehot(pred), CLASSES, groups=groups, n_boot=200, seed=1)
    assert out["resampled"] == "groups" and out["n_units"] == 2
    assert out["overall"]["accuracy"] == [0.0, 1.0]
    by_image = ev.bootstrap_intervals(y, onehot(pred), CLASSES, n_boot=200, seed=1)
    assert by_image["resampled"] == "images" and by_image["n_units"] == 40
    lo, hi = by_image["overall"]["accuracy"]
    assert 0.2 < lo < 0.5 < hi < 0.8


def test_bootstrap_interval_contains_point_and_absent_class_is_none():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = onehot(np.where(rng.random(300) < 0.8, y, 1 - y))
    out = ev.bootstrap_intervals(y, p, CLASSES, n_boot=300)
    point = ev.classification_metrics(y, p, CLASSES)
    lo, hi = out["overall"]["balanced_accuracy"]
    assert lo < point["balanced_accuracy"] < hi
    assert out["per_class"]["c"]["sensitivity"] is None
    assert out["per_class"]["c"]["specificity"] is not None


def test_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 3)) * 2
    y = np.array([rng.choice(3, p=row) for row in ev.softmax(logits)])
    # the labels were drawn at T=1; the same logits sharpened 3x need T close to 3
    t = ev.fit_temperature(logits * 3, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = ev.expected_calibration_error(y, ev.softmax(logits * 3))
    after = ev.expected_calibration_error(y, ev.softmax(logits * 3, t))
    assert after < before
    assert (ev.softmax(logits * 3, t).argmax(1) == ev.softmax(logits * 3).argmax(1)).all()


def test_operating_point_reaches_target_sensitivity():
    y = np.array([2, 2, 2, 2, 2, 0, 0, 0, 1, 1])
    mel = np.array([0.9, 0.8, 0.6, 0.3, 0.1, 0.7, 0.2, 0.05, 0.5, 0.01])
    p = np.stack([1 - mel, np.zeros(10), mel], axis=1)
    op = ev.operating_point(y, p, 2, target_sensitivity=0.8)
    assert op["threshold"] == 0.3  # 4 of 5 melanomas at >= 0.3
    assert op["sensitivity"] == 0.8
    assert op["specificity"] == pytest.approx(3 / 5)  # 0.7 and 0.5 are flagged
    full = ev.operating_point(y, p, 2, target_sensitivity=1.0)
    assert full["threshold"] == 0.1 and full["sensitivity"] == 1.0
    assert ev.operating_point(np.zeros(3, int), np.zeros((3, 3)), 2)["threshold"] is None
    with pytest.raises(ValueError):
        ev.operating_point(y, p, 2, target_sensitivity=0)


def test_reliability_bins_cover_all_images():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=100)
    y = rng.integers(0, 3, 100)
    bins = ev.reliability_bins(y, p, n_bins=10)
    assert sum(b["count"] for b in bins) == 100 and len(bins) == 10


def test_the_fast_confusion_matrix_equals_sklearns_with_weights():
    from sklearn.metrics import confusion_matrix

    from dermaclass.evaluate.metrics import _confusion

    rng = np.random.default_rng(0)
    y, pred, w = rng.integers(0, 5, 300), rng.integers(0, 5, 300), rng.poisson(1.0, 300).astype(float)
    assert np.allclose(_confusion(y, pred, 5, w), confusion_matrix(y, pred, labels=range(5), sample_weight=w))


def test_prior_shift_takes_the_smallest_tau_that_reaches_the_target():
    margins = np.arange(10) / 10 + 0.05  # by how much class 0 beats each nevus (class 1): 0.05 ... 0.95
    z = np.stack([margins, np.zeros(10)], axis=1)
    y = np.ones(10, int)
    log_prior = np.array([-1.0, 0.0])  # tau * log_prior lifts the nevus by tau against class 0
    s = ev.prior_shift(z, y, log_prior, 1, target_sensitivity=0.8)
    assert s == {"tau": 0.8, "sensitivity": 0.8, "sensitivity_before": 0.0, "reached": True}
    assert ev.prior_shift(z, y, log_prior, 1, target_sensitivity=1.0)["tau"] == 1.0
    unreachable = ev.prior_shift(z + [0.2, 0], y, log_prior, 1, target_sensitivity=1.0)
    assert unreachable["tau"] == 1.0 and not unreachable["reached"] and unreachable["sensitivity"] == 0.8
    assert ev.prior_shift(z, np.zeros(10, int), log_prior, 1, target_sensitivity=0.8)["tau"] == 0.0  # no nevi
    with pytest.raises(ValueError):
        ev.prior_shift(z, y, log_prior, 1, target_sensitivity=0)


def test_tradeoff_curve_runs_from_all_flagged_to_none_flagged() -> None:
    from dermaclass.evaluate.metrics import tradeoff_curve

    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([[0.9, 0.1, 0], [0.6, 0.4, 0], [0.3, 0.7, 0], [0.5, 0.5, 0], [0.1, 0.9, 0], [0.8, 0.2, 0]])
    curve = tradeoff_curve(y, p, class_index=1)
    assert curve["sensitivity"][0] == 0 and curve["specificity"][0] == 1  # nothing flagged
    assert curve["sensitivity"][-1] == 1 and curve["specificity"][-1] == 0  # everything flagged
    assert all(np.diff(curve["sensitivity"]) >= 0) and all(np.diff(curve["specificity"]) <= 0)
    # At threshold 0.5 the three positives (0.7, 0.5, 0.9) are flagged and no negative (0.1, 0.4, 0.2).
    at = curve["threshold"].index(0.5)
    assert curve["sensitivity"][at] == 1 and curve["specificity"][at] == 1
    assert tradeoff_curve(np.array([1, 1]), p[:2], class_index=1) is None  # one side only
    assert (
        len(
            tradeoff_curve(np.arange(500) % 2, np.random.default_rng(0).random(500), class_index=1, points=41)[
                "sensitivity"
            ]
        )
        <= 41
    )

"""serving.combine: an ensemble's combination rules and the members' agreement."""

from __future__ import annotations

import numpy as np
import pytest

from dermaclass.evaluate.metrics import softmax
from dermaclass.serving.combine import agreement, combine, served


def test_combining_members_by_logits_or_by_probabilities_raw_or_calibrated() -> None:
    rng = np.random.default_rng(0)
    members = [rng.normal(size=(5, 4)) for _ in range(3)]
    assert np.allclose(combine(members), np.mean(members, axis=0))  # the default, as older bundles serve
    # the probability rule's output is a logit vector whose softmax is the members' mean softmax
    mean_prob = np.mean([softmax(m) for m in members], axis=0)
    assert np.allclose(softmax(combine(members, "mean of probabilities")), mean_prob)
    # a member whose logits exploded (1e5, as a collapsed head batch norm gave) outvotes the others
    # by logits, but weighs only 1/K by probabilities
    wild = [*members[:2], np.tile([3e5, 0.0, 0.0, -3e5], (5, 1))]
    assert (softmax(combine(wild))[:, 0] > 0.999).all()
    p = softmax(combine(wild, "mean of probabilities"))
    others = np.mean([softmax(m) for m in wild[:2]], axis=0)
    assert np.isfinite(p).all() and np.allclose(p[:, 0], 1 / 3 + 2 / 3 * others[:, 0])
    # calibrated, then averaged: the ensemble's calibration maps the served logits back to the
    # mean of the members' calibrated probabilities, exactly
    t, o = 1.7, np.array([0.3, -0.2, 0.0, 1.1])
    cal = combine(members, "mean of calibrated probabilities", temperature=t, offsets=o)
    assert np.allclose(softmax(cal + o, t), np.mean([softmax(m + o, t) for m in members], axis=0))
    q = softmax(combine(wild, "mean of calibrated probabilities", temperature=t, offsets=o) + o, t)
    assert np.allclose(q[:, 0], 1 / 3 + 2 / 3 * np.mean([softmax(m + o, t) for m in wild[:2]], axis=0)[:, 0])
    with pytest.raises(ValueError, match="unknown combination"):
        combine(members, "median")


def test_one_network_is_served_as_it_is_and_members_report_agreement() -> None:
    logits, features = np.ones((2, 3)), np.zeros((2, 5))
    assert served([(logits, features)], "mean of calibrated probabilities") == (logits, features)
    combined, none = served([(logits, features), (2 * logits, features)])
    assert none is None and np.allclose(combined, 1.5)  # members' features live in different spaces
    probs = [np.array([0.7, 0.2, 0.1]), np.array([0.3, 0.6, 0.1]), np.array([0.5, 0.4, 0.1])]
    a = agreement(probs, 0, ["mel", "nv", "bkl"])
    assert a["member_top"] == ["mel", "nv", "mel"] and a["disagree"] and a["share"] == pytest.approx(2 / 3)
    assert a["member_probability"] == pytest.approx([0.7, 0.3, 0.5])

"""How an ensemble's networks make one answer (``dermaclass train --members K``).

Deep ensembles (Lakshminarayanan et al. 2017) average the predictions of independently
trained networks; which average is a choice the bundle records (model.json
``ensemble.combine``, ``--ensemble-combine``): the mean of logits, the mean of probabilities,
or the mean of probabilities each calibrated by the ensemble's calibration. Each rule returns
logits that the ensemble's one calibration (``Predictor.calibrated``) turns into what the
rule serves, so temperature, prior shift, operating points and referral apply unchanged.
benchmarks/bench_ensemble.py measures the rules on the same member logits; docs/decisions.md
says why the mean of logits is the default. ``agreement`` reports how the members agree with
the served answer, which the app shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dermaclass.models import COMBINE_RULES


def combine(
    member_logits: Sequence[np.ndarray],
    rule: str = COMBINE_RULES["logits"],
    *,
    temperature: float = 1.0,
    offsets: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """The ensemble's logits from its members' (model.json ``ensemble.combine``), such that the
    ensemble's calibration (``Predictor.calibrated``: ``softmax((z + offsets) / temperature)``)
    of the result is what the rule serves.

    ``"mean of logits"``: softmax is shift-invariant, so this equals the mean of the members'
    log-probabilities, the geometric mean of their probabilities renormalised. One member's
    extreme logits (a head whose batch norm saw a unit that was almost never on, then meets an
    image that turns it on: logits of 1e5 were measured) outvote every other member.

    ``"mean of probabilities"``: the log of the arithmetic mean of the members' softmax
    (Lakshminarayanan et al. 2017), a logit vector whose softmax is that mean, so the
    ensemble's temperature and prior shift apply to it as to one network's logits; one member
    weighs at most 1/K, however extreme.

    ``"mean of calibrated probabilities"``: the arithmetic mean of the members' probabilities,
    each calibrated by ``temperature`` and ``offsets`` (what out-of-fold calibration fits: one
    member's logits per image), served as ``T * log(mean) - offsets`` so that the calibration
    maps it back to that mean exactly. Also at most 1/K per member. benchmarks/bench_ensemble.py
    measures all three (docs/decisions.md).
    """
    from scipy.special import log_softmax, logsumexp

    stacked = np.stack([np.asarray(lo, np.float64) for lo in member_logits])
    if rule == "mean of logits":
        return stacked.mean(axis=0)
    if rule == "mean of probabilities":
        return logsumexp(log_softmax(stacked, axis=-1), axis=0) - np.log(len(stacked))
    if rule == "mean of calibrated probabilities":
        shift = np.zeros(stacked.shape[-1]) if offsets is None else np.asarray(offsets, np.float64)
        mean = logsumexp(log_softmax((stacked + shift) / temperature, axis=-1), axis=0) - np.log(len(stacked))
        return temperature * mean - shift
    raise ValueError(f"unknown combination {rule!r}; choose one of {', '.join(COMBINE_RULES.values())}")


def served(
    outs: Sequence[tuple[np.ndarray, np.ndarray | None]],
    rule: str = COMBINE_RULES["logits"],
    *,
    temperature: float = 1.0,
    offsets: np.ndarray | Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, features) the bundle serves from its networks' outputs (``Predictor.member_outputs``):
    the one network's, or the members' ``combine``d logits (their features live in different spaces)."""
    if len(outs) == 1:
        return outs[0]
    return combine([lo for lo, _ in outs], rule, temperature=temperature, offsets=offsets), None


def agreement(member_probs: Sequence[np.ndarray], top: int, classes: Sequence[str]) -> dict[str, Any]:
    """How the networks of one image agree with the answer ``top``: each network's own top class,
    the share that agree, and each network's probability of ``top`` (with the bundle's calibration)."""
    tops = [classes[int(np.argmax(p))] for p in member_probs]
    share = sum(t == classes[top] for t in tops) / len(tops)
    return {
        "member_top": tops,
        "share": share,
        "disagree": share < 1,
        "member_probability": [float(p[top]) for p in member_probs],
    }

"""Logit-adjusted cross-entropy (Menon et al. 2021) against its definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from dermaclass.train.losses import LogitAdjustedLoss


def test_logit_adjusted_loss_is_cross_entropy_of_the_shifted_logits() -> None:
    torch.manual_seed(0)
    pred, targ = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])
    priors = [70, 20, 10]
    loss = LogitAdjustedLoss(priors, tau=1.0)
    shifted = pred + torch.log(torch.tensor([0.7, 0.2, 0.1]))
    assert loss(pred, targ).item() == pytest.approx(F.cross_entropy(shifted, targ).item(), rel=1e-6)
    assert LogitAdjustedLoss(priors, tau=0.0)(pred, targ).item() == pytest.approx(F.cross_entropy(pred, targ).item())
    # equal priors shift every logit alike: plain cross-entropy
    assert LogitAdjustedLoss([5, 5, 5])(pred, targ).item() == pytest.approx(
        F.cross_entropy(pred, targ).item(), rel=1e-6
    )
    # a rare class's logit is pushed down in the loss, so the network must raise it: a larger loss for it
    rare = torch.tensor([2])
    assert loss(torch.zeros(1, 3), rare).item() > F.cross_entropy(torch.zeros(1, 3), rare).item()
    assert torch.equal(loss.decodes(pred), pred.argmax(-1))


def test_bad_priors_are_refused_and_an_absent_class_stays_finite() -> None:
    with pytest.raises(ValueError, match="priors"):
        LogitAdjustedLoss([1.0])
    with pytest.raises(ValueError, match="priors"):
        LogitAdjustedLoss([1.0, -2.0])
    loss = LogitAdjustedLoss([10, 0, 5])
    assert np.isfinite(loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])).item())


def test_training_with_logit_adjustment(colour_data: Path, tmp_path: Path) -> None:
    import json

    from dermaclass.train import prepare_data, train

    cfg = tiny_config(tmp_path, epochs=1, lr=1e-3, imbalance="logit-adjusted")
    train(cfg, prepare_data(cfg, colour_data), tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["config"]["imbalance"] == "logit-adjusted" and meta["metrics_valid"]["n"] > 0

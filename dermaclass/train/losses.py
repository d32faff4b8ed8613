"""Losses for imbalanced classes beyond fastai's: logit adjustment (Menon et al., "Long-tail
learning via logit adjustment", ICLR 2021), the loss form of balanced softmax (Ren et al.
2020).

HAM10000 is 67 % nevi and 1 % dermatofibroma. The default answer is a balanced sampler, which
shows rare classes many times over; logit adjustment instead trains on the data as it comes
and adds ``tau * log(prior)`` to the logits inside the loss only, so the network learns
class-balanced scores without repeated images. Prediction uses the raw logits, so nothing
changes at inference. It is the "loss and decisions" lever of the external-set screens (``--imbalance
logit-adjusted``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy of ``logits + tau * log(prior)`` (the prior: training class frequencies)."""

    def __init__(self, priors: Sequence[float], *, tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        p = np.asarray(priors, dtype=np.float64)
        if p.ndim != 1 or len(p) < 2 or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"class priors must be non-negative frequencies, got {list(priors)}")
        p = np.clip(p / p.sum(), 1e-8, None)  # a class absent from a subset keeps a finite offset
        self.register_buffer("log_prior", torch.tensor(np.log(p), dtype=torch.float32))
        self.tau, self.label_smoothing = float(tau), float(label_smoothing)

    def forward(self, pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
        adjusted = pred + self.tau * self.log_prior.to(pred.dtype)
        return F.cross_entropy(adjusted, targ.view(-1).long(), label_smoothing=self.label_smoothing)

    # fastai's loss interface: what get_preds / predict apply to the raw outputs
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, dim=-1)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)

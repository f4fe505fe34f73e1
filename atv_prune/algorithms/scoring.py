"""Weight importance scores and Wanda's input statistic: pure tensor functions, computed in fp32.

Wanda (Sun et al., ICLR 2024) scores a weight by ``|W_ij| * sqrt(s_j)`` where ``s_j`` is the
mean over calibration samples of the summed squared input of feature ``j`` over the tokens of
the calibration pool. Magnitude scores by ``|W_ij|`` alone.
"""

from __future__ import annotations

import torch


def squared_input_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-feature sum of squares over all leading dims of ``x`` (tokens), in fp32."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return flat.pow(2).sum(dim=0)


def weighted_rows(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Token rows scaled by ``sqrt(weight)`` each, so that squared statistics become
    token-weighted (TAMP's attention-weighted norms); unchanged when ``weights`` is None."""
    return rows if weights is None else rows.float() * weights.sqrt().unsqueeze(1)


class SquaredInputs:
    """Wanda's statistic of one input group: ``s = (1/N) Σ_samples Σ_tokens w_t x_t²`` per feature."""

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.total = torch.zeros(features, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add one sample's pool rows ``(tokens, features)`` (optionally token-weighted)."""
        self.total += squared_input_sum(weighted_rows(rows, weights))

    def finish(self, samples: int) -> torch.Tensor:
        """The mean over ``samples`` calibration samples."""
        return self.total * (1.0 / samples)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in fp32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * sqrt(s_j)`` with ``s`` the per-input-feature mean squared-sum (length in_features)."""
    if input_sq_mean.shape != (weight.shape[1],):
        raise ValueError(f"statistics of shape {tuple(input_sq_mean.shape)} do not match weight {tuple(weight.shape)}")
    return weight.detach().float().abs() * input_sq_mean.to(weight.device, torch.float32).sqrt().unsqueeze(0)

"""Structured pruning math: statistics, importance of whole heads and channels, which to remove,
and FLAP's bias compensation. Pure tensor functions, computed in fp32 (moments in fp64).

A structure is scored on the input columns of the linear that reads it: an attention head (or,
under grouped-query attention, a key/value group of heads) on ``o_proj``'s columns of that head,
an MLP channel on ``down_proj``'s column. A unit's score is the sum of its columns' scores.

* Structured Wanda (Wanda-sp, as FLAP's paper extends Wanda): column ``j`` scores
  ``Σ_i |W_ij| · sqrt(s_j)``, ``s`` Wanda's mean squared input.
* FLAP's fluctuation metric (An et al., AAAI 2024): column ``j`` scores ``Var(x_j) · ||W_:,j||²``,
  the variance of input feature ``j`` over the pool's tokens (a head sums its columns' squared
  scores, as FLAP's reference code does); removing columns ``R`` is compensated by adding
  ``W_:,R · mean(x_R)`` to the output bias.
"""

from __future__ import annotations

import math

import torch


class InputMoments:
    """FLAP's statistic of one input group: the (token-weighted) mean and variance of every input
    feature over all pool tokens of all samples, as a ``(2, features)`` tensor ``[mean, variance]``.

    Sums are kept in fp64 so that ``E[x²] − E[x]²`` does not cancel. The variance is the
    population one (divided by the total token weight): FLAP's ``N − 1`` scales every column of a
    linear alike and so chooses the same structures.
    """

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.weight = torch.zeros((), dtype=torch.float64, device=device)
        self.first = torch.zeros(features, dtype=torch.float64, device=device)
        self.second = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add one sample's pool rows ``(tokens, features)`` (optionally token-weighted)."""
        rows64 = rows.to(self.first.device, torch.float64)
        w = (torch.ones(rows64.shape[0], dtype=torch.float64, device=rows64.device) if weights is None
             else weights.to(rows64.device, torch.float64))
        self.weight += w.sum()
        self.first += w @ rows64
        self.second += w @ rows64.pow(2)

    def finish(self, samples: int) -> torch.Tensor:
        """``[mean, variance]`` over every token added (``samples`` is not needed: the moments are
        per token, not per sample)."""
        total = self.weight.clamp_min(torch.finfo(torch.float64).tiny)
        mean = self.first / total
        variance = (self.second / total - mean.pow(2)).clamp_min(0)
        return torch.stack([mean, variance]).float()


def wanda_columns(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: ``Σ_i |W_ij| · sqrt(s_j)`` for every input column ``j`` of ``weight``."""
    if input_sq_mean.shape != (weight.shape[1],):
        raise ValueError(f"statistics of shape {tuple(input_sq_mean.shape)} do not match weight {tuple(weight.shape)}")
    return weight.detach().float().abs().sum(dim=0) * input_sq_mean.to(weight.device, torch.float32).sqrt()


def fluctuation_columns(weight: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """FLAP: ``Var(x_j) · ||W_:,j||²`` for every input column ``j`` (``moments`` from :class:`InputMoments`)."""
    if moments.shape != (2, weight.shape[1]):
        raise ValueError(f"moments of shape {tuple(moments.shape)} do not match weight {tuple(weight.shape)}")
    return moments[1].to(weight.device, torch.float32) * weight.detach().float().pow(2).sum(dim=0)


def mean_shift(weight: torch.Tensor, moments: torch.Tensor, removed_columns: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: ``W_:,R · mean(x_R)``, what the removed input columns ``R``
    contributed to the output on average (fp32, one value per output row)."""
    columns = removed_columns.to(weight.device)
    mean = moments[0].to(weight.device, torch.float32)[columns]
    return weight.detach().float()[:, columns] @ mean


def removal_count(units: int, ratio: float) -> int:
    """Units removed from ``units`` at ``ratio``: ``floor(ratio · units)`` (the same in every block;
    never more than asked for). The tiny epsilon keeps e.g. 0.29 · 100 from flooring to 28."""
    return math.floor(ratio * units + 1e-9)


def unit_scores(column_scores: torch.Tensor, unit_columns: int) -> torch.Tensor:
    """Sum of the scores of each unit's ``unit_columns`` contiguous columns."""
    if column_scores.numel() % unit_columns:
        raise ValueError(f"{column_scores.numel()} columns do not split into units of {unit_columns}")
    return column_scores.reshape(-1, unit_columns).sum(dim=1)


def lowest_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` lowest-scoring units; ties go to the lower index, so the
    choice is deterministic."""
    order = torch.argsort(scores.float().cpu(), stable=True)
    return order[:count].sort().values


def unit_columns_of(units: torch.Tensor, unit_columns: int) -> torch.Tensor:
    """Column indices covered by ``units`` (each ``unit_columns`` wide, contiguous, in order)."""
    offsets = torch.arange(unit_columns)
    return (units.unsqueeze(1) * unit_columns + offsets).reshape(-1)


def kept_units(units: int, removed: torch.Tensor) -> torch.Tensor:
    """The indices in ``range(units)`` not in ``removed``, ascending."""
    keep = torch.ones(units, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().squeeze(1)

"""Pruning masks from scores: pure tensor functions. ``True`` marks a weight to prune.

Weights are chosen by selection, not by sorting: the ``k``-th lowest score of a row is found
with ``kthvalue`` and every score below it is pruned, then as many of the scores equal to it as
are still needed, lowest position first. That is the order a stable sort gives, so a mask is a
deterministic function of its scores and equal to the mask of a stable sort, ties included.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def prune_count(sparsity: float, size: int) -> int:
    """``floor(sparsity * size)``, robust to binary rounding (0.57 * 100 is 56.999...)."""
    return math.floor(sparsity * size + 1e-9)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lowest scores of every row of a 2-D tensor; among equal scores the one at
    the lower position is taken first (a stable sort's order)."""
    rows, cols = scores.shape
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if count >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, count, dim=1, keepdim=True).values
    mask = scores < threshold
    ties = scores == threshold
    needed = count - mask.sum(dim=1, keepdim=True)  # >= 1: the threshold itself is among the lowest
    crowded = (ties.sum(dim=1, keepdim=True) > needed).squeeze(1).nonzero().squeeze(1)
    if crowded.numel():  # more equal scores than places: the first ones by position
        first = ties[crowded] & (ties[crowded].cumsum(dim=1) <= needed[crowded])
        ties[crowded] = first
    return mask | ties


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly ``floor(sparsity * in_features)`` lowest-scored weights in every row."""
    return lowest_mask(scores, prune_count(sparsity, scores.shape[1]))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest-scored weights in every row and every group of ``m`` consecutive inputs.

    Each weight's rank in its group (how many scores are lower, plus how many equal ones come
    before it) is counted with ``m`` comparisons of the whole tensor; ranks below ``n`` are pruned.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}: choose another M")
    groups = scores.reshape(rows, cols // m, m)
    later = torch.arange(m, device=scores.device)
    rank = torch.zeros(groups.shape, dtype=torch.int16, device=scores.device)
    for j in range(m):
        other = groups[:, :, j : j + 1]
        rank += (other < groups) | ((other == groups) & (later > j))
    return (rank < n).reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None) -> torch.Tensor:
    """Unstructured mask when ``sparsity`` is given, else the N:M mask for ``pattern``."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if sparsity is None:
        raise ValueError("either sparsity or pattern is required")
    return unstructured_mask(scores, sparsity)

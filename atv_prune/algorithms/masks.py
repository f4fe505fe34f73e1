"""Pruning masks from scores: pure tensor functions. ``True`` marks a weight to prune.

Ties are broken by position (stable sort), so a mask is a deterministic function of its scores.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def prune_count(sparsity: float, size: int) -> int:
    """``floor(sparsity * size)``, robust to binary rounding (0.57 * 100 is 56.999...)."""
    return math.floor(sparsity * size + 1e-9)


def check_pattern(pattern: tuple[int, int], in_features: int, where: str = "a weight") -> None:
    """Refuse an N:M pattern whose group size M does not divide ``in_features``."""
    n, m = pattern
    if in_features % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, but {where} has {in_features}: "
                          "choose another M")


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly ``floor(sparsity * in_features)`` lowest-scored weights in every row."""
    n_prune = prune_count(sparsity, scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_prune == 0:
        return mask
    order = torch.sort(scores, dim=1, stable=True).indices
    mask.scatter_(1, order[:, :n_prune], True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest-scored weights in every row and every group of ``m`` consecutive inputs."""
    rows, cols = scores.shape
    check_pattern((n, m), cols)
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, :n], True)
    return mask.reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None) -> torch.Tensor:
    """Unstructured mask when ``sparsity`` is given, else the N:M mask for ``pattern``."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if sparsity is None:
        raise ValueError("either sparsity or pattern is required")
    return unstructured_mask(scores, sparsity)

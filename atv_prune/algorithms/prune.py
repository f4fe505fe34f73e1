"""How each method prunes one weight from its statistic: pure functions ``(weight, statistic,
sparsity, pattern) -> pruned weight`` (``sparsity`` for unstructured targets, ``pattern`` ``(N, M)``
for N:M), registered by name in :mod:`.specs`."""

from __future__ import annotations

import torch

from .masks import make_mask
from .scoring import magnitude_scores, wanda_scores
from .sparsegpt import sparsegpt_prune


def magnitude_prune(weight: torch.Tensor, statistic: None, sparsity: float | None,
                    pattern: tuple[int, int] | None) -> torch.Tensor:
    """Zero the lowest-|W| weights of every row (or N:M group)."""
    return weight.masked_fill(make_mask(magnitude_scores(weight), sparsity, pattern).to(weight.device), 0)


def wanda_prune(weight: torch.Tensor, statistic: torch.Tensor, sparsity: float | None,
                pattern: tuple[int, int] | None) -> torch.Tensor:
    """Zero the weights of lowest ``|W| * sqrt(s)`` (``statistic`` = s, the mean squared input)."""
    return weight.masked_fill(make_mask(wanda_scores(weight, statistic), sparsity, pattern).to(weight.device), 0)


def sparsegpt_prune_weight(weight: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor],
                           sparsity: float | None, pattern: tuple[int, int] | None) -> torch.Tensor:
    """SparseGPT's OBS update from ``(H, inverse Cholesky factor)`` of the weight's input group."""
    hessian, factor = prepared
    new_weight, _ = sparsegpt_prune(weight, hessian, sparsity, pattern, factor=factor)
    return new_weight.to(weight.dtype)

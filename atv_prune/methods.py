"""Pruning methods: a small registry of what each method accumulates and how it prunes a weight.

A method is declarative: the per-sample statistic it accumulates from the calibration pool's
token rows (nothing for data-free methods), how the sum over samples is normalised, and a pure
function that turns a weight and its statistic into the pruned weight. The engine does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .masks import make_mask
from .scoring import magnitude_scores, squared_input_sum, wanda_scores
from .sparsegpt import hessian_update, prepare_hessian, sparsegpt_prune

Target = tuple[float | None, tuple[int, int] | None]  # (sparsity, pattern)


def _magnitude(weight: torch.Tensor, statistic: torch.Tensor | None, sparsity, pattern) -> torch.Tensor:
    return weight.masked_fill(make_mask(magnitude_scores(weight), sparsity, pattern).to(weight.device), 0)


def _wanda(weight: torch.Tensor, statistic: torch.Tensor, sparsity, pattern) -> torch.Tensor:
    return weight.masked_fill(make_mask(wanda_scores(weight, statistic), sparsity, pattern).to(weight.device), 0)


def _sparsegpt(weight: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor], sparsity, pattern) -> torch.Tensor:
    hessian, factor = prepared
    new_weight, _ = sparsegpt_prune(weight, hessian, sparsity, pattern, factor=factor)
    return new_weight.to(weight.dtype)


@dataclass(frozen=True)
class Method:
    """How one pruning method uses calibration data."""

    name: str
    default_pool: str | None  # None: data-free
    prune_weight: Callable[[torch.Tensor, Any, float | None, tuple[int, int] | None], torch.Tensor]
    statistic: Callable[[torch.Tensor], torch.Tensor] | None = None  # token rows -> additive statistic
    prepare: Callable[[torch.Tensor], Any] | None = None  # per input group: summed statistic -> prune_weight's input
    scale: float = 1.0  # the summed statistic is multiplied by scale / n_samples
    plain_pools: bool = True  # whether mixed/text/visual pools are allowed
    allocation: str = "uniform"  # default per-matrix sparsity allocation (uniform or das)
    summary: str = ""


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _magnitude, summary="|W|, no calibration data"),
    "wanda": Method("wanda", "mixed", _wanda, squared_input_sum, summary="|W| * sqrt(mean sum x^2)"),
    "atv": Method("atv", "atv", _wanda, squared_input_sum, plain_pools=False,
                  summary="Wanda scores on all text tokens plus drift-selected visual tokens"),
    "tamp": Method("tamp", "amia", _wanda, squared_input_sum, allocation="das",
                   summary="TAMP: Wanda scores on AMIA-selected, attention-weighted tokens; DAS sparsity"),
    "sparsegpt": Method("sparsegpt", "mixed", _sparsegpt, hessian_update, prepare_hessian, scale=2.0,
                        summary="OBS update with H = (2/N) sum x x^T, any pool"),
}

"""Calibration pools: which tokens of a sample feed a block's statistics.

Each pool is a small pure function of one sample's view of one block (its modality mask,
the block's input and dense output hidden states) returning a :class:`PoolChoice`:

* ``fixed`` tokens join the statistics at once;
* ``ranked`` visual candidates (most salient first) join later: once every sample has been
  seen, the block-level budget rule of ATV-Pruning decides how long a prefix of each sample's
  ranking is used. Ranking orders are prefix-consistent, so one forward per sample suffices.

Add a pool by writing a function and registering it in :data:`POOLS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SampleView:
    """One sample as seen by one block (batch dimension removed)."""

    visual: torch.Tensor  # bool (seq,)
    hidden_in: torch.Tensor  # (seq, d) block input
    hidden_out: torch.Tensor  # (seq, d) dense block output
    generator: torch.Generator  # seeded per (seed, block, sample), on the CPU


@dataclass(frozen=True)
class PoolParams:
    alpha: float = 1.0
    visual_ratio: float = 0.1


@dataclass(frozen=True)
class PoolChoice:
    """Token positions for the statistics of one sample in one block."""

    fixed: torch.Tensor  # long positions used at once
    n_text: int
    n_visual: int
    ranked: torch.Tensor | None = None  # long positions of visual candidates, best first
    saliency_sum: float = 0.0  # summed saliency over the sample's visual tokens (block mean)
    visual_selected: int = 0  # visual tokens in ``fixed``

    @property
    def candidate_cap(self) -> int:
        """Most ranked tokens any budget can take: K_j <= min(n_visual, n_text)."""
        return 0 if self.ranked is None else min(len(self.ranked), self.n_text)


def visual_drift(view: SampleView) -> torch.Tensor:
    """``1 - cos(h_in, h_out)`` of each visual token, in fp32 (length n_visual)."""
    h_in = view.hidden_in[view.visual].float()
    h_out = view.hidden_out[view.visual].float()
    return 1.0 - F.cosine_similarity(h_in, h_out, dim=-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().squeeze(1)


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` from largest to smallest, ties by position."""
    return torch.sort(scores, descending=True, stable=True).indices


def mixed_pool(view: SampleView, params: PoolParams) -> PoolChoice:
    """All tokens (Wanda's default on VLMs)."""
    n_vis = int(view.visual.sum())
    return PoolChoice(torch.arange(view.visual.numel(), device=view.visual.device),
                      n_text=view.visual.numel() - n_vis, n_visual=n_vis, visual_selected=n_vis)


def text_pool(view: SampleView, params: PoolParams) -> PoolChoice:
    """Text tokens only."""
    n_vis = int(view.visual.sum())
    return PoolChoice(_positions(~view.visual), n_text=view.visual.numel() - n_vis, n_visual=n_vis)


def visual_pool(view: SampleView, params: PoolParams) -> PoolChoice:
    """Visual tokens only."""
    n_vis = int(view.visual.sum())
    return PoolChoice(_positions(view.visual), n_text=view.visual.numel() - n_vis, n_visual=n_vis,
                      visual_selected=n_vis)


def atv_pool(view: SampleView, params: PoolParams) -> PoolChoice:
    """ATV: all text tokens plus the visual tokens of largest drift, adaptive budget."""
    drift = visual_drift(view)
    visual_positions = _positions(view.visual)
    return PoolChoice(_positions(~view.visual), n_text=int((~view.visual).sum()), n_visual=len(visual_positions),
                      ranked=visual_positions[_descending(drift)], saliency_sum=float(drift.sum()))


def random_pool(view: SampleView, params: PoolParams) -> PoolChoice:
    """Ablation: ATV's adaptive budget, visual tokens drawn at random (seeded)."""
    drift = visual_drift(view)
    visual_positions = _positions(view.visual)
    order = torch.randperm(len(visual_positions), generator=view.generator).to(visual_positions.device)
    return PoolChoice(_positions(~view.visual), n_text=int((~view.visual).sum()), n_visual=len(visual_positions),
                      ranked=visual_positions[order], saliency_sum=float(drift.sum()))


def drift_fixed_pool(view: SampleView, params: PoolParams) -> PoolChoice:
    """Ablation: all text tokens plus the top ``visual_ratio`` of visual tokens by drift (no adaptivity)."""
    drift = visual_drift(view)
    visual_positions = _positions(view.visual)
    k = round(params.visual_ratio * len(visual_positions))
    chosen = visual_positions[_descending(drift)[:k]]
    text = _positions(~view.visual)
    return PoolChoice(torch.cat([text, chosen]), n_text=len(text), n_visual=len(visual_positions),
                      saliency_sum=float(drift.sum()), visual_selected=k)


POOLS: dict[str, Callable[[SampleView, PoolParams], PoolChoice]] = {
    "mixed": mixed_pool,
    "text": text_pool,
    "visual": visual_pool,
    "atv": atv_pool,
    "random": random_pool,
    "drift-fixed": drift_fixed_pool,
}


def adaptive_budget(n_visual: int, n_text: int, block_saliency: float, alpha: float) -> int:
    """ATV's per-sample visual budget ``K_j = min(n_vis, round(min(1, alpha * s_bar) * n_text))``."""
    return min(n_visual, round(min(1.0, alpha * block_saliency) * n_text))

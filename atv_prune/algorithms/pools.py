"""Calibration pools: which tokens of a sample feed a block's statistics.

Each pool is a small pure function of one sample's view of one block (its modality mask, the
block's input and dense output hidden states, and, when the pool asks for it, the attention each
token received) returning a :class:`PoolChoice`:

* ``fixed`` tokens join the statistics at once;
* ``ranked`` visual candidates (best first) join later, up to a per-sample budget decided once
  every sample has been seen: ATV's adaptive budget (from the block's mean visual saliency) or a
  fixed fraction of the sample's visual tokens. Rankings are prefix-consistent, so one forward
  per sample suffices.

A pool is registered by name (:func:`~.specs.register_pool`) as a :class:`~.specs.Pool`: the
function, its budget rule (:class:`~.budget.Budget`), and whether it needs attention
probabilities. Adding a pool is one function and one registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SampleView:
    """One sample as seen by one block (batch dimension removed)."""

    visual: torch.Tensor  # bool (seq,)
    hidden_in: torch.Tensor  # (seq, d) block input
    hidden_out: torch.Tensor  # (seq, d) dense block output
    generator: torch.Generator  # seeded per (seed, block, sample), on the CPU
    attention_from_text: torch.Tensor | None = None  # (seq,) mean attention received from text queries
    attention_from_last: torch.Tensor | None = None  # (seq,) attention received from the last query
    limit: int | None = None  # ranked candidates beyond this are never used (None: rank all)
    drift: torch.Tensor | None = None  # visual drift when the caller computed it already


@dataclass(frozen=True)
class PoolChoice:
    """Token positions for the statistics of one sample in one block."""

    fixed: torch.Tensor  # long positions used at once
    n_text: int
    n_visual: int
    ranked: torch.Tensor | None = None  # long positions of visual candidates, best first
    saliency_sum: float = 0.0  # summed saliency over the sample's visual tokens (for the block mean)
    visual_selected: int = 0  # visual tokens in ``fixed``
    weights: torch.Tensor | None = None  # per-token weights of ``fixed`` (token-weighted statistics)


PoolFunction = Callable[[SampleView], PoolChoice]


def drift_of(hidden_in: torch.Tensor, hidden_out: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``1 - cos(h_in, h_out)`` of each visual token, in fp32 (length n_visual)."""
    return 1.0 - F.cosine_similarity(hidden_in[visual].float(), hidden_out[visual].float(), dim=-1)


def visual_drift(view: SampleView) -> torch.Tensor:
    """The view's visual drift (computed once per sample by the engine, else here)."""
    return view.drift if view.drift is not None else drift_of(view.hidden_in, view.hidden_out, view.visual)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().squeeze(1)


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` from largest to smallest, ties by position."""
    return torch.sort(scores, descending=True, stable=True).indices


def _counts(view: SampleView) -> tuple[int, int]:
    n_visual = int(view.visual.sum())
    return view.visual.numel() - n_visual, n_visual


def mixed_pool(view: SampleView) -> PoolChoice:
    """All tokens (Wanda's default on VLMs)."""
    n_text, n_visual = _counts(view)
    return PoolChoice(torch.arange(view.visual.numel(), device=view.visual.device), n_text, n_visual,
                      visual_selected=n_visual)


def text_pool(view: SampleView) -> PoolChoice:
    """Text tokens only."""
    return PoolChoice(_positions(~view.visual), *_counts(view))


def visual_pool(view: SampleView) -> PoolChoice:
    """Visual tokens only."""
    n_text, n_visual = _counts(view)
    return PoolChoice(_positions(view.visual), n_text, n_visual, visual_selected=n_visual)


def _text_plus_ranked(view: SampleView, saliency: torch.Tensor, order: torch.Tensor) -> PoolChoice:
    """All text tokens fixed; visual tokens ranked by ``order`` (indices into the visual tokens)."""
    n_text, n_visual = _counts(view)
    return PoolChoice(_positions(~view.visual), n_text, n_visual, ranked=_positions(view.visual)[order],
                      saliency_sum=float(saliency.sum()))


def drift_pool(view: SampleView) -> PoolChoice:
    """ATV: visual tokens ranked by drift ``1 - cos(h_in, h_out)``."""
    drift = visual_drift(view)
    return _text_plus_ranked(view, drift, _descending(drift))


def random_pool(view: SampleView) -> PoolChoice:
    """Ablation: visual tokens in a seeded random order; the drift still sets the adaptive budget."""
    drift = visual_drift(view)
    order = torch.randperm(drift.numel(), generator=view.generator).to(drift.device)
    return _text_plus_ranked(view, drift, order)


def attention_pool(view: SampleView) -> PoolChoice:
    """ABS: visual tokens ranked by the mean attention they receive from the text tokens."""
    if view.attention_from_text is None:
        raise RuntimeError("the attention-based pool needs the block's attention probabilities")
    received = view.attention_from_text[view.visual].float()
    return _text_plus_ranked(view, received, _descending(received))


def diverse_order(features: torch.Tensor, first: int, limit: int | None = None) -> torch.Tensor:
    """Max-min (farthest-point) order of rows under cosine distance, starting at ``first``; only the
    first ``limit`` entries are computed (a sequential step each).

    Prefix-consistent: the first K entries are the greedy max-min diverse subset of size K.
    """
    unit = F.normalize(features.float(), dim=-1)
    n = unit.shape[0] if limit is None else min(limit, unit.shape[0])
    order = torch.empty(n, dtype=torch.long, device=unit.device)
    chosen = torch.zeros(unit.shape[0], dtype=torch.bool, device=unit.device)
    nearest = torch.full((unit.shape[0],), float("inf"), device=unit.device)
    current = first
    for step in range(n):
        order[step] = current
        chosen[current] = True
        nearest = torch.minimum(nearest, 1.0 - unit @ unit[current])
        if step + 1 < n:
            current = int(torch.where(chosen, float("-inf"), nearest).argmax())
    return order


def diversity_pool(view: SampleView) -> PoolChoice:
    """DBS: the mean cosine distance of each visual token to the others (its input states) sets the
    budget; tokens are taken in max-min diverse order starting from the most diverse one."""
    features = view.hidden_in[view.visual].float()
    n_visual = features.shape[0]
    unit = F.normalize(features, dim=-1)
    distance = 1.0 - unit @ unit.T
    diversity = distance.sum(dim=1) / max(1, n_visual - 1)
    first = int(_descending(diversity)[0]) if n_visual else 0
    limit = n_visual if view.limit is None else min(n_visual, view.limit)
    order = diverse_order(features, first, limit) if limit else torch.empty(0, dtype=torch.long,
                                                                             device=features.device)
    return _text_plus_ranked(view, diversity, order)


def amia_selection(features: torch.Tensor, attention: torch.Tensor, visual: torch.Tensor, neighbours: int = 3,
                   mmd_factor: float = 0.1, rounds: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """TAMP's attention- and diversity-guided selection (AMIA), vectorised.

    On unit-normalised features, ``D = 1 - cos``; each token's score is its attention plus its
    3 nearest neighbours' attention weighted by ``exp(-D)``. Tokens are taken greedily by score,
    each pick lowering its neighbours' scores by ``exp(-0.2 D) * max(score, 0)``, until the RBF
    (sigma = 1) MMD^2 between all tokens and the picked ones falls below
    ``mmd_factor * sqrt(1 - rho)``, rho the mean of the visual-visual, text-text and visual-text
    cosine similarities. Picks are made ``ceil(n / rounds)`` at a time (at most ``rounds``
    iterations per sample, no per-token loop); within a round the MMD of every prefix is computed
    from cumulative sums, so the selection stops at exactly the first token that meets the
    criterion (neighbour scores are lowered once per round). Returns the picked positions and their
    weights (attention, normalised to mean 1).
    """
    unit = F.normalize(features.float(), dim=-1)
    n = unit.shape[0]
    cosine = unit @ unit.T
    distance = 1.0 - cosine
    k = min(neighbours, n - 1)
    nearest_distance, nearest = torch.topk(distance + torch.eye(n, device=unit.device) * 4.0, k, largest=False)
    a = attention.float()
    score = a + (torch.exp(-nearest_distance) * a[nearest]).sum(dim=1)
    groups = [cosine[m][:, m2] for m, m2 in ((visual, visual), (~visual, ~visual), (visual, ~visual))
              if m.any() and m2.any()]
    rho = float(torch.stack([g.mean() for g in groups]).mean())
    threshold = mmd_factor * max(0.0, 1.0 - rho) ** 0.5
    kernel = torch.exp(cosine - 1.0)  # RBF with sigma = 1 on unit vectors: exp(-|x - y|^2 / 2)
    kernel_mean, to_all = kernel.mean(), kernel.mean(dim=0)
    chosen = torch.zeros(n, dtype=torch.bool, device=unit.device)
    to_chosen = torch.zeros(n, device=unit.device)  # sum of the kernel to the chosen tokens
    pair_sum, all_sum, size = torch.zeros((), device=unit.device), torch.zeros((), device=unit.device), 0
    step = -(-n // rounds)
    while not chosen.all():
        picks = torch.topk(score.masked_fill(chosen, float("-inf")), min(step, int((~chosen).sum()))).indices
        # MMD^2 after each prefix of this round's picks, to stop exactly where it first drops below
        within = kernel[picks][:, picks].cumsum(0).cumsum(1).diagonal()
        pairs = pair_sum + 2 * to_chosen[picks].cumsum(0) + within
        alls = all_sum + to_all[picks].cumsum(0)
        sizes = size + torch.arange(1, len(picks) + 1, device=unit.device)
        below = (kernel_mean + pairs / sizes ** 2 - 2 * alls / sizes < threshold).nonzero()
        take = int(below[0]) + 1 if len(below) else len(picks)
        picks = picks[:take]
        pair_sum, all_sum, size = pairs[take - 1], alls[take - 1], size + take
        chosen[picks] = True
        to_chosen += kernel[:, picks].sum(dim=1)
        lowered = torch.exp(-0.2 * nearest_distance[picks]) * score[picks].clamp(min=0).unsqueeze(1)
        score = score.index_add(0, nearest[picks].flatten(), -lowered.flatten())
        if len(below):
            break
    positions = chosen.nonzero().squeeze(1)
    weights = a[positions]
    return positions, weights / weights.mean().clamp(min=1e-12)


def amia_pool(view: SampleView) -> PoolChoice:
    """TAMP (AMIA): tokens of either modality chosen by last-token attention and output diversity,
    weighted by their attention."""
    if view.attention_from_last is None:
        raise RuntimeError("the AMIA pool needs the block's attention probabilities")
    positions, weights = amia_selection(view.hidden_out, view.attention_from_last, view.visual)
    n_text, n_visual = _counts(view)
    return PoolChoice(positions, n_text, n_visual, visual_selected=int(view.visual[positions].sum()),
                      weights=weights)

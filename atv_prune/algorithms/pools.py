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


def _attention_from_text(view: SampleView) -> torch.Tensor:
    if view.attention_from_text is None:
        raise RuntimeError("the attention-based pool needs the block's attention probabilities")
    return view.attention_from_text[view.visual].float()


def attention_pool(view: SampleView) -> PoolChoice:
    """ABS (the paper's formula): visual tokens ranked by the mean attention they receive from the
    text tokens, which is also their saliency. A probability over the whole sequence, it shrinks
    as sequences grow (about 1/n), and so does the adaptive budget."""
    received = _attention_from_text(view)
    return _text_plus_ranked(view, received, _descending(received))


def relative_attention_pool(view: SampleView) -> PoolChoice:
    """ABS, scale-free: the same ranking as :func:`attention_pool`, with saliency ``s * n`` (the
    attention received relative to uniform attention over the sample's n positions), so that the
    adaptive budget does not vanish on long sequences."""
    received = _attention_from_text(view)
    return _text_plus_ranked(view, received * view.visual.numel(), _descending(received))


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


def amia_density(cosine: torch.Tensor, visual: torch.Tensor) -> float:
    """TAMP's rho: the mean of three cosine similarities of the unit-normalised features, as the
    TAMP authors compute them: the positive entries above the diagonal among visual tokens, the
    same among text tokens, and every visual-text entry. A part with no entries (a modality with
    fewer than two tokens, or no positive pair) is left out (their code would take the mean of
    nothing, NaN, and never stop selecting)."""
    parts = []
    for rows in (visual, ~visual):
        within = cosine[rows][:, rows].triu(diagonal=1)
        positive = within[within > 0]
        if positive.numel():
            parts.append(float(positive.mean()))
    if visual.any() and (~visual).any():
        parts.append(float(cosine[visual][:, ~visual].mean()))
    return sum(parts) / len(parts) if parts else 0.0


def _first_collision(candidates: torch.Tensor, nearest: torch.Tensor) -> int:
    """How many of ``candidates`` (best first) sequential picking takes before one of them is a
    neighbour of an earlier candidate (whose pick would lower its score and may reorder the rest)."""
    among = (nearest[candidates].unsqueeze(2) == candidates.view(1, 1, -1)).any(dim=1)  # [i, j]: j near i
    lowered = among.triu(diagonal=1).any(dim=0)
    return int(lowered.nonzero()[0]) if lowered.any() else len(candidates)


def _lower_in_order(score: torch.Tensor, targets: torch.Tensor, amounts: torch.Tensor) -> torch.Tensor:
    """``score`` with ``amounts`` subtracted at ``targets`` one after another, as a loop would: a
    target met k times is lowered in k passes over distinct indices (deterministic on any device)."""
    earlier = (targets.unsqueeze(0) == targets.unsqueeze(1)).tril(diagonal=-1).sum(dim=1)
    for occurrence in range(int(earlier.max()) + 1 if len(targets) else 0):
        at = earlier == occurrence
        score[targets[at]] = score[targets[at]] - amounts[at]
    return score


def amia_selection(features: torch.Tensor, attention: torch.Tensor, visual: torch.Tensor, neighbours: int = 3,
                   mmd_factor: float = 0.1, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """TAMP's attention- and diversity-guided selection (AMIA), exactly as the TAMP authors' greedy
    loop picks, in vectorised steps.

    On unit-normalised features, ``D = 1 - cos``; each token's score is its attention plus its
    3 nearest neighbours' (self excluded) attention weighted by ``exp(-D)``. The highest-scored
    token is picked (ties: the lowest position) and lowers its neighbours' scores by
    ``exp(-0.2 D) * max(score, 0)``; picking stops at the first token after which the RBF
    (sigma = 1) MMD^2 between all tokens and the picked ones falls below
    ``mmd_factor * sqrt(1 - rho)`` (rho: :func:`amia_density`).

    A pick changes only its neighbours' scores, so the best-scored candidates are taken together
    up to the first one that an earlier candidate of the step neighbours (at most ``batch`` a
    step): the same picks, in the same order, as one at a time. The MMD of every prefix comes from
    cumulative sums, so the stop is at exactly the token where the loop would stop. Returns the
    picked positions (ascending) and their weights (attention, normalised to mean 1).
    """
    unit = F.normalize(features.float(), dim=-1)
    n = unit.shape[0]
    cosine = unit @ unit.T
    distance = 1.0 - cosine
    k = min(neighbours, n - 1)
    nearest_distance, nearest = torch.topk(distance + torch.eye(n, device=unit.device) * 4.0, k, largest=False)
    a = attention.float()
    score = a + (torch.exp(-nearest_distance) * a[nearest]).sum(dim=1)
    threshold = mmd_factor * max(0.0, 1.0 - amia_density(cosine, visual)) ** 0.5
    squared = (unit * unit).sum(dim=1)
    kernel = torch.exp(-(squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * cosine) / 2.0)  # RBF, sigma = 1
    wide = kernel.double()  # the MMD's running sums, in float64
    kernel_mean, to_all = wide.mean(), wide.mean(dim=0)
    chosen = torch.zeros(n, dtype=torch.bool, device=unit.device)
    to_chosen = torch.zeros(n, dtype=torch.float64, device=unit.device)  # kernel sums to the chosen tokens
    pair_sum, all_sum, size = torch.zeros((), dtype=torch.float64, device=unit.device), 0.0, 0
    while size < n:
        ranked = torch.sort(score.masked_fill(chosen, float("-inf")), descending=True, stable=True).indices
        candidates = ranked[: min(batch, n - size)]
        picks = candidates[: _first_collision(candidates, nearest)]
        # MMD^2 after each prefix of the picks, to stop exactly where it first drops below
        within = wide[picks][:, picks].cumsum(0).cumsum(1).diagonal()
        pairs = pair_sum + 2 * to_chosen[picks].cumsum(0) + within
        alls = all_sum + to_all[picks].cumsum(0)
        sizes = size + torch.arange(1, len(picks) + 1, device=unit.device)
        below = (kernel_mean + pairs / sizes**2 - 2 * alls / sizes < threshold).nonzero()
        take = int(below[0]) + 1 if len(below) else len(picks)
        picks = picks[:take]
        pair_sum, all_sum, size = pairs[take - 1], alls[take - 1], size + take
        lowered = torch.exp(-0.2 * nearest_distance[picks]) * score[picks].clamp(min=0).unsqueeze(1)
        score = _lower_in_order(score, nearest[picks].flatten(), lowered.flatten())
        chosen[picks] = True
        to_chosen += wide[:, picks].sum(dim=1)
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

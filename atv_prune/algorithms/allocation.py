"""Per-matrix sparsity allocation: uniform, or TAMP's diversity-aware sparsity (DAS).

DAS scores each weight matrix by the diversity of its outputs over the calibration tokens,
``(1 - s_v) + (1 - s_t) + (1 - s_vt)`` with ``s_v``, ``s_t`` the mean pairwise cosine similarity
among visual and among text outputs and ``s_vt`` between them: a matrix whose outputs are diverse
keeps more weights. Within a block, the kept weights are shared in proportion to that score so
that the block's overall sparsity stays at the target, each matrix pruned at most target + cap.
Every row of a matrix prunes the same whole number of weights, so the shares are rounded to
whole weights per row in a way that keeps the block's pruned total at the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import prune_count


def output_similarity_sums(output: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """One sample's ``[s_v, s_t, s_vt]`` (mean pairwise cosine similarity of the outputs of visual
    tokens, of text tokens, and between the two; self-pairs excluded), from unit-vector sums."""
    unit = F.normalize(output.reshape(-1, output.shape[-1]).float(), dim=-1)
    sums = [unit[visual].sum(0), unit[~visual].sum(0)]
    counts = [int(visual.sum()), int((~visual).sum())]
    values = []
    for total, count in zip(sums, counts):
        values.append(float((total @ total - count) / (count * (count - 1))) if count > 1 else 1.0)
    values.append(float(sums[0] @ sums[1] / (counts[0] * counts[1])) if all(counts) else 1.0)
    return torch.tensor(values)


def das_importance(similarity: torch.Tensor) -> float:
    """``(1 - s_v) + (1 - s_t) + (1 - s_vt)`` from the mean ``[s_v, s_t, s_vt]``."""
    return float((1.0 - similarity).sum())


def allocate_sparsity(importance: dict[str, float], shapes: dict[str, tuple[int, int]], target: float,
                      cap: float = 0.1) -> dict[str, float]:
    """Sparsity per matrix (``shapes``: ``(out_features, in_features)``): kept fraction
    ``clip(c * importance, 1 - (target + cap), 1)`` with ``c`` found by bisection so that the
    size-weighted mean sparsity equals ``target``, then rounded by :func:`round_to_rows`."""
    floor = 1.0 - min(1.0, target + cap)
    sizes = {n: rows * cols for n, (rows, cols) in shapes.items()}
    total = sum(sizes.values())

    def kept(scale: float) -> dict[str, float]:
        return {n: min(1.0, max(floor, scale * max(value, 0.0))) for n, value in importance.items()}

    def kept_weights(scale: float) -> float:
        return sum(k * sizes[n] for n, k in kept(scale).items())

    low, high = 0.0, 1.0
    while kept_weights(high) < (1.0 - target) * total and high < 1e12:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if kept_weights(middle) < (1.0 - target) * total:
            low = middle
        else:
            high = middle
    return round_to_rows({n: 1.0 - k for n, k in kept(high).items()}, shapes, target, cap)


def round_to_rows(sparsity: dict[str, float], shapes: dict[str, tuple[int, int]], target: float,
                  cap: float) -> dict[str, float]:
    """Whole weights per row: each matrix's per-row prune count is floored, then, largest remainder
    first (ties by name), matrices prune one more weight per row while the block total stays within
    ``floor(target * total)`` and each matrix within ``target + cap``, until no matrix's rows fit.
    Flooring alone would leave the block short by up to one weight per row of every matrix."""
    counts = {n: prune_count(s, shapes[n][1]) for n, s in sparsity.items()}
    limit = {n: prune_count(min(1.0, target + cap), cols) for n, (_, cols) in shapes.items()}
    missing = prune_count(target, sum(r * c for r, c in shapes.values())) - sum(
        counts[n] * shapes[n][0] for n in counts)
    order = sorted(counts, key=lambda n: (-(sparsity[n] * shapes[n][1] - counts[n]), n))
    grew = True
    while grew:
        grew = False
        for name in order:
            rows = shapes[name][0]
            if rows <= missing and counts[name] < limit[name]:
                counts[name] += 1
                missing -= rows
                grew = True
    return {n: counts[n] / shapes[n][1] for n in counts}

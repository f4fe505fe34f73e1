"""SparseGPT's column loop as the paper writes it: a plain reference for tests and benchmarks.

The weight block stays row-major and every pruned column's error is spread by a rank-1 update over
the strided columns to its right. ``sparsegpt_prune`` reorganises this loop (transposed blocks,
fewer tensor operations per column) and must give bit-identical weights and masks.
"""

from __future__ import annotations

import torch

from atv_prune.algorithms.masks import lowest_mask, nm_mask, prune_count
from atv_prune.algorithms.sparsegpt import inverse_hessian_factor


def textbook_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                       pattern: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01,
                       factor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_weight, mask)`` by the paper's loop, one column at a time in row-major blocks."""
    cols = weight.shape[1]
    if pattern is not None:
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    w = weight.detach().float().clone()
    w[:, torch.diag(hessian) == 0] = 0
    hinv = inverse_hessian_factor(hessian.float(), damp) if factor is None else factor
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        diag = torch.diag(block_hinv)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if sparsity is not None:
            saliency = block.pow(2) / diag.pow(2).unsqueeze(0)
            block_mask = lowest_mask(saliency.reshape(1, -1), prune_count(sparsity, saliency.numel())).view_as(block)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                group = block[:, i : i + m].pow(2) / diag[i : i + m].pow(2).unsqueeze(0)
                block_mask[:, i : i + m] = nm_mask(group, n, m)
            column = block[:, i]
            new_column = torch.where(block_mask[:, i], torch.zeros_like(column), column)
            error = (column - new_column) / diag[i]
            block[:, i:] -= error.unsqueeze(1) * block_hinv[i, i:].unsqueeze(0)
            block[:, i] = new_column
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
        mask[:, start:end] = block_mask
    w[mask] = 0
    return w, mask

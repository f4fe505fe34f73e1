"""SparseGPT (Frantar & Alistarh, ICML 2023): prune with an optimal-brain-surgeon weight update.

Pure tensor functions. ``H = (2/N) Σ X Xᵀ`` over the calibration pool's tokens (fp32) is turned
into the upper Cholesky factor of its damped inverse; columns are processed in blocks of 128: in
each block the weights with the lowest ``w² / [H⁻¹]_jj²`` are pruned (adaptively per block for
unstructured sparsity, per group of M for N:M) and the error of every pruned column is spread over
the columns not yet processed.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import NumericalError
from .masks import check_pattern, lowest_mask, nm_mask, prune_count
from .scoring import weighted_rows


def hessian_update(rows: torch.Tensor) -> torch.Tensor:
    """``Σ x xᵀ`` over the token rows, in fp32 (one sample's contribution before the 2/N scale)."""
    x = rows.reshape(-1, rows.shape[-1]).float()
    return x.T @ x


class HessianSum:
    """SparseGPT's statistic of one input group: ``H = (2/N) Σ_samples Σ_tokens w_t x_t x_tᵀ``."""

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.total = torch.zeros(features, features, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add one sample's pool rows ``(tokens, features)`` (optionally token-weighted)."""
        self.total += hessian_update(weighted_rows(rows, weights))

    def finish(self, samples: int) -> torch.Tensor:
        """``H`` over ``samples`` calibration samples."""
        return self.total * (2.0 / samples)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    Dead inputs (``H_jj = 0``) get ``H_jj = 1``. When the factorisation fails the damping is raised
    tenfold (with a warning) and the factorisation retried.
    """
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    mean_diag = torch.diag(h).mean()
    index = torch.arange(h.shape[0], device=h.device)
    for _ in range(max_tries):
        damped = h.clone()
        damped[index, index] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        warnings.warn(f"SparseGPT: Cholesky factorisation failed with damping {damp:g}; retrying with {damp * 10:g}",
                      stacklevel=3)
        damp *= 10
    raise NumericalError(f"SparseGPT: the input Hessian stays singular after damping {damp:g}: "
                         "use more calibration samples or another method")


def prepare_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, inverse factor)`` of one input group: q/k/v (and gate/up) share their input, so the
    Cholesky factorisation runs once per group instead of once per weight."""
    return hessian, inverse_hessian_factor(hessian.float())


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, mask)``: the OBS-updated fp32 weight with pruned entries at 0, and the
    boolean mask (``True`` = pruned). ``hessian`` is ``(in, in)`` fp32; ``factor``, when given, is
    ``inverse_hessian_factor(hessian, damp)`` computed once for every weight that shares the input."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity or pattern")
    rows, cols = weight.shape
    if pattern is not None:
        check_pattern(pattern, cols)
        block_size = max(pattern[1], block_size - block_size % pattern[1])  # N:M groups never straddle blocks
    w = weight.detach().float().clone()
    w[:, torch.diag(hessian) == 0] = 0
    hinv = inverse_hessian_factor(hessian.float(), damp) if factor is None else factor
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        # One row per input column, so that every update of the column loop writes contiguous rows.
        columns = w[:, start:end].T.contiguous()
        block_hinv = hinv[start:end, start:end]
        diag = torch.diag(block_hinv)
        pruned = torch.zeros_like(columns, dtype=torch.bool)
        if sparsity is not None:
            saliency = columns.T.pow(2) / diag.pow(2).unsqueeze(0)
            count = prune_count(sparsity, saliency.numel())
            pruned = lowest_mask(saliency.reshape(1, -1), count).view_as(saliency).T.contiguous()
        kept = ~pruned
        errors = torch.empty_like(columns)
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                group = columns[i : i + m].T.pow(2) / diag[i : i + m].pow(2).unsqueeze(0)
                pruned[i : i + m] = nm_mask(group, n, m).T
                kept[i : i + m] = ~pruned[i : i + m]
            error = torch.div(columns[i], diag[i], out=errors[i]).masked_fill_(kept[i], 0)
            columns[i + 1 :] -= block_hinv[i, i + 1 :].unsqueeze(1) * error
        w[:, start:end] = columns.masked_fill_(pruned, 0).T
        w[:, end:] -= errors.T.contiguous() @ hinv[start:end, end:]  # row-major, as the paper's matmul: same bits
        mask[:, start:end] = pruned.T
    return w, mask

"""SparseGPT's OBS update as a pure function."""

import pytest
import torch
from sparsegpt_reference import textbook_sparsegpt

from atv_prune.algorithms.masks import unstructured_mask
from atv_prune.algorithms.scoring import squared_input_sum, wanda_scores
from atv_prune.algorithms.sparsegpt import hessian_update, inverse_hessian_factor, sparsegpt_prune


def _layer(seed: int = 0, rows: int = 24, cols: int = 64, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3
    x = (torch.randn(tokens, cols, generator=g) @ mixing) * scale  # correlated, unevenly scaled inputs
    return torch.randn(rows, cols, generator=g), x


def _error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ weight.T - x @ pruned.T).pow(2).sum())


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"sparsity": 0.6}, {"pattern": (2, 4)}])
def test_sparsegpt_reconstructs_better_than_wanda(target: dict) -> None:
    weight, x = _layer()
    new, mask = sparsegpt_prune(weight, 2 * hessian_update(x), block_size=16, **target)
    if "pattern" in target:
        from atv_prune.algorithms.masks import nm_mask

        wanda_mask = nm_mask(wanda_scores(weight, squared_input_sum(x)), *target["pattern"])
    else:
        wanda_mask = unstructured_mask(wanda_scores(weight, squared_input_sum(x)), target["sparsity"])
    wanda = weight.masked_fill(wanda_mask, 0)
    assert _error(weight, new, x) < 0.8 * _error(weight, wanda, x)
    assert (new[mask] == 0).all()


def test_unstructured_sparsity_is_exact_per_block_and_nm_groups_valid() -> None:
    weight, x = _layer(1)
    hessian = hessian_update(x)
    _, mask = sparsegpt_prune(weight, hessian, sparsity=0.5, block_size=16)
    assert (mask.reshape(24, 4, 16).sum(dim=(0, 2)) == 24 * 16 // 2).all()
    _, mask = sparsegpt_prune(weight, hessian, pattern=(4, 8), block_size=16)
    assert (mask.reshape(24, 8, 8).sum(-1) == 4).all()


def test_dead_inputs_are_zeroed_and_deterministic() -> None:
    weight, x = _layer(2)
    x[:, 5] = 0
    first, mask = sparsegpt_prune(weight, hessian_update(x), sparsity=0.5)
    again, _ = sparsegpt_prune(weight, hessian_update(x), sparsity=0.5)
    assert (first[:, 5] == 0).all() and torch.equal(first, again)
    assert torch.isfinite(first).all()


def test_cholesky_failure_raises_the_damping_with_a_warning() -> None:
    rotation = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2 ** 0.5
    hessian = rotation @ torch.diag(torch.tensor([2.0, -0.05])) @ rotation.T  # rounding-broken PSD matrix
    with pytest.warns(UserWarning, match="retrying with 0.1"):
        factor = inverse_hessian_factor(hessian, damp=0.01)
    assert torch.isfinite(factor).all()


def test_a_precomputed_factor_gives_the_same_result() -> None:
    weight, x = _layer(3)
    hessian = hessian_update(x)
    plain, mask = sparsegpt_prune(weight, hessian, sparsity=0.5, block_size=16)
    shared, shared_mask = sparsegpt_prune(weight, hessian, sparsity=0.5, block_size=16,
                                          factor=inverse_hessian_factor(hessian))
    assert torch.equal(plain, shared) and torch.equal(mask, shared_mask)


def test_equal_saliencies_prune_the_first_positions() -> None:
    """With H = I no error spreads, so the mask is the lowest w² per column block; among equal
    saliencies the lower flat position (row-major) goes first, as the stable sort did."""
    weight = torch.randint(-2, 3, (6, 32), generator=torch.Generator().manual_seed(4)).float()
    _, mask = sparsegpt_prune(weight, torch.eye(32), sparsity=0.5, block_size=16)
    for start in (0, 16):
        saliency = weight[:, start:start + 16].pow(2).flatten()
        order = torch.sort(saliency, stable=True).indices[: saliency.numel() // 2]
        expected = torch.zeros_like(saliency, dtype=torch.bool)
        expected[order] = True
        assert torch.equal(mask[:, start:start + 16].flatten(), expected)
    _, nm = sparsegpt_prune(weight, torch.eye(32), pattern=(2, 4), block_size=16)
    order = torch.sort(weight.pow(2).reshape(6, 8, 4), dim=2, stable=True).indices[:, :, :2]
    assert torch.equal(nm, torch.zeros(6, 8, 4, dtype=torch.bool).scatter_(2, order, True).reshape(6, 32))


@pytest.mark.parametrize("shape, target", [
    ((24, 64), {"sparsity": 0.5}), ((37, 200), {"sparsity": 0.3}), ((48, 256), {"pattern": (2, 4)}),
    ((40, 264), {"pattern": (4, 8)}), ((16, 96), {"sparsity": 0.7}),
])
def test_the_column_loop_equals_the_papers_loop_bit_for_bit(shape: tuple[int, int], target: dict) -> None:
    """The reorganised loop (transposed blocks, four operations per column) changes no bit of the
    weights or the mask against the paper's row-major loop, partial last blocks and dead inputs included."""
    rows, cols = shape
    for seed in range(3):
        weight, x = _layer(seed, rows, cols, tokens=300)
        x[:, 3] = 0
        hessian = hessian_update(x)
        new, mask = sparsegpt_prune(weight, hessian, block_size=32, **target)
        reference, reference_mask = textbook_sparsegpt(weight, hessian, block_size=32, **target)
        assert torch.equal(mask, reference_mask)
        assert torch.equal(new.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_the_column_loop_equals_the_papers_loop_with_a_shared_factor_and_full_blocks(target: dict) -> None:
    """The engine's call: 128-column blocks and the group's precomputed inverse factor."""
    weight, x = _layer(5, rows=40, cols=384, tokens=600)
    hessian = hessian_update(x)
    factor = inverse_hessian_factor(hessian)
    new, mask = sparsegpt_prune(weight, hessian, factor=factor, **target)
    reference, reference_mask = textbook_sparsegpt(weight, hessian, factor=factor, **target)
    assert torch.equal(mask, reference_mask)
    assert torch.equal(new.view(torch.int32), reference.view(torch.int32))

"""DAS: output-diversity importance and the per-matrix sparsity allocation."""

import pytest
import torch
import torch.nn.functional as F

from atv_prune.algorithms.allocation import allocate_sparsity, das_importance, output_similarity_sums
from atv_prune.algorithms.masks import prune_count, unstructured_mask
from atv_prune.errors import ConfigError
from atv_prune.runs.config import PruneConfig


def test_similarity_sums_match_pairwise_means() -> None:
    g = torch.Generator().manual_seed(0)
    output = torch.randn(1, 9, 5, generator=g)
    visual = torch.tensor([0, 1, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    unit = F.normalize(output[0], dim=-1)
    cos = unit @ unit.T

    def mean_offdiag(block: torch.Tensor) -> float:
        n = block.shape[0]
        return float((block.sum() - block.diagonal().sum()) / (n * (n - 1)))

    expected = [mean_offdiag(cos[visual][:, visual]), mean_offdiag(cos[~visual][:, ~visual]),
                float(cos[visual][:, ~visual].mean())]
    torch.testing.assert_close(output_similarity_sums(output, visual), torch.tensor(expected), atol=1e-5, rtol=0)
    assert das_importance(torch.tensor(expected)) == pytest.approx(3 - sum(expected), abs=1e-5)


def test_allocation_keeps_the_target_and_the_cap() -> None:
    importance = {"q": 3.0, "k": 1.0, "v": 2.0, "down": 0.5}
    shapes = {"q": (10, 10), "k": (2, 10), "v": (2, 10), "down": (10, 30)}
    sizes = {n: r * c for n, (r, c) in shapes.items()}
    sparsity = allocate_sparsity(importance, shapes, 0.5, cap=0.1)
    mean = sum(sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-6)
    assert all(0 <= s <= 0.6 + 1e-9 for s in sparsity.values())
    assert sparsity["q"] < sparsity["v"] < sparsity["k"] == pytest.approx(0.6)
    assert allocate_sparsity({"a": 1.0, "b": 1.0}, {"a": (2, 4), "b": (2, 4)}, 0.5) == pytest.approx(
        {"a": 0.5, "b": 0.5})


@pytest.mark.parametrize("target", [0.3, 0.5, 0.57, 0.7])
def test_rounded_allocation_prunes_the_target_count_of_the_block(target: float) -> None:
    """Per-row flooring alone undershoots (49.5% of a 50% block on the built-in model); the
    rounded shares give the block floor(target * total) pruned weights, short by less than one row
    of a matrix still under its cap."""
    g = torch.Generator().manual_seed(1)
    shapes = {"q": (96, 96), "k": (32, 96), "v": (32, 96), "o": (96, 96), "gate": (288, 96),
              "up": (288, 96), "down": (96, 288)}
    importance = {n: float(v) for n, v in zip(shapes, torch.rand(len(shapes), generator=g) + 0.5)}
    sparsity = allocate_sparsity(importance, shapes, target, cap=0.1)
    pruned, growable_rows = 0, []
    for name, (rows, cols) in shapes.items():
        mask = unstructured_mask(torch.rand(rows, cols, generator=g), sparsity[name])
        per_row = mask.sum(1).unique()
        assert per_row.numel() == 1
        assert int(per_row) <= prune_count(target + 0.1, cols)
        if int(per_row) < prune_count(target + 0.1, cols):
            growable_rows.append(rows)
        pruned += int(mask.sum())
    total = sum(r * c for r, c in shapes.values())
    assert 0 <= prune_count(target, total) - pruned < min(growable_rows)
    assert pruned / total == pytest.approx(target, abs=1e-3)


def test_das_needs_unstructured_calibrated_pruning() -> None:
    assert PruneConfig(method="tamp").resolved_allocation == "das"
    assert PruneConfig(method="tamp").resolved_pool == "amia"
    assert PruneConfig(method="wanda", pool="amia").resolved_allocation == "uniform"
    with pytest.raises(ConfigError, match="N:M"):
        PruneConfig(method="tamp", sparsity=None, pattern=(2, 4))
    with pytest.raises(ConfigError, match="calibrated"):
        PruneConfig(method="magnitude", allocation="das")

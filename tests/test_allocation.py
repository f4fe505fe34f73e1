"""DAS: output-diversity importance and the per-matrix sparsity allocation."""

import pytest
import torch
import torch.nn.functional as F

from atv_prune.allocation import allocate_sparsity, das_importance, output_similarity_sums
from atv_prune.config import PruneConfig
from atv_prune.errors import ConfigError


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
    sizes = {"q": 100, "k": 20, "v": 20, "down": 300}
    sparsity = allocate_sparsity(importance, sizes, 0.5, cap=0.1)
    mean = sum(sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-6)
    assert all(0 <= s <= 0.6 + 1e-9 for s in sparsity.values())
    assert sparsity["q"] < sparsity["v"] < sparsity["k"] == pytest.approx(0.6)
    assert allocate_sparsity({"a": 1.0, "b": 1.0}, {"a": 8, "b": 8}, 0.5) == pytest.approx({"a": 0.5, "b": 0.5})


def test_das_needs_unstructured_calibrated_pruning() -> None:
    assert PruneConfig(method="tamp").resolved_allocation == "das"
    assert PruneConfig(method="tamp").resolved_pool == "amia"
    assert PruneConfig(method="wanda", pool="amia").resolved_allocation == "uniform"
    with pytest.raises(ConfigError, match="N:M"):
        PruneConfig(method="tamp", sparsity=None, pattern=(2, 4))
    with pytest.raises(ConfigError, match="calibrated"):
        PruneConfig(method="magnitude", allocation="das")

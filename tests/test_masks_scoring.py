"""Pure tensor functions: scores, unstructured and N:M masks, config validation."""

import math

import pytest
import torch

from atv_prune.algorithms.masks import lowest_mask, make_mask, nm_mask, unstructured_mask
from atv_prune.algorithms.scoring import magnitude_scores, squared_input_sum, wanda_scores
from atv_prune.errors import ConfigError
from atv_prune.runs.config import PruneConfig, parse_pattern


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.73, 0.99])
@pytest.mark.parametrize("in_features", [7, 64, 100])
def test_unstructured_prunes_exactly_floor_per_row(sparsity: float, in_features: int) -> None:
    scores = torch.rand(13, in_features, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(scores, sparsity)
    assert (mask.sum(dim=1) == math.floor(sparsity * in_features)).all()


def test_unstructured_prunes_the_lowest_scores() -> None:
    scores = torch.rand(5, 40, generator=torch.Generator().manual_seed(2))
    mask = unstructured_mask(scores, 0.5)
    for row in range(5):
        assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()


def test_ties_break_by_position() -> None:
    scores = torch.ones(2, 8)
    mask = unstructured_mask(scores, 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()
    assert nm_mask(torch.ones(1, 8), 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]


def _stable_sort_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The reference: the first ``count`` positions of a stable sort of every row."""
    order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def _stable_sort_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True).reshape(rows, cols)


@pytest.fixture(params=[1, 2], ids=["numpy-partition", "kthvalue"])
def threads(request: pytest.FixtureRequest):
    """One thread selects with numpy's partition, more with torch's kthvalue: both must agree."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("levels", [2, 3, 5, 1000])
@pytest.mark.parametrize("count", [0, 1, 7, 16, 31, 32])
def test_selection_equals_a_stable_sort_with_and_without_ties(levels: int, count: int, threads: int) -> None:
    """Scores drawn from a few levels have many ties at the threshold: the lowest positions among
    equal scores are pruned first, exactly as the stable sort the masks used to be made with."""
    g = torch.Generator().manual_seed(levels * 100 + count)
    scores = torch.randint(0, levels, (40, 32), generator=g).float() / levels
    assert torch.equal(lowest_mask(scores, count), _stable_sort_mask(scores, count))


def test_selection_ties_pin_the_first_positions() -> None:
    scores = torch.tensor([[0.5, 0.2, 0.5, 0.5, 0.9, 0.5], [0.0, -0.0, 0.0, 1.0, 0.0, 2.0]])
    assert lowest_mask(scores, 3).tolist() == [[True, True, True, False, False, False],
                                               [True, True, True, False, False, False]]
    assert nm_mask(torch.tensor([[3.0, 1.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]]), 2, 4).tolist() == [
        [True, True, False, False, True, True, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("levels", [2, 3, 1000])
def test_nm_selection_equals_a_stable_sort(n: int, m: int, levels: int) -> None:
    g = torch.Generator().manual_seed(n * 10 + m + levels)
    scores = torch.randint(0, levels, (17, 48), generator=g).float()
    assert torch.equal(nm_mask(scores, n, m), _stable_sort_nm(scores, n, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selection_in_half_precision_equals_a_stable_sort(dtype: torch.dtype, threads: int) -> None:
    """Scores in bf16/fp16 (as a GPU run could give them) round to many ties: still the sort's order."""
    scores = torch.rand(24, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(lowest_mask(scores, 29), _stable_sort_mask(scores, 29))
    assert torch.equal(nm_mask(scores, 2, 4), _stable_sort_nm(scores, 2, 4))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_groups_are_valid(n: int, m: int) -> None:
    scores = torch.rand(9, 32, generator=torch.Generator().manual_seed(3))
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(9, 32 // m, m)
    assert (groups.sum(dim=2) == n).all()
    grouped_scores = scores.reshape(9, 32 // m, m)
    pruned_max = torch.where(groups, grouped_scores, -torch.inf).amax(dim=2)
    kept_min = torch.where(~groups, grouped_scores, torch.inf).amin(dim=2)
    assert (pruned_max <= kept_min).all()


def test_nm_refuses_indivisible_inputs() -> None:
    with pytest.raises(ConfigError, match="divisible by 8"):
        nm_mask(torch.rand(4, 12), 4, 8)


def test_make_mask_dispatches() -> None:
    weight = torch.randn(6, 16)
    assert torch.equal(make_mask(magnitude_scores(weight), None, (2, 4)), nm_mask(weight.abs(), 2, 4))
    assert torch.equal(make_mask(weight.abs(), 0.5, None), unstructured_mask(weight.abs(), 0.5))


def test_wanda_scores_match_definition() -> None:
    weight = torch.randn(3, 4)
    stats = torch.tensor([1.0, 4.0, 0.0, 9.0])
    expected = weight.abs() * torch.tensor([1.0, 2.0, 0.0, 3.0])
    torch.testing.assert_close(wanda_scores(weight, stats), expected)
    with pytest.raises(ValueError):
        wanda_scores(weight, torch.ones(5))


def test_squared_input_sum_is_fp32_sum_over_tokens() -> None:
    x = torch.randn(1, 5, 3, dtype=torch.bfloat16)
    out = squared_input_sum(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() ** 2).sum(dim=(0, 1)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.3), "outside"),
    (dict(sparsity=0.0), "outside"),
    (dict(sparsity=float("nan")), "outside"),
    (dict(sparsity=None), "exactly one"),
    (dict(sparsity=0.5, pattern=(2, 4)), "exactly one"),
    (dict(sparsity=None, pattern=(4, 4)), "0 < N < M"),
    (dict(sparsity=None, pattern=(0, 4)), "0 < N < M"),
    (dict(method="sparse"), "unknown method"),
    (dict(pool="everything"), "unknown pool"),
    (dict(method="magnitude", pool="text"), "no calibration"),
    (dict(method="atv", pool="mixed"), "--method wanda"),
    (dict(alpha=-1.0), "alpha"),
    (dict(samples=0), "samples"),
])
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_pattern_parsing() -> None:
    assert parse_pattern("2:4") == (2, 4)
    with pytest.raises(ConfigError, match="N:M"):
        parse_pattern("2-4")


def test_config_resolves_pools() -> None:
    assert PruneConfig(method="wanda").resolved_pool == "mixed"
    assert PruneConfig(method="atv").resolved_pool == "atv"
    assert PruneConfig(method="magnitude").resolved_pool is None
    assert PruneConfig(method="wanda", pool="text").to_dict()["pool"] == "text"

"""Calibration pools as pure functions of one sample's view of one block."""

import torch
import torch.nn.functional as F

from atv_prune.pools import POOLS, PoolParams, SampleView, adaptive_budget, visual_drift


def _view(seed: int = 0, seq: int = 20, n_visual: int = 12) -> SampleView:
    g = torch.Generator().manual_seed(seed)
    visual = torch.zeros(seq, dtype=torch.bool)
    visual[3 : 3 + n_visual] = True
    hidden_in = torch.randn(seq, 8, generator=g)
    hidden_out = hidden_in + torch.randn(seq, 8, generator=g) * torch.linspace(0.1, 2, seq).unsqueeze(1)
    return SampleView(visual, hidden_in, hidden_out, torch.Generator().manual_seed(seed))


def test_drift_is_one_minus_cosine_of_visual_tokens() -> None:
    view = _view()
    expected = [1 - F.cosine_similarity(view.hidden_in[i], view.hidden_out[i], dim=0) for i in range(3, 15)]
    torch.testing.assert_close(visual_drift(view), torch.stack(expected))


def test_plain_pools_select_by_modality() -> None:
    view = _view()
    params = PoolParams()
    assert POOLS["mixed"](view, params).fixed.tolist() == list(range(20))
    assert POOLS["text"](view, params).fixed.tolist() == [0, 1, 2] + list(range(15, 20))
    assert POOLS["visual"](view, params).fixed.tolist() == list(range(3, 15))


def test_atv_ranks_visual_tokens_by_drift() -> None:
    view = _view()
    choice = POOLS["atv"](view, PoolParams())
    drift = visual_drift(view)
    assert choice.fixed.tolist() == POOLS["text"](view, PoolParams()).fixed.tolist()
    ranked_drift = drift[choice.ranked - 3]
    assert (ranked_drift[:-1] >= ranked_drift[1:]).all()
    assert abs(choice.saliency_sum - float(drift.sum())) < 1e-5
    assert choice.candidate_cap == min(12, 8)


def test_random_pool_is_seeded_and_keeps_the_atv_saliency() -> None:
    first = POOLS["random"](_view(seed=4), PoolParams())
    again = POOLS["random"](_view(seed=4), PoolParams())
    other = POOLS["random"](_view(seed=5), PoolParams())
    assert first.ranked.tolist() == again.ranked.tolist()
    assert first.ranked.tolist() != other.ranked.tolist()
    assert sorted(first.ranked.tolist()) == list(range(3, 15))
    assert first.saliency_sum == POOLS["atv"](_view(seed=4), PoolParams()).saliency_sum


def test_drift_fixed_takes_a_fixed_fraction_of_the_top_drift() -> None:
    view = _view()
    choice = POOLS["drift-fixed"](view, PoolParams(visual_ratio=0.25))
    top = POOLS["atv"](view, PoolParams()).ranked[:3]
    assert choice.visual_selected == 3
    assert set(choice.fixed.tolist()) == {0, 1, 2, 15, 16, 17, 18, 19} | set(top.tolist())


def test_adaptive_budget_rule() -> None:
    assert adaptive_budget(n_visual=100, n_text=40, block_saliency=0.25, alpha=1.0) == 10
    assert adaptive_budget(n_visual=100, n_text=40, block_saliency=0.25, alpha=0.0) == 0
    assert adaptive_budget(n_visual=100, n_text=40, block_saliency=0.25, alpha=8.0) == 40
    assert adaptive_budget(n_visual=5, n_text=40, block_saliency=0.9, alpha=1.0) == 5

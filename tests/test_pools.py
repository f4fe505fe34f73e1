"""Calibration pools as pure functions of one sample's view of one block."""

import torch
import torch.nn.functional as F

from atv_prune.algorithms.budget import Budget
from atv_prune.algorithms.pools import PoolChoice, SampleView, diverse_order, visual_drift
from atv_prune.algorithms.specs import POOLS, saliency_pools


def select(pool: str, view: SampleView) -> PoolChoice:
    """The registered pool's choice for ``view``."""
    return POOLS[pool].function()(view)


def _view(seed: int = 0, seq: int = 20, n_visual: int = 12) -> SampleView:
    g = torch.Generator().manual_seed(seed)
    visual = torch.zeros(seq, dtype=torch.bool)
    visual[3 : 3 + n_visual] = True
    hidden_in = torch.randn(seq, 8, generator=g)
    hidden_out = hidden_in + torch.randn(seq, 8, generator=g) * torch.linspace(0.1, 2, seq).unsqueeze(1)
    attention = torch.rand(seq, generator=g)
    return SampleView(visual, hidden_in, hidden_out, torch.Generator().manual_seed(seed),
                      attention_from_text=attention / attention.sum())


def test_drift_is_one_minus_cosine_of_visual_tokens() -> None:
    view = _view()
    expected = [1 - F.cosine_similarity(view.hidden_in[i], view.hidden_out[i], dim=0) for i in range(3, 15)]
    torch.testing.assert_close(visual_drift(view), torch.stack(expected))


def test_plain_pools_select_by_modality() -> None:
    view = _view()
    assert select("mixed", view).fixed.tolist() == list(range(20))
    assert select("text", view).fixed.tolist() == [0, 1, 2] + list(range(15, 20))
    assert select("visual", view).fixed.tolist() == list(range(3, 15))
    assert all(POOLS[name].budget == "none" for name in ("mixed", "text", "visual"))


def test_atv_ranks_visual_tokens_by_drift() -> None:
    view = _view()
    choice = select("atv", view)
    drift = visual_drift(view)
    assert choice.fixed.tolist() == select("text", view).fixed.tolist()
    ranked_drift = drift[choice.ranked - 3]
    assert (ranked_drift[:-1] >= ranked_drift[1:]).all()
    assert abs(choice.saliency_sum - float(drift.sum())) < 1e-5
    assert Budget(POOLS["atv"].budget, ratio=0.1).limit(choice.n_visual, choice.n_text) == min(12, 8)
    assert Budget(POOLS["drift-fixed"].budget, ratio=0.25).limit(choice.n_visual, choice.n_text) == 3


def test_random_pool_is_seeded_and_keeps_the_atv_saliency() -> None:
    first = select("random", _view(seed=4))
    again = select("random", _view(seed=4))
    other = select("random", _view(seed=5))
    assert first.ranked.tolist() == again.ranked.tolist()
    assert first.ranked.tolist() != other.ranked.tolist()
    assert sorted(first.ranked.tolist()) == list(range(3, 15))
    assert first.saliency_sum == select("atv", _view(seed=4)).saliency_sum


def test_attention_pool_ranks_by_attention_from_text() -> None:
    view = _view()
    choice = select("abs", view)
    received = view.attention_from_text[3:15]
    assert choice.ranked.tolist() == (torch.argsort(received, descending=True, stable=True) + 3).tolist()
    assert abs(choice.saliency_sum - float(received.sum())) < 1e-6
    assert POOLS["abs"].needs_attention and not POOLS["atv"].needs_attention


def test_relative_attention_pool_ranks_like_abs_with_a_scale_free_saliency() -> None:
    view = _view()
    relative, plain = select("abs-rel", view), select("abs", view)
    assert torch.equal(relative.ranked, plain.ranked)
    assert abs(relative.saliency_sum - plain.saliency_sum * 20) < 1e-5  # s * n, n = 20 positions
    assert POOLS["abs-rel"].budget == "adaptive" and POOLS["abs-rel-fixed"].budget == "fixed"
    assert saliency_pools()["abs-rel"] == {"adaptive": "abs-rel", "fixed": "abs-rel-fixed"}


def test_diverse_order_is_greedy_max_min() -> None:
    points = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.05], [0.7, 0.7]])
    order = diverse_order(points, first=0)
    assert order.tolist()[:3] == [0, 3, 2]
    assert sorted(order.tolist()) == list(range(5))


def test_diversity_pool_budget_saliency_is_mean_cosine_distance() -> None:
    view = _view()
    choice = select("dbs", view)
    unit = F.normalize(view.hidden_in[3:15], dim=-1)
    diversity = (1 - unit @ unit.T).sum(1) / 11
    assert abs(choice.saliency_sum - float(diversity.sum())) < 1e-4
    assert int(choice.ranked[0]) == int(diversity.argmax()) + 3


def test_budget_rules() -> None:
    def adaptive(n_visual: int, n_text: int, mean: float, alpha: float) -> int:
        return Budget("adaptive", alpha=alpha).resolve(n_visual, n_text, mean)

    assert adaptive(100, 40, 0.25, alpha=1.0) == 10
    assert adaptive(100, 40, 0.25, alpha=0.0) == 0
    assert adaptive(100, 40, 0.25, alpha=8.0) == 40
    assert adaptive(5, 40, 0.9, alpha=1.0) == 5
    assert Budget("fixed", ratio=0.1).resolve(200, 50, 0.0) == 20 and Budget("fixed", ratio=1.0).resolve(7, 1, 0.0) == 7
    assert Budget("none").resolve(100, 40, 0.9) == 0 and Budget("none").limit(100, 40) == 0


def test_budget_limit_bounds_every_final_budget() -> None:
    for rule in ("adaptive", "fixed", "none"):
        for alpha in (0.0, 0.5, 1.0, 8.0):
            budget = Budget(rule, alpha=alpha, ratio=0.3)
            for n_visual, n_text in ((100, 40), (5, 40), (0, 10), (30, 30)):
                limit = budget.limit(n_visual, n_text)
                assert all(budget.resolve(n_visual, n_text, mean) <= limit for mean in (0.0, 0.1, 0.5, 1.0, 3.0))


def _mmd(kernel: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(kernel.mean() + kernel[chosen][:, chosen].mean() - 2 * kernel[:, chosen].mean())


def tamp_authors_amia(features: torch.Tensor, attention: torch.Tensor, visual: torch.Tensor) -> list[int]:
    """A plain transcription of the TAMP authors' AMIA selection (G-JWLee/TAMP,
    llava/pruners/wanda_pruner.py, ``AdaptiveMultimodalInputActivation.add_batch``): one pick per
    loop iteration, neighbours lowered after every pick, the MMD checked after every pick."""
    out = F.normalize(features.float(), dim=-1)
    v, t = out[visual], out[~visual]

    def positive_upper_mean(x: torch.Tensor) -> float:
        similarity = (x @ x.T).triu(diagonal=1)
        return similarity[similarity > 0].mean().item()

    density = (positive_upper_mean(v) + positive_upper_mean(t) + (v @ t.T).mean().item()) / 3
    distances = 1 - out @ out.T
    knn = torch.topk(distances, k=4, largest=False).indices[:, 1:]
    score = attention.float()
    graph = score + (torch.exp(-torch.gather(distances, 1, knn) * 1.0) * score[knn]).sum(-1)
    squared = (out**2).sum(dim=1)
    kernel = torch.exp(-(squared.view(-1, 1) + squared.view(1, -1) - 2.0 * out @ out.T) / 2)
    selected: list[int] = []
    while True:
        pick = int(torch.argmax(graph))
        near = knn[pick]
        graph[near] = graph[near] - torch.exp(-distances[pick, near] * 0.2) * torch.clamp(graph[pick], min=0)
        selected.append(pick)
        chosen = torch.tensor(selected)
        graph[chosen] = graph.min() - 1
        mmd = kernel.mean() + kernel[chosen][:, chosen].mean() - 2 * kernel[:, chosen].mean()
        if mmd < torch.sqrt(torch.tensor(1 - density)) * 0.1:
            return sorted(selected)


def _clustered_tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens in six clusters (sizes, widths and modality mix drawn from ``seed``) with peaked attention."""
    g = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(30, 400, (1,), generator=g)), int(torch.randint(3, 24, (1,), generator=g))
    centres = torch.randn(6, d, generator=g) * 2
    features = centres[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.5
    attention = torch.softmax(torch.randn(n, generator=g) * 3, 0)
    return features, attention, torch.rand(n, generator=g) < 0.6


def test_amia_selects_exactly_what_the_tamp_authors_loop_selects() -> None:
    from atv_prune.algorithms.pools import amia_selection

    sizes = []
    for seed in range(6):
        features, attention, visual = _clustered_tokens(seed)
        expected = tamp_authors_amia(features, attention, visual)
        for batch in (1, 4, 64):  # one pick a step (the plain loop), small steps, the default
            positions, _ = amia_selection(features, attention, visual, batch=batch)
            assert positions.tolist() == expected, (seed, batch)
        sizes.append(len(expected))
    assert max(sizes) >= 30  # some cases take many steps of picks


def test_amia_density_is_the_tamp_authors_rho() -> None:
    from atv_prune.algorithms.pools import amia_density

    features, _, visual = _clustered_tokens(2)
    unit = F.normalize(features, dim=-1)
    cosine = unit @ unit.T
    parts = []
    for rows in (visual, ~visual):
        pairs = [float(cosine[i, j]) for i in rows.nonzero().flatten() for j in rows.nonzero().flatten() if i < j]
        parts.append(sum(p for p in pairs if p > 0) / sum(1 for p in pairs if p > 0))
    parts.append(float(cosine[visual][:, ~visual].mean()))
    assert abs(amia_density(cosine, visual) - sum(parts) / 3) < 1e-5
    text = cosine[~visual][:, ~visual]  # a text-only sample: the parts without tokens are left out
    assert abs(amia_density(text, torch.zeros(len(text), dtype=torch.bool)) - parts[1]) < 1e-5


def test_lowering_in_order_equals_a_loop() -> None:
    from atv_prune.algorithms.pools import _lower_in_order

    g = torch.Generator().manual_seed(1)
    score = torch.rand(10, generator=g)
    targets = torch.tensor([3, 1, 3, 7, 3, 1])
    amounts = torch.rand(6, generator=g)
    expected = score.clone()
    for target, amount in zip(targets, amounts):
        expected[target] = expected[target] - amount
    assert torch.equal(_lower_in_order(score.clone(), targets, amounts), expected)


def test_amia_stops_once_the_selection_matches_all_tokens() -> None:
    from atv_prune.algorithms.pools import amia_density, amia_selection

    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 16, generator=g) * 3
    features = centres[torch.arange(200) % 4] + 0.3 * torch.randn(200, 16, generator=g)  # 4 clusters
    visual = torch.arange(200) >= 50
    attention = torch.softmax(torch.randn(200, generator=g), 0)
    positions, weights = amia_selection(features, attention, visual)
    assert 0 < len(positions) < 200 and torch.equal(positions, positions.sort().values)
    assert abs(float(weights.mean()) - 1) < 1e-5
    torch.testing.assert_close(weights, attention[positions] / attention[positions].mean())
    unit = F.normalize(features, dim=-1)
    cosine = unit @ unit.T
    kernel = torch.exp(cosine - 1)
    threshold = 0.1 * (1 - amia_density(cosine, visual)) ** 0.5
    chosen = torch.zeros(200, dtype=torch.bool)
    chosen[positions] = True
    assert _mmd(kernel, chosen) < threshold
    clusters = set((positions % 4).tolist())
    assert clusters == {0, 1, 2, 3}  # diverse: every cluster represented
    again, _ = amia_selection(features, attention, visual)
    assert torch.equal(positions, again)


def test_amia_pool_needs_attention_and_weights_its_tokens() -> None:
    view = _view()
    view = SampleView(view.visual, view.hidden_in, view.hidden_out, view.generator,
                      attention_from_last=view.attention_from_text)
    choice = select("amia", view)
    assert POOLS["amia"].needs_attention and POOLS["amia"].budget == "none"
    assert choice.weights is not None and len(choice.weights) == len(choice.fixed)
    assert choice.visual_selected == int(view.visual[choice.fixed].sum())


def test_diverse_order_stops_at_its_limit_with_the_same_prefix() -> None:
    features = torch.randn(30, 6, generator=torch.Generator().manual_seed(5))
    full = diverse_order(features, first=2)
    assert torch.equal(diverse_order(features, first=2, limit=7), full[:7])
    view = _view()
    limited = SampleView(view.visual, view.hidden_in, view.hidden_out, view.generator, limit=4)
    assert torch.equal(select("dbs", limited).ranked, select("dbs", view).ranked[:4])

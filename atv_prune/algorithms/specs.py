"""What pools and methods exist: declarative specs in open registries (no torch needed to read them).

A **pool** decides which tokens of a sample feed a block's statistics (:mod:`.pools` holds the
functions); a **method** decides what is accumulated from those tokens and how a weight is pruned
from it (:mod:`.scoring`, :mod:`.sparsegpt`, :mod:`.prune`). Each is one :class:`Pool` or
:class:`Method` record; ``register_pool`` / ``register_method`` add one from anywhere, and every
entry point (``PruneConfig``, the command lines) reads the registries at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import Ref, Registry, resolve_ref

#: The largest seed of a run (calibration draw, random pools, t-SNE): numpy's limit, 2**32 - 1; the
#: engine's per-block generator seeds, ``seed * 1_000_003 + block * 10_007 + sample``, then stay far
#: inside torch's 64 bits.
MAX_SEED = 2**32 - 1

BudgetRule = Literal["none", "adaptive", "fixed"]
Allocation = Literal["uniform", "das"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "das")
#: What structured pruning removes: MLP channels, attention heads (whole key/value groups), or both.
Structure = Literal["channels", "heads", "both"]
STRUCTURES: tuple[str, ...] = ("channels", "heads", "both")


@dataclass(frozen=True)
class Pool:
    """A calibration pool.

    ``select``: ``SampleView -> PoolChoice`` (see :mod:`.pools`). ``budget``: how many of the
    choice's *ranked* visual candidates join — none, ATV's adaptive rule, or a fixed fraction
    (:class:`~.budget.Budget`). ``needs_attention``: the engine records the block's attention
    probabilities for it.
    """

    select: Ref
    budget: BudgetRule = "none"
    needs_attention: bool = False
    summary: str = ""
    #: The visual saliency a budgeted pool ranks by; a sweep pairs the adaptive and the fixed pool
    #: of each saliency.
    saliency: str = ""

    def function(self):
        """The selection function (imported on first use)."""
        return resolve_ref(self.select)


@dataclass(frozen=True)
class Method:
    """A pruning method, in three pure pieces (as llm-compressor writes each algorithm).

    ``accumulator``: ``(in_features, device) -> Accumulator`` collecting the pool's token rows of
    one input group (``add(rows, weights)``, ``finish(n_samples)``); ``None`` for data-free
    methods. ``prepare``: optional, run once per input group on the finished statistic (SparseGPT's
    Cholesky factor, shared by q/k/v). ``prune_weight``: ``(weight, statistic, sparsity, pattern)
    -> pruned weight``.

    A *structured* method (removes whole attention heads and MLP channels) has ``column_scores``
    instead of ``prune_weight``: ``(weight, statistic) -> one score per input column`` of the
    linear reading the structures (``o_proj``, ``down_proj``); ``bias_shift``, optional:
    ``(weight, statistic, removed_columns) -> what to add to that linear's output bias``;
    ``head_score_power``: a head's score sums its columns' scores each raised to this power (FLAP's
    reference squares them).
    """

    prune_weight: Ref | None = None
    default_pool: str | None = None  # None: data-free
    accumulator: Ref | None = None
    prepare: Ref | None = None
    plain_pools: bool = True  # whether pools without ranked candidates (see plain_pools()) may be used
    allocation: Allocation = "uniform"  # default per-matrix sparsity allocation
    summary: str = ""
    column_scores: Ref | None = None
    bias_shift: Ref | None = None
    head_score_power: int = 1

    def __post_init__(self) -> None:
        if (self.prune_weight is None) == (self.column_scores is None):
            raise ValueError("a method has exactly one of prune_weight (unstructured) or column_scores (structured)")
        if self.column_scores is not None and self.accumulator is None:
            raise ValueError("a structured method needs an accumulator: its scores come from calibration")

    @property
    def needs_calibration(self) -> bool:
        return self.accumulator is not None

    @property
    def structured(self) -> bool:
        """Whether the method removes whole heads and channels (``column_scores``) rather than weights."""
        return self.column_scores is not None


POOLS: Registry[Pool] = Registry("pool")
METHODS: Registry[Method] = Registry("method")


def register_pool(name: str, pool: Pool, *, replace: bool = False) -> Pool:
    """Make ``pool`` available as ``--pool name`` / ``PruneConfig(pool=name)`` everywhere."""
    return POOLS.register(name, pool, replace=replace)


def register_method(name: str, method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available as ``--method name`` / ``PruneConfig(method=name)`` everywhere."""
    if method.default_pool is not None and method.default_pool not in POOLS:
        raise ValueError(f"method '{name}' defaults to pool '{method.default_pool}', which is not registered")
    return METHODS.register(name, method, replace=replace)


def saliency_pools() -> dict[str, dict[str, str]]:
    """Saliency name -> {budget rule: pool name} for the pools that rank visual candidates."""
    found: dict[str, dict[str, str]] = {}
    for name, pool in POOLS.items():
        if pool.saliency and pool.budget != "none":
            found.setdefault(pool.saliency, {})[pool.budget] = name
    return found


def plain_pools() -> tuple[str, ...]:
    """Pools without ranked visual candidates (mixed, text, visual, amia): a method that sets its own
    visual budget (``plain_pools=False``, i.e. ATV) refuses them."""
    return tuple(name for name, pool in POOLS.items() if pool.budget == "none")


_POOLS = "atv_prune.algorithms.pools:"
for _name, _pool in {
    "mixed": Pool(_POOLS + "mixed_pool", summary="all tokens"),
    "text": Pool(_POOLS + "text_pool", summary="text tokens only"),
    "visual": Pool(_POOLS + "visual_pool", summary="visual tokens only"),
    "atv": Pool(_POOLS + "drift_pool", "adaptive", saliency="drift",
                summary="text + visual tokens of largest drift, adaptive budget"),
    "drift-fixed": Pool(_POOLS + "drift_pool", "fixed", saliency="drift",
                        summary="text + top visual_ratio of visual tokens by drift"),
    "random": Pool(_POOLS + "random_pool", "adaptive", saliency="random",
                   summary="text + random visual tokens, ATV's budget"),
    "random-fixed": Pool(_POOLS + "random_pool", "fixed", saliency="random",
                         summary="text + random visual_ratio of visual tokens"),
    "abs": Pool(_POOLS + "attention_pool", "adaptive", needs_attention=True, saliency="abs",
                summary="text + visual tokens most attended by text, adaptive budget"),
    "abs-fixed": Pool(_POOLS + "attention_pool", "fixed", needs_attention=True, saliency="abs",
                      summary="text + top visual_ratio of visual tokens by text attention"),
    "abs-rel": Pool(_POOLS + "relative_attention_pool", "adaptive", needs_attention=True, saliency="abs-rel",
                    summary="as abs, with the budget from attention relative to uniform (s * n), scale-free"),
    "abs-rel-fixed": Pool(_POOLS + "relative_attention_pool", "fixed", needs_attention=True, saliency="abs-rel",
                          summary="as abs-fixed (the same tokens: a fixed budget ignores the saliency's scale)"),
    "dbs": Pool(_POOLS + "diversity_pool", "adaptive", saliency="dbs",
                summary="text + max-min diverse visual tokens, adaptive budget"),
    "dbs-fixed": Pool(_POOLS + "diversity_pool", "fixed", saliency="dbs",
                      summary="text + visual_ratio of visual tokens, max-min diverse"),
    "amia": Pool(_POOLS + "amia_pool", needs_attention=True,
                 summary="TAMP: attention- and diversity-guided tokens of both modalities, attention-weighted"),
}.items():
    register_pool(_name, _pool)

_PRUNE = "atv_prune.algorithms.prune:"
_SQUARES = "atv_prune.algorithms.scoring:SquaredInputs"
for _name, _method in {
    "magnitude": Method(_PRUNE + "magnitude_prune", summary="|W|, no calibration data"),
    "wanda": Method(_PRUNE + "wanda_prune", "mixed", _SQUARES, summary="|W| * sqrt(mean sum x^2)"),
    "atv": Method(_PRUNE + "wanda_prune", "atv", _SQUARES, plain_pools=False,
                  summary="Wanda scores on all text tokens plus drift-selected visual tokens"),
    "tamp": Method(_PRUNE + "wanda_prune", "amia", _SQUARES, allocation="das",
                   summary="TAMP: Wanda scores on AMIA-selected, attention-weighted tokens; DAS sparsity"),
    "sparsegpt": Method(_PRUNE + "sparsegpt_prune_weight", "mixed", "atv_prune.algorithms.sparsegpt:HessianSum",
                        "atv_prune.algorithms.sparsegpt:prepare_hessian",
                        summary="OBS update with H = (2/N) sum x x^T, any pool"),
}.items():
    register_method(_name, _method)

_STRUCTURED = "atv_prune.algorithms.structured:"
for _name, _method in {
    "wanda-sp": Method(default_pool="mixed", accumulator=_SQUARES, column_scores=_STRUCTURED + "wanda_columns",
                       summary="structured Wanda: heads/channels by sum |W| * sqrt(mean sum x^2) of their columns"),
    "flap": Method(default_pool="mixed", accumulator=_STRUCTURED + "InputMoments",
                   column_scores=_STRUCTURED + "fluctuation_columns", bias_shift=_STRUCTURED + "mean_shift",
                   head_score_power=2,
                   summary="FLAP: heads/channels by input variance * ||W column||^2, bias compensation"),
}.items():
    register_method(_name, _method)

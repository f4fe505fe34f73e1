"""How many ranked visual candidates of a sample join a block's statistics: one :class:`Budget`.

ATV's adaptive budget depends on the block's mean visual saliency, known only after the last
sample; :meth:`Budget.limit` bounds every budget the rule can give before that mean is known (so
the engine parks at most that many candidates per sample), and :meth:`Budget.resolve` gives the
final one. Both are pure functions of token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .specs import BudgetRule


@dataclass(frozen=True)
class Budget:
    """A pool's visual budget rule with its settings.

    ``adaptive`` (ATV, METHOD.md): ``K_j = min(n_vis, round(min(1, alpha * s_bar) * n_text))``;
    ``fixed``: ``min(n_vis, round(ratio * n_vis))``; ``none``: the pool has no ranked candidates.
    """

    rule: BudgetRule
    alpha: float = 1.0
    ratio: float = 0.1

    def limit(self, n_visual: int, n_text: int) -> int:
        """The most candidates the final budget can take: ``min(n_vis, n_text)`` for the adaptive
        rule (``min(1, alpha * s_bar) <= 1``), the budget itself for the fixed one."""
        if self.rule == "adaptive":
            return min(n_visual, n_text)
        if self.rule == "fixed":
            return self.resolve(n_visual, n_text, 0.0)
        return 0

    def resolve(self, n_visual: int, n_text: int, block_mean: float) -> int:
        """The sample's budget once the block's mean saliency ``block_mean`` is known."""
        if self.rule == "adaptive":
            return min(n_visual, round(min(1.0, self.alpha * block_mean) * n_text))
        if self.rule == "fixed":
            return min(n_visual, round(self.ratio * n_visual))
        return 0

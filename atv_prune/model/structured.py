"""Structured pruning on the layer-wise engine: whole attention heads and MLP channels, block by block.

The statistics pass is the engine's own (:class:`~.engine.LayerwisePruner`): the same pools,
budgets and accumulators, here on the inputs of the linears that *read* the structures
(``o_proj`` for heads, ``down_proj`` for channels). Then, per block, the method scores every input
column, the units (a key/value group of heads, or one channel) with the lowest summed score are
removed — the same number in every block — and a :class:`Surgery` edits the block: the physical
shrink of :mod:`.shrink` for a model to save, or e.g. the MoT probe's masking of one pathway. The
propagation pass then runs the edited block, so block l+1 is calibrated on block l as pruned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.structured import lowest_units, unit_columns_of, unit_scores
from ..registry import resolve_ref
from .capture import CapturedSample
from .engine import LayerwisePruner, PrunePlan, PruneTarget
from .layout import ModelLayout

#: The per-block report's key for each kind's removed units: key/value groups (under multi-head
#: attention, heads), and MLP channels.
REMOVED_KEYS = {"heads": "removed_kv_groups", "channels": "removed_channels"}


@dataclass(frozen=True)
class StructureUnits:
    """One kind of structure in one block: the linear reading it (whose input feeds the statistics),
    how many of its input columns make one unit, and how many units this block loses."""

    kind: str  # "heads" (a key/value group of query heads) or "channels"
    target: PruneTarget
    unit_columns: int
    removed: int


@dataclass(frozen=True)
class Cut:
    """The decision for one kind of structure in one block."""

    kind: str
    removed: torch.Tensor  # unit indices, ascending
    unit_columns: int
    bias_shift: torch.Tensor | None  # fp32, added to the reading linear's output bias (FLAP)

    @property
    def columns(self) -> torch.Tensor:
        """The reading linear's input columns that go."""
        return unit_columns_of(self.removed, self.unit_columns)


class Surgery(Protocol):
    """How structures are found in a block and how a block is edited once they are chosen."""

    def units(self, block: nn.Module, prefix: str) -> list[StructureUnits]:
        """The block's structures to cut (none when nothing is removed)."""

    def apply(self, block: nn.Module, prefix: str, cuts: list[Cut]) -> dict[str, tuple[int, int]]:
        """Edit ``block``; return, for every linear of the block it handles, (weights removed, weights before)."""

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Called once after the last block (e.g. to update the config); returns the report's summary."""


#: ``(model, layout, structure, ratio, compensate) -> Surgery``; :func:`.shrink.shrink_surgery` by default.
SurgeryFactory = Callable[[nn.Module, ModelLayout, str, float, bool], Surgery]


class StructuredPruner(LayerwisePruner):
    """The engine's block walk and statistics pass with a structured decision per block.

    ``compensate``: compute the method's bias shift for what each block loses (FLAP)."""

    def __init__(self, plan: PrunePlan, device: torch.device, surgery: Surgery, *, compensate: bool,
                 offload_device: torch.device | str = "cpu", progress: bool = True) -> None:
        super().__init__(plan, device, self._find_units, offload_device=offload_device, progress=progress)
        self.surgery = surgery
        self.compensate = compensate
        self.removed: list[dict[str, list[int]]] = []  # per block: the unit indices removed (REMOVED_KEYS)
        self._units: list[StructureUnits] = []
        self._prefix = ""

    def _find_units(self, block: nn.Module, prefix: str) -> list[PruneTarget]:
        """The engine's target finder: the reading linears of this block's structures (kept for
        the decision that follows the statistics pass)."""
        self._units, self._prefix = self.surgery.units(block, prefix), prefix
        return [units.target for units in self._units]

    def _prune_calibrated(self, block: nn.Module, index: int, targets: list[PruneTarget],
                          samples: list[CapturedSample], bar: tqdm) -> None:
        statistics, group_of, _ = self._statistics(block, index, targets, samples, bar)
        start = time.perf_counter()
        cuts = [self._cut(units, statistics[group_of[units.target.name]]) for units in self._units]
        sizes = self.surgery.apply(block, self._prefix, cuts)
        for name, (removed, total) in sizes.items():
            self.result.sparsity[name] = removed / total
            self.result.sizes[name] = total
        self.removed.append({REMOVED_KEYS[cut.kind]: cut.removed.tolist() for cut in cuts})
        self.result.seconds["masks"] += time.perf_counter() - start

    @torch.no_grad()
    def _cut(self, units: StructureUnits, statistic: torch.Tensor) -> Cut:
        """Score the reading linear's columns, remove the lowest-scoring units, and (FLAP) the bias
        shift that makes up for their mean contribution."""
        method = self.plan.method
        weight = units.target.weight
        columns = resolve_ref(method.column_scores)(weight, statistic)
        if units.kind == "heads":
            columns = columns.pow(method.head_score_power)
        scores = unit_scores(columns, units.unit_columns)
        removed = lowest_units(scores, units.removed)
        shift = None
        if self.compensate and removed.numel():
            shift = resolve_ref(method.bias_shift)(weight, statistic, unit_columns_of(removed, units.unit_columns))
        return Cut(units.kind, removed, units.unit_columns, shift)

"""The layer-wise calibration engine shared by every activation-aware method (METHOD.md).

For block l = 0..L-1 (blocks < l already pruned), on the compute device:

1. statistics pass — the dense block runs once per sample; hooks record the per-token inputs
   of its linears (linears fed by the same tensor, q/k/v and gate/up, share one record); the
   pool picks tokens from that same forward (ATV's drift comes from its output), and the
   method's accumulator takes their rows;
2. each weight is pruned by the method from its statistic (Wanda: masks from scores; SparseGPT:
   the OBS update);
3. propagation pass — the pruned block runs once per sample (:func:`~.walk.walk_blocks`); its
   outputs are block l+1's inputs.

Two forwards per sample per block, whatever the pool. A pool's ranked visual candidates wait
(on the offload device, at most :meth:`Budget.limit` per sample) until the block's mean saliency
fixes each sample's budget (:meth:`Budget.resolve`).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.allocation import allocate_sparsity, das_importance, output_similarity_sums
from ..algorithms.budget import Budget
from ..algorithms.masks import check_pattern
from ..algorithms.pools import PoolChoice, SampleView, drift_of
from ..algorithms.specs import Method, Pool
from ..errors import UnsupportedModelError
from ..registry import resolve_ref
from .attention import recording_attention
from .capture import CapturedSample, run_block, to_compute
from .walk import BlockHome, ResidentBlocks, check_finite, walk_blocks


@dataclass(frozen=True)
class PruneTarget:
    """One weight to prune and the module whose input feeds its statistics."""

    name: str
    input_module: nn.Module
    weight: nn.Parameter


TargetFinder = Callable[[nn.Module, str], list[PruneTarget]]


@dataclass(frozen=True)
class PrunePlan:
    """What the engine prunes with, resolved from a config by the caller: the method, the pool and
    its budget, the target (``sparsity`` or N:M ``pattern``), the allocation and the seed."""

    method: Method
    pool: Pool | None
    budget: Budget
    sparsity: float | None
    pattern: tuple[int, int] | None
    allocation: str = "uniform"
    seed: int = 0
    label: str = ""


def linear_targets(block: nn.Module, prefix: str) -> list[PruneTarget]:
    """Every ``nn.Linear`` inside a decoder block.

    Blocks holding other matrix weights (fused MoE experts, convolutions) are refused rather than
    reported as pruned while those weights stay dense.
    """
    linear_weights = {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear)}
    other = [name for name, p in block.named_parameters() if p.dim() >= 2 and id(p) not in linear_weights]
    if other:
        raise UnsupportedModelError(
            f"{prefix} holds matrix weights outside nn.Linear ({', '.join(other[:3])}): mixture-of-experts "
            "and other non-linear blocks are not supported; use a dense model"
        )
    return [
        PruneTarget(f"{prefix}.{name}", module, module.weight)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]


def check_targets(blocks: nn.ModuleList, prefix: str, pattern: tuple[int, int] | None,
                  find_targets: TargetFinder = linear_targets) -> None:
    """Refuse, before any calibration work, blocks the pruner cannot handle and an N:M pattern
    that does not divide some target's in_features (works on a meta-device model too)."""
    for index, block in enumerate(blocks):
        for target in find_targets(block, f"{prefix}.{index}"):
            if pattern is not None:
                check_pattern(pattern, target.weight.shape[1], target.name)


@dataclass
class BlockReport:
    """What happened in one block, for the pruning report."""

    index: int
    mean_drift: float | None = None
    visual_tokens_per_sample: float | None = None
    text_tokens_per_sample: float | None = None
    #: Samples with visual tokens of which the pool kept none (an adaptive budget that rounded to 0).
    samples_without_visual: int | None = None


@dataclass
class EngineResult:
    blocks: list[BlockReport] = field(default_factory=list)
    sparsity: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class _InputRecorder:
    """Forward pre-hooks that keep each distinct linear input of the current sample.

    Linears called with the very same tensor (q/k/v, gate/up) are grouped under the first
    one that saw it, so their statistics are accumulated once.
    """

    def __init__(self, targets: list[PruneTarget]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.group_of: dict[str, str] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}  # keeps each input alive so ids stay unique
        by_module: dict[int, list[str]] = defaultdict(list)
        modules: dict[int, nn.Module] = {}
        for target in targets:
            by_module[id(target.input_module)].append(target.name)
            modules[id(target.input_module)] = target.input_module
        self._handles = [
            modules[key].register_forward_pre_hook(self._hook(names)) for key, names in by_module.items()
        ]

    def _hook(self, names: list[str]):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            leader = self._seen.setdefault(id(x), (names[0], x))[0]
            if leader == names[0]:
                self.inputs.setdefault(leader, x)
            for name in names:
                self.group_of[name] = leader

        return hook

    def start_sample(self) -> None:
        self.inputs.clear()
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _OutputDiversity:
    """Forward hooks accumulating, per target, the similarity of its outputs among visual tokens,
    among text tokens and between them (for DAS)."""

    def __init__(self, targets: list[PruneTarget]) -> None:
        self._outputs: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._samples = 0
        self._handles = [t.input_module.register_forward_hook(self._hook(t.name)) for t in targets]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._outputs[name] = output

        return hook

    def finish_sample(self, visual: torch.Tensor) -> None:
        for name, output in self._outputs.items():
            similarity = output_similarity_sums(output, visual)
            self._sums[name] = similarity if name not in self._sums else self._sums[name] + similarity
        self._outputs.clear()
        self._samples += 1

    def importance(self) -> dict[str, float]:
        return {name: das_importance(total / self._samples) for name, total in self._sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _token_rows(x: torch.Tensor, seq_len: int, name: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] != seq_len:
        raise UnsupportedModelError(
            f"{name} sees {rows.shape[0]} token rows for a {seq_len}-token sample (routed experts?): "
            "token pools need every linear to see every token; use a dense model"
        )
    return rows


def _generator(seed: int, block: int, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + block * 10_007 + sample)


class _BlockStatistics:
    """The statistics of one block's input groups over the samples seen so far: each sample's fixed
    tokens go into the method's accumulators at once, its ranked candidates wait for the budget."""

    def __init__(self, method: Method, budget: Budget, device: torch.device) -> None:
        self.make_accumulator = resolve_ref(method.accumulator)
        self.budget = budget
        self.device = device
        self.accumulators: dict[str, Any] = {}
        self.waiting: list[tuple[PoolChoice, dict[str, torch.Tensor]]] = []
        self.saliency_sum = 0.0
        self.drift_sum, self.drift_count = 0.0, 0

    def add(self, inputs: dict[str, torch.Tensor], seq_len: int, choice: PoolChoice, drift: torch.Tensor,
            limit: int, park_on: torch.device | str) -> None:
        """One ``seq_len``-token sample (``inputs``: each group's linear input): its fixed rows now, at
        most ``limit`` ranked candidates parked on ``park_on``."""
        limit = min(limit, len(choice.ranked)) if choice.ranked is not None else 0
        parked = {}
        for leader, x in inputs.items():
            rows = _token_rows(x, seq_len, leader)
            if leader not in self.accumulators:
                self.accumulators[leader] = self.make_accumulator(rows.shape[1], self.device)
            self.accumulators[leader].add(rows[choice.fixed], choice.weights)
            if limit:
                parked[leader] = rows[choice.ranked[:limit]].to(park_on)
        self.waiting.append((choice, parked))
        self.saliency_sum += choice.saliency_sum
        self.drift_sum, self.drift_count = self.drift_sum + float(drift.sum()), self.drift_count + drift.numel()

    def finish(self, index: int) -> tuple[dict[str, torch.Tensor], BlockReport]:
        """Resolve every sample's budget from the block mean, add the chosen candidates, and return
        each group's statistic with the block's report."""
        block_mean = self.saliency_sum / max(1, sum(choice.n_visual for choice, _ in self.waiting))
        visual_selected = without_visual = 0
        for choice, parked in self.waiting:
            budget = self.budget.resolve(choice.n_visual, choice.n_text, block_mean)
            visual_selected += choice.visual_selected + budget
            without_visual += choice.n_visual > 0 and choice.visual_selected + budget == 0
            for leader, rows in parked.items():
                if budget:
                    self.accumulators[leader].add(rows[:budget].to(self.device))
        samples = len(self.waiting)
        statistics = {leader: accumulator.finish(samples) for leader, accumulator in self.accumulators.items()}
        for leader, statistic in statistics.items():
            check_finite(statistic, f"input statistics of {leader}")
        report = BlockReport(index, mean_drift=self.drift_sum / self.drift_count if self.drift_count else None,
                             visual_tokens_per_sample=visual_selected / samples,
                             text_tokens_per_sample=sum(choice.n_text for choice, _ in self.waiting) / samples,
                             samples_without_visual=without_visual)
        return statistics, report


class LayerwisePruner:
    """Walks the decoder blocks of a captured model and prunes them one by one."""

    def __init__(self, plan: PrunePlan, device: torch.device, find_targets: TargetFinder = linear_targets,
                 *, offload_device: torch.device | str = "cpu", progress: bool = True) -> None:
        self.plan = plan
        self.device = device
        self.offload_device = offload_device
        self.find_targets = find_targets
        self.progress = progress
        self.result = EngineResult()

    def prune(self, blocks: nn.ModuleList, prefix: str, samples: list[CapturedSample],
              home: BlockHome | None = None) -> EngineResult:
        """Prune every block: statistics from ``samples`` (none for a data-free method), masks,
        then propagation of the samples through the pruned block. ``home``: where the blocks'
        weights live between their turns (default: in memory)."""
        steps = len(blocks) * len(samples) * 2 - len(samples) if samples else len(blocks)
        home = ResidentBlocks() if home is None else home
        with tqdm(total=steps, desc=self.plan.label or "pruning", unit="fwd" if samples else "block",
                  disable=not self.progress) as bar:
            for index, block in walk_blocks(blocks, samples, self.device, seconds=self.result.seconds,
                                            tick=lambda: bar.update(1), home=home):
                bar.set_description(f"block {index + 1}/{len(blocks)}")
                self._prune_block(block, index, prefix, samples, bar)
        self.result.seconds.update(home.seconds)
        return self.result

    def _prune_block(self, block: nn.Module, index: int, prefix: str, samples: list[CapturedSample],
                     bar: tqdm) -> None:
        """One block's statistics and pruning (its targets are let go when it returns, before the
        walk fetches the next block)."""
        targets = self.find_targets(block, f"{prefix}.{index}")
        for target in targets:
            check_finite(target.weight, f"weights in {target.name}")
        if samples:
            self._prune_calibrated(block, index, targets, samples, bar)
        else:
            self._prune_data_free(index, targets)
            bar.update(1)

    def _prune_data_free(self, index: int, targets: list[PruneTarget]) -> None:
        start = time.perf_counter()
        for target in targets:
            self._apply(target, None)
        self.result.seconds["masks"] += time.perf_counter() - start
        self.result.blocks.append(BlockReport(index))

    def _prune_calibrated(self, block: nn.Module, index: int, targets: list[PruneTarget],
                          samples: list[CapturedSample], bar: tqdm) -> None:
        statistics, group_of, sparsity = self._statistics(block, index, targets, samples, bar)
        start = time.perf_counter()
        for target in targets:
            if target.name not in group_of:
                raise RuntimeError(f"{target.name} was never called during the block's forward")
        for target, statistic in self._prepared(targets, statistics, group_of):
            self._apply(target, statistic, sparsity.get(target.name))
        self.result.seconds["masks"] += time.perf_counter() - start

    @torch.no_grad()
    def _statistics(self, block: nn.Module, index: int, targets: list[PruneTarget],
                    samples: list[CapturedSample], bar: tqdm
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
        """Statistics pass: per input group, the method's statistic over the pool's tokens; also the
        per-target sparsity when the allocation is not uniform (DAS)."""
        start = time.perf_counter()
        plan = self.plan
        select = plan.pool.function()
        statistics = _BlockStatistics(plan.method, plan.budget, self.device)
        recorder = _InputRecorder(targets)
        diversity = _OutputDiversity(targets) if plan.allocation == "das" else None
        try:
            for number, sample in enumerate(samples):
                recorder.start_sample()
                hidden, visual = to_compute(sample.hidden, self.device), sample.visual.to(self.device)
                output, attention = self._dense_forward(block, index, sample, hidden, visual)
                n_visual = int(visual.sum())
                limit = plan.budget.limit(n_visual, visual.numel() - n_visual)
                drift = drift_of(hidden[0], output[0], visual)
                view = SampleView(visual, hidden[0], output[0], _generator(plan.seed, index, number), limit=limit,
                                  drift=drift, **attention)
                choice = select(view)
                if diversity is not None:
                    diversity.finish_sample(visual)
                statistics.add(recorder.inputs, visual.numel(), choice, drift, limit, self.offload_device)
                bar.update(1)
        finally:
            recorder.remove()
            if diversity is not None:
                diversity.remove()
        results, report = statistics.finish(index)
        self.result.blocks.append(report)
        self.result.seconds["statistics"] += time.perf_counter() - start
        sparsity = {}
        if diversity is not None:
            sparsity = allocate_sparsity(diversity.importance(), {t.name: tuple(t.weight.shape) for t in targets},
                                         plan.sparsity)
        return results, dict(recorder.group_of), sparsity

    def _dense_forward(self, block: nn.Module, index: int, sample: CapturedSample, hidden: torch.Tensor,
                       visual: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The dense block's output for one sample, with the attention each token received when
        the pool needs it."""
        if not self.plan.pool.needs_attention:
            output = run_block(block, sample, index, hidden)
            attention = {}
        else:
            with recording_attention(block, ~visual) as record:
                output = run_block(block, sample, index, hidden)
            attention = {"attention_from_text": record.from_text, "attention_from_last": record.from_last}
        check_finite(output, f"activations at block {index} for sample {sample.source}")
        return output, attention

    def _prepared(self, targets: list[PruneTarget], statistics: dict[str, torch.Tensor],
                  group_of: dict[str, str]) -> Iterator[tuple[PruneTarget, Any]]:
        """Each target with what its method prunes from: the group's statistic, or the method's
        preparation of it (made once per input group, freed after the group's last weight)."""
        if self.plan.method.prepare is None:
            yield from ((target, statistics[group_of[target.name]]) for target in targets)
            return
        prepare = resolve_ref(self.plan.method.prepare)
        remaining = Counter(group_of[target.name] for target in targets)
        prepared: dict[str, Any] = {}
        for target in targets:
            group = group_of[target.name]
            if group not in prepared:
                prepared[group] = prepare(statistics[group])
            yield target, prepared[group]
            remaining[group] -= 1
            if not remaining[group]:
                del prepared[group]

    @torch.no_grad()
    def _apply(self, target: PruneTarget, statistic: Any, sparsity: float | None = None) -> None:
        prune_weight = resolve_ref(self.plan.method.prune_weight)
        target_sparsity = self.plan.sparsity if sparsity is None else sparsity
        pruned = prune_weight(target.weight.data, statistic, target_sparsity, self.plan.pattern)
        target.weight.data.copy_(pruned)
        self.result.sparsity[target.name] = 1.0 - int(torch.count_nonzero(target.weight)) / target.weight.numel()
        self.result.sizes[target.name] = target.weight.numel()

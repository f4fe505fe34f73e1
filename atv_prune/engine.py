"""The layer-wise calibration engine shared by every activation-aware method.

For block l = 0..L-1 (blocks < l already pruned):

1. statistics pass — the dense block runs once per sample; hooks record the per-token inputs
   of its linears (linears fed by the same tensor, q/k/v and gate/up, share one record); the
   pool picks tokens from that same forward (ATV's drift comes from its output), and their
   squared inputs are accumulated in fp32;
2. each weight is pruned by the method from its statistic (Wanda: masks from scores; SparseGPT:
   the OBS update);
3. propagation pass — the pruned block runs once per sample; its outputs are block l+1's inputs.

Two forwards per sample per block, whatever the pool. Calibration activations live on the
offload device; the compute device holds one block and one sample's activations. ATV-style pools
park the linear inputs of each sample's visual candidates (at most as many as its text tokens) on
the offload device until the block-level budget is known.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import CapturedSample, module_device, next_input, run_block
from .config import PruneConfig
from .errors import ConfigError, NumericalError, UnsupportedModelError
from .allocation import allocate_sparsity, das_importance, output_similarity_sums
from .attention import recording_attention
from .pools import (POOLS, PoolChoice, SampleView, adaptive_budget, budget_cap, drift_of, fixed_budget,
                    ranking_limit)


@dataclass(frozen=True)
class PruneTarget:
    """One weight to prune and the module whose input feeds its statistics."""

    name: str
    input_module: nn.Module
    weight: nn.Parameter


TargetFinder = Callable[[nn.Module, str], list[PruneTarget]]


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


def check_targets(blocks: nn.ModuleList, prefix: str, config: PruneConfig,
                  find_targets: TargetFinder = linear_targets) -> None:
    """Refuse, before any calibration work, blocks the pruner cannot handle and an N:M pattern
    that does not divide some target's in_features (works on a meta-device model too)."""
    for index, block in enumerate(blocks):
        for target in find_targets(block, f"{prefix}.{index}"):
            if config.pattern is not None and target.weight.shape[1] % config.pattern[1]:
                n, m = config.pattern
                raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, but {target.name} has "
                                  f"{target.weight.shape[1]}: choose another M")


@dataclass
class BlockReport:
    """What happened in one block, for the pruning report."""

    index: int
    mean_drift: float | None = None
    visual_tokens_per_sample: float | None = None
    text_tokens_per_sample: float | None = None


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


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NumericalError(f"non-finite {what}: the model overflows or is corrupt; try --dtype float32")


def _generator(seed: int, block: int, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + block * 10_007 + sample)


def _token_rows(x: torch.Tensor, seq_len: int, name: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] != seq_len:
        raise UnsupportedModelError(
            f"{name} sees {rows.shape[0]} token rows for a {seq_len}-token sample (routed experts?): "
            "token pools need every linear to see every token; use a dense model"
        )
    return rows


class LayerwisePruner:
    """Walks the decoder blocks of a captured model and prunes them one by one."""

    def __init__(self, config: PruneConfig, device: torch.device, find_targets: TargetFinder = linear_targets) -> None:
        self.config = config
        self.device = device
        self.find_targets = find_targets
        self.result = EngineResult()

    def prune_data_free(self, blocks: nn.ModuleList, prefix: str) -> EngineResult:
        """Data-free pruning (magnitude), block by block on the compute device."""
        for index, block in enumerate(tqdm(blocks, desc=self.config.method, disable=not self.config.progress)):
            home = module_device(block)
            block.to(self.device)
            start = time.perf_counter()
            try:
                for target in self.find_targets(block, f"{prefix}.{index}"):
                    _check_finite(target.weight, f"weights in {target.name}")
                    self._apply(target, None)
            finally:
                block.to(home)
            self.result.seconds["masks"] += time.perf_counter() - start
            self.result.blocks.append(BlockReport(index))
        return self.result

    def prune_calibrated(self, blocks: nn.ModuleList, prefix: str, samples: list[CapturedSample]) -> EngineResult:
        """Activation-aware pruning: statistics pass, pruning, propagation pass per block."""
        steps = len(blocks) * len(samples) * 2 - len(samples)
        with tqdm(total=steps, desc="pruning", unit="fwd", disable=not self.config.progress) as bar:
            for index, block in enumerate(blocks):
                home = module_device(block)
                block.to(self.device)
                try:
                    self._prune_block(block, index, len(blocks), prefix, samples, bar)
                finally:
                    block.to(home)
        return self.result

    def _prune_block(self, block: nn.Module, index: int, n_blocks: int, prefix: str,
                     samples: list[CapturedSample], bar: tqdm) -> None:
        """Statistics pass, pruning and (except after the last block) propagation for one block."""
        targets = self.find_targets(block, f"{prefix}.{index}")
        for target in targets:
            _check_finite(target.weight, f"weights in {target.name}")
        bar.set_description(f"block {index + 1}/{n_blocks} statistics")
        statistics, group_of, sparsity = self._statistics(block, index, targets, samples, bar)
        bar.set_description(f"block {index + 1}/{n_blocks} masks")
        start = time.perf_counter()
        for target in targets:
            if target.name not in group_of:
                raise RuntimeError(f"{target.name} was never called during the block's forward")
        for target, statistic in self._prepared(targets, statistics, group_of):
            self._apply(target, statistic, sparsity.get(target.name))
        self.result.seconds["masks"] += time.perf_counter() - start
        if index + 1 < n_blocks:
            bar.set_description(f"block {index + 1}/{n_blocks} propagation")
            self._propagate(block, index, samples, bar)

    def _prepared(self, targets: list[PruneTarget], statistics: dict[str, torch.Tensor],
                  group_of: dict[str, str]) -> Iterator[tuple[PruneTarget, Any]]:
        """Each target with what its method prunes from: the group's statistic, or the method's
        preparation of it (made once per input group, freed after the group's last weight)."""
        prepare = self.config.method_spec.prepare
        if prepare is None:
            yield from ((target, statistics[group_of[target.name]]) for target in targets)
            return
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
        method = self.config.method_spec
        target_sparsity = self.config.sparsity if sparsity is None else sparsity
        pruned = method.prune_weight(target.weight.data, statistic, target_sparsity, self.config.pattern)
        target.weight.data.copy_(pruned)
        self.result.sparsity[target.name] = float((target.weight == 0).float().mean())
        self.result.sizes[target.name] = target.weight.numel()

    @torch.no_grad()
    def _statistics(
        self, block: nn.Module, index: int, targets: list[PruneTarget], samples: list[CapturedSample], bar: tqdm
    ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
        """Statistics pass: per input group, the method's statistic over the pool's tokens; also the
        per-target sparsity when the allocation is not uniform."""
        start = time.perf_counter()
        pool = POOLS[self.config.resolved_pool]
        statistic = self.config.method_spec.statistic
        recorder = _InputRecorder(targets)
        diversity = _OutputDiversity(targets) if self.config.resolved_allocation == "das" else None
        sums: dict[str, torch.Tensor] = {}
        choices: list[PoolChoice] = []
        candidates: list[dict[str, torch.Tensor]] = []
        drift_sum, visual_count = 0.0, 0
        try:
            for sample_index, sample in enumerate(samples):
                recorder.start_sample()
                hidden = sample.hidden.to(self.device)
                visual = sample.visual.to(self.device)
                if pool.needs_attention:
                    with recording_attention(block, ~visual) as attention:
                        output = run_block(block, sample, index, hidden)
                    received = dict(attention_from_text=attention.from_text, attention_from_last=attention.from_last)
                else:
                    output, received = run_block(block, sample, index, hidden), {}
                _check_finite(output, f"activations at block {index} for sample {sample.source}")
                n_visual = int(visual.sum())
                limit = ranking_limit(pool, n_visual, visual.numel() - n_visual, self.config.visual_ratio)
                drift = drift_of(hidden[0], output[0], visual)
                view = SampleView(visual, hidden[0], output[0], _generator(self.config.seed, index, sample_index),
                                  rank_limit=limit, drift=drift, **received)
                choice = pool.select(view)
                if diversity is not None:
                    diversity.finish_sample(visual)
                drift_sum, visual_count = drift_sum + float(drift.sum()), visual_count + drift.numel()
                cap = budget_cap(pool, choice, self.config.visual_ratio)
                kept = {}
                for leader, x in recorder.inputs.items():
                    rows = _token_rows(x, visual.numel(), leader)
                    picked = rows[choice.fixed]
                    if choice.weights is not None:
                        picked = picked.float() * choice.weights.sqrt().unsqueeze(1)
                    total = statistic(picked)
                    sums[leader] = total if leader not in sums else sums[leader] + total
                    if cap:  # parked on the offload device until the block-level budget is known
                        kept[leader] = rows[choice.ranked[:cap]].to(sample.hidden.device)
                choices.append(choice)
                candidates.append(kept)
                bar.update(1)
        finally:
            recorder.remove()
            if diversity is not None:
                diversity.remove()
        visual_selected = [c.visual_selected for c in choices]
        if pool.budget != "none":
            saliency = sum(c.saliency_sum for c in choices) / max(1, sum(c.n_visual for c in choices))
            for position, (choice, kept) in enumerate(zip(choices, candidates)):
                if pool.budget == "adaptive":
                    budget = adaptive_budget(choice.n_visual, choice.n_text, saliency, self.config.alpha)
                else:
                    budget = fixed_budget(choice.n_visual, self.config.visual_ratio)
                visual_selected[position] += budget
                for leader, rows in kept.items():
                    if budget:
                        sums[leader] += statistic(rows[:budget].to(self.device))
        scale = self.config.method_spec.scale / len(samples)
        results = {leader: total * scale for leader, total in sums.items()}
        for leader, result in results.items():
            _check_finite(result, f"input statistics of {leader}")
        self.result.blocks.append(BlockReport(
            index,
            mean_drift=drift_sum / visual_count if visual_count else None,
            visual_tokens_per_sample=sum(visual_selected) / len(samples),
            text_tokens_per_sample=sum(c.n_text for c in choices) / len(samples),
        ))
        self.result.seconds["statistics"] += time.perf_counter() - start
        sparsity = {}
        if diversity is not None:
            sparsity = allocate_sparsity(diversity.importance(), {t.name: tuple(t.weight.shape) for t in targets},
                                         self.config.sparsity)
        return results, dict(recorder.group_of), sparsity

    @torch.no_grad()
    def _propagate(self, block: nn.Module, index: int, samples: list[CapturedSample], bar: tqdm) -> None:
        start = time.perf_counter()
        for sample in samples:
            hidden = sample.hidden.to(self.device)
            output = next_input(sample, index, run_block(block, sample, index, hidden))
            _check_finite(output, f"activations after pruned block {index} for sample {sample.source}")
            sample.hidden = output.to(sample.hidden.device)
            bar.update(1)
        self.result.seconds["propagation"] += time.perf_counter() - start

"""Prune one pathway of a MoT probe through atv_prune's engine, leaving the other dense.

Only the targets differ from plain pruning: each routed linear contributes its ``text`` or
``visual`` copy's weight, with the routed module itself as the statistics input. That input
holds every token of the sample, so the configured pool (text, visual, mixed, ATV, ...) decides
which tokens feed the statistics exactly as it does for the original model; pools, scoring,
masks, N:M and seeding are atv_prune's own.

Structured targets (``structure``/``ratio``) remove a pathway's heads or MLP channels: the same
scores and per-block counts as for the original model, on the routed ``o_proj`` / ``down_proj``
inputs, but instead of shrinking the block the pathway's copy of ``o_proj`` / ``down_proj`` loses
those input columns (zeroed; FLAP's compensation goes to that copy's bias). The pathway's tokens
then read nothing from the removed heads and channels, while the other pathway keeps them; a
removed head's keys and values are still computed for the other pathway's queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from atv_prune.model.calibration import CalibrationSet
from atv_prune.model.engine import PruneTarget, TargetFinder
from atv_prune.model.layout import ModelLayout
from atv_prune.model.shrink import DecoderGeometry, removal_for
from atv_prune.model.structured import Cut, StructureUnits, SurgeryFactory
from atv_prune.model.videos import VideoSampling
from atv_prune.runs.api import PruneReport, prune
from atv_prune.runs.config import PruneConfig, RunSettings

from .surgery import PATHWAYS, ModalityRoutedLinear, Pathway, ProbeError, probe_linears


def pathway_targets(pathway: Pathway) -> TargetFinder:
    """A target finder returning, per block, the ``pathway`` copy of every routed linear,
    materialised first so that masking it never touches the other copy."""
    if pathway not in PATHWAYS:
        raise ProbeError(f"unknown pathway '{pathway}': choose 'text' or 'visual'")

    def find(block: nn.Module, prefix: str) -> list[PruneTarget]:
        targets = [
            PruneTarget(f"{prefix}.{name}.{pathway}", module, module.materialise(pathway))
            for name, module in block.named_modules()
            if isinstance(module, ModalityRoutedLinear)
        ]
        if not targets:
            raise ProbeError(f"{prefix} has no routed linears: make the model a probe with make_probe first")
        return targets

    return find


class PathwayStructures:
    """The structured-pruning :class:`~atv_prune.model.structured.Surgery` of one probe pathway: the
    pathway's ``o_proj`` copy loses the removed heads' input columns, its ``down_proj`` copy the
    removed channels' (zeroed in a copy of its own; the other pathway is untouched)."""

    KINDS = {"heads": "o", "channels": "down"}

    def __init__(self, model: nn.Module, layout: ModelLayout, structure: str, ratio: float, pathway: Pathway) -> None:
        self.layout = layout
        self.pathway = pathway
        self.geometry = DecoderGeometry.of(model)
        self.removal = removal_for(self.geometry, structure, ratio)

    def _routed(self, block: nn.Module, prefix: str, role: str) -> tuple[str, ModalityRoutedLinear]:
        found = [(name, module) for name, module in block.named_modules() if isinstance(module, ModalityRoutedLinear)
                 and role in self.layout.family.roles_of(name.rpartition(".")[2])]
        if not found:
            fix = " (make_probe(model, include_o_proj=True); motprobe sensitivity routes it for heads)" \
                if role == "o" else ""
            raise ProbeError(f"{prefix} has no routed linear with role {role}: a pathway's structures are cut in "
                             f"its copy of that linear{fix}")
        return found[0]

    def units(self, block: nn.Module, prefix: str) -> list[StructureUnits]:
        g = self.geometry
        wanted = (("heads", self.removal.kv_groups, g.group_size * g.head_dim),
                  ("channels", self.removal.channels, 1))
        found = []
        for kind, removed, width in wanted:
            if removed:
                name, module = self._routed(block, prefix, self.KINDS[kind])
                target = PruneTarget(f"{prefix}.{name}.{self.pathway}", module, module.materialise(self.pathway))
                found.append(StructureUnits(kind, target, width, removed))
        return found

    @torch.no_grad()
    def apply(self, block: nn.Module, prefix: str, cuts: list[Cut]) -> dict[str, tuple[int, int]]:
        sizes = {}
        for cut in cuts:
            name, module = self._routed(block, prefix, self.KINDS[cut.kind])
            copy = module.copy(self.pathway)
            copy.weight[:, cut.columns.to(copy.weight.device)] = 0
            if cut.bias_shift is not None:
                own = torch.zeros_like(copy.weight[:, 0]) if copy.bias is None else copy.bias.detach().clone()
                copy.bias = nn.Parameter(own + cut.bias_shift.to(own.device, own.dtype),
                                         requires_grad=copy.weight.requires_grad)
            sizes[f"{prefix}.{name}.{self.pathway}"] = (cut.columns.numel() * copy.weight.shape[0],
                                                        copy.weight.numel())
        return sizes

    def finish(self, model: nn.Module) -> dict[str, Any]:
        g, removal = self.geometry, self.removal
        return {"pathway": self.pathway,
                "heads": {"before": g.heads, "after": (g.kv_heads - removal.kv_groups) * g.group_size,
                          "key_value_heads_before": g.kv_heads, "key_value_heads_after": g.kv_heads - removal.kv_groups,
                          "query_heads_per_group": g.group_size, "head_dim": g.head_dim},
                "channels": {"before": g.intermediate, "after": g.intermediate - removal.channels},
                "notes": list(removal.notes)}


def pathway_structures(pathway: Pathway) -> SurgeryFactory:
    """The surgery factory for one pathway's structures (``compensate`` goes to the copy's bias)."""
    if pathway not in PATHWAYS:
        raise ProbeError(f"unknown pathway '{pathway}': choose 'text' or 'visual'")

    def factory(model: nn.Module, layout: ModelLayout, structure: str, ratio: float,
                compensate: bool) -> PathwayStructures:
        return PathwayStructures(model, layout, structure, ratio, pathway)

    return factory


def prune_pathway(
    model: nn.Module,
    processor: Any,
    calibration: CalibrationSet | str | Path | None,
    config: PruneConfig,
    pathway: Pathway,
    *,
    settings: RunSettings | None = None,
    image_root: str | Path | None = None,
    max_pixels: int | None = None,
    max_length: int | None = None,
    video: VideoSampling | None = None,
) -> PruneReport:
    """Prune the ``pathway`` copies of a probe in place with ``config`` (any method, pool,
    sparsity, N:M pattern, or structure and ratio); the other pathway and every unrouted linear
    stay as they are. A calibration file is read as :func:`~atv_prune.runs.api.prune` reads it
    (``image_root``, ``max_pixels``, ``max_length``, ``video``)."""
    routed = probe_linears(model)
    if not routed:
        raise ProbeError("the model is not a MoT probe: call motprobe.make_probe(model) first")
    report = prune(model, processor, calibration, config, settings=settings, image_root=image_root,
                   max_pixels=max_pixels, max_length=max_length, find_targets=pathway_targets(pathway),
                   surgery=pathway_structures(pathway), video=video)
    report.extra["probe"] = {
        "pathway": pathway,
        "routed_linears": sorted({name.rpartition(".")[2] for name in routed}),
    }
    return report

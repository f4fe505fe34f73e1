"""Prune one pathway of a MoT probe through atv_prune's engine, leaving the other dense.

Only the targets differ from plain pruning: each routed linear contributes its ``text`` or
``visual`` copy's weight, with the routed module itself as the statistics input. That input
holds every token of the sample, so the configured pool (text, visual, mixed, ATV, ...) decides
which tokens feed the statistics exactly as it does for the original model; pools, scoring,
masks, N:M and seeding are atv_prune's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from atv_prune.model.calibration import CalibrationSet
from atv_prune.model.engine import PruneTarget, TargetFinder
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
    video: VideoSampling | None = None,
) -> PruneReport:
    """Prune the ``pathway`` copies of a probe in place with ``config`` (any method, pool,
    sparsity or N:M pattern); the other pathway and every unrouted linear stay as they are."""
    routed = probe_linears(model)
    if not routed:
        raise ProbeError("the model is not a MoT probe: call motprobe.make_probe(model) first")
    report = prune(model, processor, calibration, config, settings=settings, image_root=image_root,
                   max_pixels=max_pixels, find_targets=pathway_targets(pathway), video=video)
    report.extra["probe"] = {
        "pathway": pathway,
        "routed_linears": sorted({name.rpartition(".")[2] for name in routed}),
    }
    return report

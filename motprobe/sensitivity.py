"""The pathway-sensitivity study (the paper's Table 1) and the recipe it hands to atv_prune.

Each cell prunes one pathway of the MoT probe (text or visual copies) with one calibration pool
at one target, leaves the other pathway dense, and is evaluated like any pruned model; retention
is relative to the dense model (the unpruned probe equals it). The recipe reads the study at its
highest unstructured sparsity (else its last N:M pattern): the pool that best protects each
pathway, which pathway is the sensitive one, and the calibration pool (and ATV visual budget) to
prune the original model with.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from atv_prune.model.calibration import CalibrationSet
from atv_prune.runs.api import PruneReport
from atv_prune.runs.config import PruneConfig, RunSettings
from atv_prune.runs.recipe import Recipe

from .pathways import prune_pathway
from .surgery import make_probe

#: Retention points within which a pathway is considered indifferent to its calibration pool.
TOLERANCE = 2.0


def prune_probe_pathway(model: nn.Module, processor: Any, calibration: CalibrationSet, config: PruneConfig,
                        settings: RunSettings, extra: dict[str, Any]) -> PruneReport:
    """A study's prune function: turn ``model`` into its probe, prune one pathway (``extra``)."""
    make_probe(model, include_o_proj=extra.get("include_o_proj", False))
    return prune_pathway(model, processor, calibration, config, extra["pathway"], settings=settings)


def table_rows(records: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """Table 1 layout: one row per (pathway, pool), per target the retention of each task and the
    mean (None for a cell that failed)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        pathway, pool = record["extra"]["pathway"], record["config"]["pool"]
        target = record["label"].rsplit(" ", 1)[1]
        row = rows.setdefault((pathway, pool), {"pathway": pathway, "calibration": pool or "none"})
        kept = record.get("retention", {"tasks": {}, "mean": None})
        for task in tasks:
            row[f"{target} {task}"] = kept["tasks"].get(task)
        row[f"{target} mean"] = kept["mean"]
    return list(rows.values())


def derive_recipe(records: list[dict[str, Any]], target: str) -> Recipe:
    """The asymmetric calibration the study supports, with the evidence it rests on."""
    retention: dict[str, dict[str, float]] = {}
    for record in records:
        if record["label"].rsplit(" ", 1)[1] == target:
            retention.setdefault(record["extra"]["pathway"], {})[record["config"]["pool"]] = \
                record["retention"]["mean"]
    if set(retention) != {"text", "visual"}:
        raise ValueError("a recipe needs both pathways in the study")
    best = {p: max(pools, key=pools.get) for p, pools in retention.items()}
    spread = {p: max(pools.values()) - min(pools.values()) for p, pools in retention.items()}
    worst = {p: min(pools.values()) for p, pools in retention.items()}
    sensitive = min(worst, key=worst.get)
    visual_wants_visual = best["visual"] in ("visual", "mixed") and spread["visual"] > TOLERANCE
    if best["text"] == "text":
        method, pool, alpha = "atv", "atv", 4.0 if visual_wants_visual else 1.0
        rationale = (f"the text pathway is best protected by text calibration; the visual pathway "
                     f"{'gains from visual tokens' if visual_wants_visual else 'is indifferent to its pool'} "
                     f"(spread {spread['visual']:.2f} points): all text tokens plus "
                     f"{'a larger' if visual_wants_visual else 'a small'} drift-selected visual subset")
    else:
        method, pool, alpha = "wanda", best["text"], 1.0
        rationale = f"the text pathway is best protected by {best['text']} calibration"
    return Recipe(method=method, pool=pool, alpha=alpha, rationale=rationale,
                  evidence={"target": target, "mean_retention": retention, "best_pool": best, "spread": spread,
                            "sensitive_pathway": sensitive})

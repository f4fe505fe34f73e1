"""The pathway-sensitivity study (the paper's Table 1) and the recipe it hands to atv_prune.

Each cell prunes one pathway of the MoT probe (text or visual copies) with one calibration pool
at one target, leaves the other pathway dense, and is evaluated like any pruned model; retention
is relative to the dense model (the unpruned probe equals it). The recipe reads the study at its
highest unstructured sparsity (else its last N:M pattern): the pool that best protects each
pathway, which pathway is the sensitive one, and the calibration pool to prune the original model
with; an ATV recipe's alpha is 1 unless a sweep on the original model (:func:`alpha_cells`,
:func:`with_measured_alpha`) measured a better one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from atv_prune.model.calibration import CalibrationSet
from atv_prune.runs.api import PruneReport
from atv_prune.runs.config import PruneConfig, RunSettings
from atv_prune.runs.recipe import Recipe
from atv_prune.runs.study import Cell

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


def _listing(pools: dict[str, float]) -> str:
    """``mixed 64.9, text 62.1, visual 52.4``: a pathway's mean retention per pool, best first."""
    return ", ".join(f"{pool} {value:.1f}" for pool, value in sorted(pools.items(), key=lambda kv: -kv[1]))


def _visual_finding(pools: dict[str, float], best: str, spread: float) -> str:
    """What the visual pathway's figures say, in words that follow from them."""
    if spread <= TOLERANCE:
        return (f"the visual pathway is indifferent to its pool (spread {spread:.1f} points, within the "
                f"{TOLERANCE:g}-point tolerance: {_listing(pools)})")
    return f"the visual pathway is best protected by {best} calibration ({_listing(pools)})"


def _atv_rationale(findings: str, alpha: str) -> str:
    return f"{findings}: all text tokens plus drift-selected visual tokens; {alpha}"


def derive_recipe(records: list[dict[str, Any]], target: str) -> Recipe:
    """The asymmetric calibration the study supports, with the evidence it rests on. ATV's alpha
    stays 1 (the paper's default) and is marked unmeasured; :func:`with_measured_alpha` replaces
    it with the best of a sweep on the original model."""
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
    findings = (f"at {target}, the text pathway is best protected by {best['text']} calibration "
                f"({_listing(retention['text'])}); "
                + _visual_finding(retention["visual"], best["visual"], spread["visual"]))
    if best["text"] == "text":
        method, pool = "atv", "atv"
        rationale = _atv_rationale(findings, "alpha 1 (the paper's default, not measured here: pass "
                                             "--recipe-alphas to choose it)")
    else:
        method, pool = "wanda", best["text"]
        rationale = f"{findings}: Wanda with the {pool} pool"
    return Recipe(method=method, pool=pool, alpha=1.0, rationale=rationale,
                  evidence={"target": target, "mean_retention": retention, "best_pool": best, "spread": spread,
                            "sensitive_pathway": sensitive, "tolerance": TOLERANCE, "findings": findings,
                            "alpha": "not measured" if method == "atv" else "not used (no visual budget)"})


def alpha_cells(recipe: Recipe, alphas: list[float], target: dict[str, Any], samples: int, seed: int) -> list[Cell]:
    """The alpha sweep of an ATV recipe on the original model: one cell per alpha at ``target``."""
    cells = []
    for alpha in alphas:
        config = PruneConfig(method=recipe.method, pool=recipe.pool, alpha=alpha, samples=samples, seed=seed,
                             **target)
        cells.append(Cell(f"recipe alpha={alpha:g} {config.target_label}", config, {"model": "original"}))
    return cells


def with_measured_alpha(recipe: Recipe, records: list[dict[str, Any]]) -> Recipe:
    """``recipe`` with the alpha of the sweep ``records`` (original model) that kept the most mean
    retention (ties: the alpha nearest 1), the sweep's figures in its evidence."""
    measured = {record["config"]["alpha"]: record for record in records}
    chosen = max(measured, key=lambda a: (measured[a]["retention"]["mean"], -abs(a - 1.0)))
    sweep = {f"{a:g}": {"mean_retention": r["retention"]["mean"],
                        "visual_tokens_per_sample": r["visual_tokens_per_sample"]} for a, r in measured.items()}
    target = records[0]["label"].rsplit(" ", 1)[1]
    listing = ", ".join(f"alpha {a:g} {r['retention']['mean']:.1f}" for a, r in measured.items())
    rationale = _atv_rationale(recipe.evidence["findings"], f"alpha {chosen:g}, which kept the most mean retention "
                                                            f"on the original model at {target} ({listing})")
    evidence = {**recipe.evidence, "alpha": f"measured: {chosen:g}",
                "alpha_sweep": {"target": target, "alphas": sweep, "chosen": chosen}}
    return recipe.model_copy(update={"alpha": chosen, "rationale": rationale, "evidence": evidence})

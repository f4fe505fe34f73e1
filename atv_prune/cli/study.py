"""``atv-prune compare`` and ``atv-prune sweep``: resumable method tables and budget sweeps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..errors import AtvPruneError, ConfigError, not_a_file
from .cluster import cell_executor, placement
from .options import RegistryChoice, calibrated_mask_method_names, study_options
from .support import ListOptionsCommand, one_line_errors

if TYPE_CHECKING:
    from ..runs.cells import Cell, PruneFunction


def _saliency_names() -> tuple[str, ...]:
    from ..algorithms.specs import saliency_pools

    return tuple(saliency_pools())


def words(values: tuple[str, ...]) -> list[str]:
    """A list option's values, each also split at commas and spaces (``--tasks exist,count``)."""
    return [word for value in values for word in value.replace(",", " ").split()]


def study_settings(kw: dict[str, Any]):
    """StudySettings from the shared study options (the shipped benchmark when --bench is not given)."""
    from ..builtin import default_benchmark
    from ..runs.study import StudySettings

    if not kw["calib_path"].is_file():
        raise AtvPruneError(f"calibration file {kw['calib_path']} {not_a_file(kw['calib_path'])}: "
                            "pass an existing --calib FILE")
    if kw["quiet"]:
        from ..model.loading import silence_loading_bars

        silence_loading_bars()
    bench = kw["bench_dir"] if kw["bench_dir"] is not None else default_benchmark()
    return StudySettings(model=kw["model_path"], calib=kw["calib_path"], tasks=words(kw["tasks"]),
                         bench_dir=str(bench) if bench else None, limit=kw["limit"], batch_size=kw["batch_size"],
                         dtype=kw["dtype"], image_root=kw["image_root"], max_pixels=kw["max_pixels"],
                         max_frames=kw["max_frames"], fps=kw["fps"], max_length=kw["max_length"],
                         trust_remote_code=kw["trust_remote_code"], device=kw["device"],
                         placement=placement(kw), progress=not kw["quiet"], load=kw["load"])


def run_study(kw: dict[str, Any], kind: str, cells: list[Cell], prune_function: PruneFunction | None = None,
              own_surgery: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``cells`` as the resumable study ``kind`` in ``kw["out_dir"]``, here or on the Ray
    cluster ``--ray`` names: the dense record and every cell's record (failed ones included).
    ``own_surgery``: the prune function cuts structures its own way (the MoT probe), so the input
    checks try structured cells' rounding only, not the physical shrink."""
    from ..model.shrink import shrink_surgery
    from ..runs.cells import default_prune
    from ..runs.study import Study

    study = Study(kw["out_dir"], study_settings(kw), kind, kw["overwrite"],
                  surgery=None if own_surgery else shrink_surgery)
    return study.run_all(cells, prune_function or default_prune, executor=cell_executor(kw))


def raise_failures(kw: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """After a study's outputs are written: end the command with the failed cells named, if any."""
    from ..runs.study import CellsFailed, failed_cells

    failed = failed_cells(records)
    if failed:
        raise CellsFailed(failed, kw["out_dir"])


def write_study_outputs(kw: dict[str, Any], names: dict[str, str], dense: dict[str, Any],
                        records: list[dict[str, Any]], rows: list[dict[str, Any]],
                        extra: dict[str, Any] | None = None) -> str:
    """Write a study's ``results.json``-style summary, Markdown and CSV tables (file names from
    ``names``: keys json, md, csv) and return the Markdown."""
    from ..runs.export import write_json_atomic, write_text_atomic
    from ..runs.study import cell_summary, markdown_table
    from ..runs.tables import write_table

    markdown = markdown_table(rows, dense, records)
    write_json_atomic(kw["out_dir"] / names["json"],
                      {"dense": dense, **(extra or {}), "cells": [cell_summary(r) for r in records]})
    write_text_atomic(kw["out_dir"] / names["md"], markdown)
    write_table(kw["out_dir"] / names["csv"], rows)
    return markdown


def run_comparison(kw: dict[str, Any], methods: list[str], targets: list[dict[str, Any]], alpha: float, kind: str,
                   names: dict[str, str]) -> None:
    """Run methods x targets as a resumable study in ``kw["out_dir"]``; write the JSON, markdown and
    CSV tables and the chart under ``names`` (keys json, md, csv, png); print the markdown table,
    then end with the failed cells named, if any."""
    from ..algorithms.specs import METHODS
    from ..runs.config import PruneConfig, is_structured
    from ..runs.plots import retention_bars
    from ..runs.study import Cell, retention_rows

    cells = []
    for spec in methods:
        method, _, pool = spec.partition(":")
        structured = method in METHODS and METHODS[method].structured
        matching = [target for target in targets if is_structured(target) == structured]
        if not matching:
            wanted = "--structure with --ratio" if structured else "--sparsity or --pattern"
            raise ConfigError(f"--methods {spec} needs a {wanted} target: add one, or drop {spec}")
        for target in matching:
            # DAS spreads unstructured sparsity; N:M fixes it per group, so such cells are uniform.
            allocation = "uniform" if target.get("pattern") is not None else None
            config = PruneConfig(method=method, pool=pool or None, alpha=alpha, samples=kw["samples"],
                                 seed=kw["seed"], allocation=allocation, **target)
            cells.append(Cell(f"{spec} {config.target_label}", config))
    dense, records = run_study(kw, kind, cells)
    rows = retention_rows(records, dense)
    for row, record in zip(rows[1:], records):
        row["method"], row["target"] = record["label"].rsplit(" ", 1)
    table = [{k: v for k, v in row.items() if k not in ("method", "target")} for row in rows]
    markdown = write_study_outputs(kw, names, dense, records, table)
    retention_bars(kw["out_dir"] / names["png"], rows[1:], "mean retention by method and target")
    click.echo(markdown)
    raise_failures(kw, records)


@click.command("compare", cls=ListOptionsCommand)
@study_options
@click.option("--methods", multiple=True, default=("magnitude", "wanda", "wanda:text", "atv"), show_default=True,
              help="METHOD or METHOD:POOL, e.g. wanda wanda:text atv sparsegpt sparsegpt:atv.")
@click.option("--sparsity", "sparsities", type=float, multiple=True, help="Unstructured targets, e.g. 0.5 0.6.")
@click.option("--pattern", "patterns", multiple=True, help="N:M targets, e.g. 2:4 4:8.")
@click.option("--structure", "structures", multiple=True, type=click.Choice(["channels", "heads", "both"]),
              help="Structured targets for the structured methods (wanda-sp, flap), each at every --ratio.")
@click.option("--ratio", "ratios", type=float, multiple=True,
              help="Fractions of heads/channels removed with --structure, e.g. 0.1 0.2 0.3.")
@click.option("--alpha", type=float, default=1.0, show_default=True)
@one_line_errors
def compare(methods: tuple[str, ...], sparsities: tuple[float, ...], patterns: tuple[str, ...],
            structures: tuple[str, ...], ratios: tuple[float, ...], alpha: float, **kw: Any) -> None:
    """A Table-2-style retention table: methods x targets (sparsity and N:M for the unstructured methods,
    structure and ratio for the structured ones), with wall time and peak memory."""
    from ..runs.config import target_list

    names = {"json": "results.json", "md": "table.md", "csv": "table.csv", "png": "retention.png"}
    targets = target_list(sparsities, patterns, structures, ratios)
    run_comparison(kw, words(methods), targets, alpha, "compare", names)


@click.command("sweep", cls=ListOptionsCommand)
@study_options
@click.option("--alpha", "alphas", type=float, multiple=True, default=(0, 0.5, 1, 2, 4, 8), show_default=True,
              help="Adaptive-budget scales to try.")
@click.option("--ratios", type=float, multiple=True, default=(0.05, 0.1, 0.2, 0.3), show_default=True,
              help="Fixed visual ratios to try.")
@click.option("--saliency", type=RegistryChoice(_saliency_names), default="drift", show_default=True,
              help="Which visual-token saliency the sweep uses (the pools registered with it).")
@click.option("--method", type=RegistryChoice(calibrated_mask_method_names), default="atv", show_default=True)
@click.option("--sparsity", type=float, default=None, help="Unstructured target [default 0.5 unless --pattern].")
@click.option("--pattern", default=None, help="N:M target instead of --sparsity.")
@one_line_errors
def sweep(alphas: tuple[float, ...], ratios: tuple[float, ...], saliency: str, method: str,
          sparsity: float | None, pattern: str | None, **kw: Any) -> None:
    """Retention against visual tokens selected: alpha sweep (adaptive) and fixed visual ratios."""
    from ..algorithms.specs import saliency_pools
    from ..runs.config import PruneConfig, single_target
    from ..runs.plots import tokens_vs_retention
    from ..runs.study import Cell, retention_rows

    if not all(0 < r <= 1 for r in ratios):
        raise ConfigError(f"--ratios {' '.join(f'{r:g}' for r in ratios)}: every ratio must be in (0, 1]")
    pools = saliency_pools()[saliency]
    missing = [rule for rule in ("adaptive", "fixed") if rule not in pools]
    if missing:
        raise ConfigError(f"saliency '{saliency}' has no {missing[0]}-budget pool registered: register one to sweep it")
    adaptive, fixed = pools["adaptive"], pools["fixed"]
    target = single_target(sparsity, pattern)
    common = dict(method=method, samples=kw["samples"], seed=kw["seed"], **target)
    cells = [Cell(f"alpha={a:g}", PruneConfig(pool=adaptive, alpha=a, **common)) for a in alphas]
    cells += [Cell(f"ratio={r:g}", PruneConfig(pool=fixed, visual_ratio=r, **common)) for r in ratios]
    dense, records = run_study(kw, "sweep", cells)
    rows = retention_rows(records, dense)
    names = {"json": "results.json", "md": "sweep.md", "csv": "sweep.csv"}
    markdown = write_study_outputs(kw, names, dense, records, rows)
    series = {f"adaptive ({adaptive}, alpha)": [], f"fixed ratio ({fixed})": []}
    for record in records:
        if "failed" in record:
            continue
        name = list(series)[0] if record["label"].startswith("alpha") else list(series)[1]
        series[name].append((record["visual_tokens_per_sample"], record["retention"]["mean"],
                             record["label"].split("=")[1]))
    tokens_vs_retention(kw["out_dir"] / "sweep.png", series,
                        f"{method} {PruneConfig(**common).target_label}: retention vs visual tokens")
    click.echo(markdown)
    raise_failures(kw, records)

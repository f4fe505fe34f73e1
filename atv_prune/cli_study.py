"""``atv-prune compare`` and ``atv-prune sweep``: resumable method tables and budget sweeps."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import click

from .cli_support import ListOptionsCommand, one_line_errors
from .config import PruneConfig, single_target, target_list
from .errors import AtvPruneError, ConfigError, not_a_file


def study_options(function: Any) -> Any:
    """The options every study command shares (model, data, tasks, evaluation, output)."""
    options = [
        click.option("--model", "model_path", required=True, type=click.Path(path_type=Path)),
        click.option("--calib", "calib_path", required=True, type=click.Path(path_type=Path)),
        click.option("--tasks", multiple=True, required=True, help="Built-in task names or lmms-eval task ids."),
        click.option("--bench", "bench_dir", type=click.Path(path_type=Path), default=None,
                     help="Benchmark folder for built-in tasks [default: the shipped one]."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="First N documents per task."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--samples", type=int, default=128, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default=None, help="Compute device [default: cuda if available, else cpu]."),
        click.option("--image-root", type=click.Path(path_type=Path), default=None),
        click.option("--max-pixels", type=int, default=None),
        click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
                     help="Study folder; re-running the same study there resumes it."),
        click.option("--overwrite", is_flag=True, help="Discard the cells already in --out."),
        click.option("--trust-remote-code", is_flag=True),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def study_settings(kw: dict[str, Any]):
    """StudySettings from the shared options."""
    from .study import StudySettings

    if not kw["calib_path"].is_file():
        raise AtvPruneError(f"calibration file {kw['calib_path']} {not_a_file(kw['calib_path'])}: "
                            "pass an existing --calib FILE")
    return StudySettings(model=kw["model_path"], calib=kw["calib_path"], tasks=[t for v in kw["tasks"] for t in
                                                                                   v.replace(",", " ").split()],
                         bench_dir=str(kw["bench_dir"]) if kw["bench_dir"] else None, limit=kw["limit"],
                         batch_size=kw["batch_size"], device=kw["device"], image_root=kw["image_root"],
                         max_pixels=kw["max_pixels"], trust_remote_code=kw["trust_remote_code"])


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as CSV text."""
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def _method_spec(text: str) -> tuple[str, str | None]:
    method, _, pool = text.partition(":")
    return method, pool or None


def run_comparison(kw: dict[str, Any], methods: list[str], targets: list[dict[str, Any]], alpha: float, kind: str,
                   names: dict[str, str]) -> str:
    """Run methods x targets as a resumable study in ``kw["out_dir"]``; write the JSON, markdown and
    CSV tables and the chart under ``names`` (keys json, md, csv, png); return the markdown table."""
    from .export import write_json_atomic, write_text_atomic
    from .plots import retention_bars
    from .study import Cell, Study, cell_summary, markdown_table, retention_rows

    cells = []
    for spec in methods:
        method, pool = _method_spec(spec)
        for target in targets:
            # DAS spreads unstructured sparsity; N:M fixes it per group, so such cells are uniform.
            allocation = "uniform" if target["pattern"] is not None else None
            config = PruneConfig(method=method, pool=pool, alpha=alpha, samples=kw["samples"], seed=kw["seed"],
                                 device=kw["device"], progress=False, allocation=allocation, **target)
            cells.append(Cell(f"{spec} {config.target_label}", config))
    study = Study(kw["out_dir"], study_settings(kw), kind, kw["overwrite"])
    dense, records = study.run_all(cells)
    rows = retention_rows(records, dense)
    for row, record in zip(rows[1:], records):
        row["method"], row["target"] = record["label"].rsplit(" ", 1)
    table = [{k: v for k, v in row.items() if k not in ("method", "target")} for row in rows]
    markdown = markdown_table(table, dense)
    write_json_atomic(kw["out_dir"] / names["json"], {"dense": dense, "cells": [cell_summary(r) for r in records]})
    write_text_atomic(kw["out_dir"] / names["md"], markdown)
    write_text_atomic(kw["out_dir"] / names["csv"], csv_text(table))
    retention_bars(kw["out_dir"] / names["png"], rows[1:], "mean retention by method and target")
    return markdown


@click.command("compare", cls=ListOptionsCommand)
@study_options
@click.option("--methods", multiple=True, default=("magnitude", "wanda", "wanda:text", "atv"), show_default=True,
              help="METHOD or METHOD:POOL, e.g. wanda wanda:text atv sparsegpt sparsegpt:atv.")
@click.option("--sparsity", "sparsities", type=float, multiple=True, help="Unstructured targets, e.g. 0.5 0.6.")
@click.option("--pattern", "patterns", multiple=True, help="N:M targets, e.g. 2:4 4:8.")
@click.option("--alpha", type=float, default=1.0, show_default=True)
@one_line_errors
def compare(methods: tuple[str, ...], sparsities: tuple[float, ...], patterns: tuple[str, ...], alpha: float,
            **kw: Any) -> None:
    """A Table-2-style retention table: methods x sparsity targets, with wall time and peak memory."""
    specs = [m for value in methods for m in value.replace(",", " ").split()]
    names = {"json": "results.json", "md": "table.md", "csv": "table.csv", "png": "retention.png"}
    click.echo(run_comparison(kw, specs, target_list(sparsities, patterns), alpha, "compare", names))


@click.command("sweep", cls=ListOptionsCommand)
@study_options
@click.option("--alpha", "alphas", type=float, multiple=True, default=(0, 0.5, 1, 2, 4, 8), show_default=True,
              help="Adaptive-budget scales to try.")
@click.option("--ratios", type=float, multiple=True, default=(0.05, 0.1, 0.2, 0.3), show_default=True,
              help="Fixed visual ratios to try.")
@click.option("--saliency", type=click.Choice(["drift", "random", "abs", "dbs"]), default="drift", show_default=True,
              help="Which visual-token saliency the sweep uses.")
@click.option("--method", type=click.Choice(["atv", "sparsegpt"]), default="atv", show_default=True)
@click.option("--sparsity", type=float, default=None, help="Unstructured target [default 0.5 unless --pattern].")
@click.option("--pattern", default=None, help="N:M target instead of --sparsity.")
@one_line_errors
def sweep(alphas: tuple[float, ...], ratios: tuple[float, ...], saliency: str, method: str,
          sparsity: float | None, pattern: str | None, **kw: Any) -> None:
    """Retention against visual tokens selected: alpha sweep (adaptive) and fixed visual ratios."""
    from .export import write_json_atomic, write_text_atomic
    from .plots import tokens_vs_retention
    from .study import Cell, Study, cell_summary, markdown_table, retention_rows

    if not all(0 < r <= 1 for r in ratios):
        raise ConfigError(f"--ratios {' '.join(f'{r:g}' for r in ratios)}: every ratio must be in (0, 1]")
    adaptive = {"drift": "atv", "random": "random", "abs": "abs", "dbs": "dbs"}[saliency]
    fixed = "drift-fixed" if saliency == "drift" else f"{adaptive}-fixed"
    target = single_target(sparsity, pattern)
    common = dict(method=method, samples=kw["samples"], seed=kw["seed"], device=kw["device"], progress=False,
                  **target)
    cells = [Cell(f"alpha={a:g}", PruneConfig(pool=adaptive, alpha=a, **common)) for a in alphas]
    cells += [Cell(f"ratio={r:g}", PruneConfig(pool=fixed, visual_ratio=r, **common)) for r in ratios]
    study = Study(kw["out_dir"], study_settings(kw), "sweep", kw["overwrite"])
    dense, records = study.run_all(cells)
    rows = retention_rows(records, dense)
    write_json_atomic(kw["out_dir"] / "results.json", {"dense": dense, "cells": [cell_summary(r) for r in records]})
    write_text_atomic(kw["out_dir"] / "sweep.md", markdown_table(rows, dense))
    write_text_atomic(kw["out_dir"] / "sweep.csv", csv_text(rows))
    series = {f"adaptive ({adaptive}, alpha)": [], f"fixed ratio ({fixed})": []}
    for record in records:
        name = list(series)[0] if record["label"].startswith("alpha") else list(series)[1]
        series[name].append((record["visual_tokens_per_sample"], record["retention"]["mean"],
                             record["label"].split("=")[1]))
    tokens_vs_retention(kw["out_dir"] / "sweep.png", series,
                        f"{method} {PruneConfig(**common).target_label}: retention vs visual tokens")
    click.echo(markdown_table(rows, dense))

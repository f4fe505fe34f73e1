"""The ``motprobe`` command line: modality-asymmetry diagnostics on a local checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import click

from atv_prune.cli.options import (
    RegistryChoice,
    calibrated_mask_method_names,
    method_names,
    pool_names,
    shared,
    study_options,
)
from atv_prune.cli.support import Group, ListOptionsCommand, one_line_errors
from atv_prune.errors import AtvPruneError


def _load(model_path: Path, dtype: str, device: str | None, trust_remote_code: bool):
    from atv_prune.model.loading import load_model_and_processor

    return load_model_and_processor(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _calibration(calib: Path, processor, samples: int, seed: int, image_root: Path | None, max_pixels: int | None,
                 max_length: int | None, max_frames: int, fps: float | None):
    from atv_prune.model.calibration import load_calibration
    from atv_prune.model.videos import VideoSampling

    return load_calibration(calib, processor, image_root=image_root, samples=samples, seed=seed,
                            max_pixels=max_pixels, max_length=max_length,
                            video=VideoSampling(max_frames=max_frames, fps=fps))


#: The options iou and tsne share.
common_options = shared("model", "calib", "samples", "seed", "image-root", "max-pixels", "max-frames", "fps",
                        "max-length", "out",
                        "overwrite",
                        "trust-remote-code", "device", "dtype")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Study how text and visual tokens behave under pruning (the paper's MoT probe and diagnostics)."""


@main.command()
@common_options
@click.option("--method", type=RegistryChoice(calibrated_mask_method_names), default="wanda", show_default=True)
@click.option("--sparsity", type=float, default=None, help="Unstructured target [default 0.5 unless --pattern].")
@click.option("--pattern", default=None, help="N:M pattern instead of --sparsity.")
@click.option("--pools", nargs=2, type=RegistryChoice(pool_names), default=("text", "visual"), show_default=True,
              help="The two pools compared.")
@one_line_errors
def iou(model_path: Path, calib_path: Path, samples: int, seed: int, image_root: Path | None,
        max_pixels: int | None, max_frames: int, fps: float | None, max_length: int | None, out_dir: Path,
        overwrite: bool, trust_remote_code: bool,
        device: str | None, dtype: str, method: str, sparsity: float | None, pattern: str | None,
        pools: tuple[str, str]) -> None:
    """Mask IoU between two calibration pools for every pruned linear (table, summary, histogram)."""
    from atv_prune.runs.config import PruneConfig, RunSettings, single_target
    from atv_prune.runs.export import check_output_dir, write_dir_atomic, write_json_atomic
    from atv_prune.runs.preflight import check_run_inputs
    from atv_prune.runs.tables import write_table

    from .diagnostics import iou_summary, mask_iou, plot_iou_histogram, pruned_masks

    if pools[0] == pools[1]:
        raise AtvPruneError(f"--pools names {pools[0]} twice: give two different pools, e.g. --pools text visual")
    target = single_target(sparsity, pattern)
    configs = [PruneConfig(method=method, pool=pool, samples=samples, seed=seed, **target) for pool in pools]
    check_output_dir(out_dir, overwrite, protected=[model_path])
    check_run_inputs(model_path, configs, calib_path=calib_path, image_root=image_root, max_pixels=max_pixels,
                     device=device, trust_remote_code=trust_remote_code, max_length=max_length)
    masks = []
    for config in configs:
        loaded = _load(model_path, dtype, device, trust_remote_code)
        calibration = _calibration(calib_path, loaded.processor, samples, seed, image_root, max_pixels, max_length,
                                   max_frames, fps)
        masks.append(pruned_masks(loaded.model, calibration, config, RunSettings(device=device)))
        del loaded
    rows = mask_iou(*masks)
    summary = {"pools": list(pools), "method": method, "target": configs[0].target_label, "samples": samples,
               "seed": seed, **iou_summary(rows)}

    def fill(folder: Path) -> None:
        write_table(folder / "iou.csv", rows)
        write_json_atomic(folder / "iou_summary.json", summary)
        plot_iou_histogram(rows, folder / "iou_hist.png",
                           f"{method} {configs[0].target_label}: {pools[0]} vs {pools[1]} calibration")

    write_dir_atomic(out_dir, fill, overwrite)
    click.echo(f"mask IoU over {summary['linears']} linears: mean {summary['mean']:.3f}, "
               f"min {summary['min']:.3f}, median {summary['quantiles']['0.5']:.3f}; written to {out_dir}")


@main.command()
@common_options
@click.option("--blocks", "block_list", type=int, multiple=True, required=True, help="Blocks to embed (repeat).")
@click.option("--tokens", type=click.IntRange(min=2), default=400, show_default=True,
              help="Tokens per modality and block.")
@click.option("--perplexity", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="t-SNE perplexity.")
@one_line_errors
def tsne(model_path: Path, calib_path: Path, samples: int, seed: int, image_root: Path | None,
         max_pixels: int | None, max_frames: int, fps: float | None, max_length: int | None, out_dir: Path,
        overwrite: bool, trust_remote_code: bool,
         device: str | None, dtype: str, block_list: tuple[int, ...], tokens: int, perplexity: float) -> None:
    """t-SNE of text and visual token activations (block inputs) at chosen blocks."""
    from atv_prune.model.calibration import check_calibration_file
    from atv_prune.model.layout import no_video_reason
    from atv_prune.model.loading import read_config
    from atv_prune.runs.export import check_output_dir, write_dir_atomic
    from atv_prune.runs.preflight import check_model
    from atv_prune.runs.tables import write_table

    from .diagnostics import block_activations, check_block_range, plot_tsne, tsne_embedding

    if not math.isfinite(perplexity):
        raise AtvPruneError(f"--perplexity {perplexity} is not a finite number: pass e.g. --perplexity 30")
    check_output_dir(out_dir, overwrite, protected=[model_path])
    n_blocks = check_model(model_path, device=device, trust_remote_code=trust_remote_code, max_length=max_length)
    if n_blocks is not None:
        check_block_range(sorted(set(block_list)), n_blocks)
    check_calibration_file(calib_path, image_root=image_root, samples=samples, seed=seed, max_pixels=max_pixels,
                           video_model=no_video_reason(read_config(model_path, trust_remote_code)))
    loaded = _load(model_path, dtype, device, trust_remote_code)
    calibration = _calibration(calib_path, loaded.processor, samples, seed, image_root, max_pixels, max_length,
                                   max_frames, fps)
    activations = block_activations(loaded.model, calibration, sorted(set(block_list)), device)
    embeddings = {block: tsne_embedding(acts, visual, tokens, seed, perplexity)
                  for block, (acts, visual) in activations.items()}
    rows = [{"block": block, "x": float(x), "y": float(y), "modality": "visual" if v else "text"}
            for block, (points, visual) in embeddings.items() for (x, y), v in zip(points, visual)]

    def fill(folder: Path) -> None:
        write_table(folder / "tsne.csv", rows)
        plot_tsne(embeddings, folder / "tsne.png")

    write_dir_atomic(out_dir, fill, overwrite)
    click.echo(f"t-SNE of {len(rows)} tokens at blocks {sorted(embeddings)} written to {out_dir}")


@main.command()
@click.option("--report", "report_path", required=True, type=click.Path(path_type=Path),
              help="pruning_report.json of an ATV run (atv-prune prune --method atv).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@one_line_errors
def drift(report_path: Path, out_dir: Path, overwrite: bool) -> None:
    """Per-block mean visual drift and visual tokens selected (the paper's Fig. A1) from a report."""
    from atv_prune.runs.api import PruneReport
    from atv_prune.runs.export import write_dir_atomic
    from atv_prune.runs.tables import write_table

    from .diagnostics import plot_drift

    report = PruneReport.read(report_path, "pruning report", "pass the pruning_report.json atv-prune prune wrote")
    blocks = report.blocks
    if not blocks or any(b.get("mean_drift") is None for b in blocks):
        raise AtvPruneError(f"{report_path} has no per-block drift: use the report of a calibrated run (e.g. atv)")
    rows = [{k: b.get(k) for k in ("index", "mean_drift", "visual_tokens_per_sample", "text_tokens_per_sample")}
            for b in blocks]
    config = report.config
    title = f"{config.get('method')} pool {config.get('pool')}, alpha {config.get('alpha')}"

    def fill(folder: Path) -> None:
        write_table(folder / "drift.csv", rows)
        plot_drift(rows, folder / "drift.png", title)

    write_dir_atomic(out_dir, fill, overwrite)
    click.echo(f"drift of {len(rows)} blocks written to {out_dir}")


@main.command(cls=ListOptionsCommand)
@study_options
@click.option("--sparsity", "sparsities", type=float, multiple=True, help="Unstructured targets, e.g. 0.5 0.6.")
@click.option("--pattern", "patterns", multiple=True, help="N:M targets, e.g. 2:4.")
@click.option("--structure", "structures", multiple=True, type=click.Choice(["channels", "heads", "both"]),
              help="Structured targets (--method wanda-sp or flap): the pathway's heads and/or MLP channels, at "
                   "every --ratio.")
@click.option("--ratio", "ratios", type=float, multiple=True, help="Fractions removed with --structure, e.g. 0.25 0.5.")
@click.option("--pathway", "pathways", multiple=True, type=click.Choice(["text", "visual"]),
              default=("text", "visual"), show_default=True)
@click.option("--pool", "pools", multiple=True, default=("text", "visual", "mixed"), show_default=True,
              help="Calibration pools to prune each pathway with.")
@click.option("--method", type=RegistryChoice(method_names), default="wanda", show_default=True)
@click.option("--include-o-proj", is_flag=True, help="Route o_proj by modality too.")
@click.option("--recipe-alphas", "recipe_alphas", type=float, multiple=True,
              help="If the recipe is ATV: prune the original model at the recipe's target with each of these "
                   "alphas (e.g. 0.5 1 2 4) and recommend the best [default: alpha 1, not measured].")
@one_line_errors
def sensitivity(sparsities: tuple[float, ...], patterns: tuple[str, ...], structures: tuple[str, ...],
                ratios: tuple[float, ...], pathways: tuple[str, ...], pools: tuple[str, ...], method: str,
                include_o_proj: bool, recipe_alphas: tuple[float, ...], **kw) -> None:
    """The MoT pathway-sensitivity study (Table 1): each pathway pruned with each pool, evaluated;
    writes results.csv/json, heatmap.png and recipe.json (for atv-prune prune --recipe)."""
    from atv_prune.algorithms.specs import METHODS
    from atv_prune.cli.study import raise_failures, run_study, words
    from atv_prune.runs.config import PruneConfig, is_structured, target_list
    from atv_prune.runs.export import write_json_atomic
    from atv_prune.runs.study import Cell, cell_summary, failed_cells
    from atv_prune.runs.tables import write_table

    from .sensitivity import alpha_cells, derive_recipe, prune_probe_pathway, table_rows, with_measured_alpha

    targets = target_list(sparsities, patterns, structures, ratios)
    pools = tuple(words(pools))
    calibrated = METHODS[method].needs_calibration
    # the recipe names an unstructured method (atv or wanda): it is read from an unstructured target
    makes_recipe = set(pathways) == {"text", "visual"} and calibrated and not all(map(is_structured, targets))
    if recipe_alphas and not makes_recipe:
        raise AtvPruneError("--recipe-alphas tunes the recipe, which needs both pathways, a calibrated "
                            "--method and a --sparsity or --pattern target: drop --recipe-alphas")
    for alpha in recipe_alphas:
        PruneConfig(method="atv", alpha=alpha)  # a bad alpha fails here, before the study
    if not calibrated:
        if click.get_current_context().get_parameter_source("pools") == click.core.ParameterSource.COMMANDLINE:
            raise AtvPruneError(f"{method} pruning uses no calibration pool: drop --pool")
        pools = (None,)
    cells = []
    for pathway in pathways:
        for pool in pools:
            for target in targets:
                config = PruneConfig(method=method, pool=pool, samples=kw["samples"], seed=kw["seed"], **target)
                # a pathway's heads are cut in its copy of o_proj, which must then be routed
                routes_o = include_o_proj or target.get("structure") in ("heads", "both")
                cells.append(Cell(f"{pathway}:{pool or 'none'} {config.target_label}", config,
                                  {"pathway": pathway, "include_o_proj": routes_o}))
    dense, records = run_study(kw, "motprobe-sensitivity", cells, prune_probe_pathway, own_surgery=True)
    tasks = list(dense["evaluation"]["scores"])
    rows = table_rows(records, tasks)
    unstructured = [c.config for c in cells if c.config.sparsity is not None]
    patterned = [c.config for c in cells if c.config.pattern is not None]
    hardest = max(unstructured, key=lambda c: c.sparsity) if unstructured else (patterned[-1] if patterned else None)
    # A recipe from an incomplete study would rest on missing evidence.
    recipe = derive_recipe(records, hardest.target_label) if makes_recipe and not failed_cells(records) else None
    alpha_records: list[dict] = []
    if recipe is not None and recipe_alphas:
        if recipe.method == "atv":
            target = {"sparsity": hardest.sparsity, "pattern": hardest.pattern}
            _, alpha_records = run_study(kw, "motprobe-sensitivity",
                                         alpha_cells(recipe, list(recipe_alphas), target, kw["samples"], kw["seed"]))
            if not failed_cells(alpha_records):
                recipe = with_measured_alpha(recipe, alpha_records)
        else:
            click.echo(f"--recipe-alphas not used: the recipe is --method {recipe.method} --pool {recipe.pool}, "
                       "which has no visual budget", err=True)
    write_json_atomic(kw["out_dir"] / "results.json",
                      {"dense": dense, "table": rows, "recipe": recipe.to_dict() if recipe else None,
                       "cells": [cell_summary(r) for r in records],
                       "recipe_alphas": [cell_summary(r) for r in alpha_records]})
    write_table(kw["out_dir"] / "results.csv", rows)
    if recipe is not None:
        write_json_atomic(kw["out_dir"] / "recipe.json", recipe.to_dict())
    from .diagnostics import plot_sensitivity_heatmap

    plot_sensitivity_heatmap(rows, kw["out_dir"] / "heatmap.png")
    header = ["pathway", "calibration"] + [c for c in rows[0] if c.endswith(" mean")]
    click.echo(" | ".join(header))
    for row in rows:
        click.echo(" | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else "–" if row[c] is None else str(row[c])
                              for c in header))
    for record in alpha_records:
        if "failed" not in record:
            click.echo(f"{record['label']}: mean retention {record['retention']['mean']:.2f}, "
                       f"{record['visual_tokens_per_sample']:.2f} visual tokens per sample")
    if recipe is not None:
        click.echo(f"recipe: --method {recipe.method} --pool {recipe.pool} --alpha {recipe.alpha:g} "
                   f"({recipe.rationale})")
    raise_failures(kw, records + alpha_records)

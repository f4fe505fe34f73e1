"""The ``atv-prune`` command line."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .cli_support import Group, one_line_errors
from .config import METHODS, POOLS, PruneConfig, parse_pattern
from .errors import AtvPruneError, ConfigError, not_a_file


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atv-prune")
def main() -> None:
    """Modality-aware pruning of vision-language models (ATV-Pruning, Wanda, magnitude)."""


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="Local checkpoint folder.")
@click.option("--calib", "calib_path", type=click.Path(path_type=Path),
              help="Calibration file: conversation JSON or image-text JSONL (not needed for magnitude).")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="recipe.json from 'motprobe sensitivity': sets --method, --pool and --alpha "
                   "(options given explicitly win).")
@click.option("--method", type=click.Choice(list(METHODS)), default="atv", show_default=True)
@click.option("--pool", type=click.Choice(list(POOLS)), default=None,
              help="Calibration pool [default: mixed for wanda and sparsegpt, atv for atv, amia for tamp].")
@click.option("--sparsity", type=float, default=None, help="Unstructured sparsity in (0, 1), per output row.")
@click.option("--pattern", default=None, help="N:M semi-structured pattern (N of every M weights pruned), e.g. 2:4.")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="ATV visual budget scale.")
@click.option("--visual-ratio", type=float, default=0.1, show_default=True,
              help="Fraction of visual tokens kept by the *-fixed pools.")
@click.option("--allocation", type=click.Choice(["uniform", "das"]), default=None,
              help="Per-matrix sparsity: uniform, or TAMP's diversity-aware DAS [default: das for tamp].")
@click.option("--samples", type=int, default=128, show_default=True, help="Calibration samples drawn.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="Compute device [default: cuda if available, else cpu].")
@click.option("--offload-device", default="cpu", show_default=True, help="Where calibration activations live.")
@click.option("--dtype", default="auto", show_default=True,
              help="Compute dtype: auto (float32 on CPU, checkpoint dtype on GPU), float32, bfloat16, float16.")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Folder image paths are relative to [default: the calibration file's folder].")
@click.option("--max-pixels", type=int, default=None, help="Downscale calibration images to at most this many pixels.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
@one_line_errors
def prune(ctx: click.Context, recipe_path: Path | None, model_path: Path, calib_path: Path | None, method: str, pool: str | None, sparsity: float | None,
          pattern: str | None, alpha: float, visual_ratio: float, allocation: str | None, samples: int, seed: int, device: str | None,
          offload_device: str, dtype: str, image_root: Path | None, max_pixels: int | None, out_dir: Path,
          overwrite: bool, trust_remote_code: bool, quiet: bool) -> None:
    """Prune a checkpoint's language model and save it with pruning_report.json."""
    from .api import prune as run_prune
    from .api import resolve_device
    from .export import check_output_dir, save_pruned
    from .preflight import check_run_inputs
    from .loading import compute_dtype, load_model
    from .processors import load_processor

    if recipe_path is not None:
        method, pool, alpha = _apply_recipe(ctx, recipe_path, method, pool, alpha)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    config = PruneConfig(method=method, pool=pool, sparsity=sparsity,
                         pattern=parse_pattern(pattern) if pattern else None, alpha=alpha,
                         visual_ratio=visual_ratio, allocation=allocation, samples=samples, seed=seed, device=device,
                         offload_device=offload_device, progress=not quiet)
    if config.needs_calibration and calib_path is None:
        raise AtvPruneError(f"--method {method} needs calibration data: pass --calib FILE")
    if calib_path is not None and not calib_path.is_file():
        raise AtvPruneError(f"calibration file {calib_path} {not_a_file(calib_path)}: pass an existing --calib FILE")
    check_output_dir(out_dir, overwrite, protected=[model_path])
    check_run_inputs(model_path, [config], calib_path=calib_path, image_root=image_root, max_pixels=max_pixels,
                     device=device, trust_remote_code=trust_remote_code)
    compute = resolve_device(device)
    started = time.perf_counter()
    model, saved_dtype = load_model(model_path, compute_dtype(dtype, compute), trust_remote_code)
    processor = load_processor(model_path, trust_remote_code=trust_remote_code)
    load_seconds = time.perf_counter() - started
    report = run_prune(model, processor, calib_path if config.needs_calibration else None, config,
                       image_root=image_root, max_pixels=max_pixels)
    report.model["path"] = str(model_path.resolve())
    if recipe_path is not None:
        report.extra["recipe"] = str(recipe_path.resolve())
    report.seconds["load_model"] = round(load_seconds, 4)
    save_start = time.perf_counter()
    save_pruned(model.to(saved_dtype), processor, report.to_dict(), out_dir, overwrite)
    click.echo(f"pruned {report.model['blocks']} blocks to {report.sparsity['overall']:.2%} sparsity "
               f"({config.method}, pool {config.resolved_pool}, {config.target_label}) in "
               f"{report.seconds['total']:.1f}s; saved to {out_dir} in {time.perf_counter() - save_start:.1f}s")


def _apply_recipe(ctx: click.Context, path: Path, method: str, pool: str | None,
                  alpha: float) -> tuple[str, str | None, float]:
    """Method, pool and alpha from a motprobe recipe, unless given explicitly on the command line."""
    import json

    if not path.is_file():
        raise AtvPruneError(f"recipe {path} {not_a_file(path)}: pass the recipe.json 'motprobe sensitivity' wrote")
    try:
        recipe = json.loads(path.read_text())
        values = {"method": recipe["method"], "pool": recipe["pool"], "alpha": float(recipe["alpha"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise AtvPruneError(f"{path} is not a recipe: pass the recipe.json written by 'motprobe sensitivity'") from None
    if not str(recipe.get("format", "")).startswith("atv-prune-recipe/"):
        raise AtvPruneError(f"{path} is not a recipe (no atv-prune-recipe format tag)")
    try:
        PruneConfig(method=values["method"], pool=values["pool"], alpha=values["alpha"])
    except ConfigError as error:
        raise AtvPruneError(f"recipe {path} holds an invalid setting ({error}): pass the recipe.json "
                            "'motprobe sensitivity' wrote, or give --method, --pool and --alpha yourself") from None
    given = {name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
             for name in values}
    return (method if given["method"] else values["method"], pool if given["pool"] else values["pool"],
            alpha if given["alpha"] else values["alpha"])


@main.command()
def families() -> None:
    """List the model families the registry knows."""
    from .families import FAMILIES

    for family in FAMILIES:
        click.echo(f"{family.name:16s} model_type {', '.join(family.model_types):20s} {family.notes}")


def _register() -> None:
    from .cli_eval import eval_command
    from .cli_study import compare, sweep
    from .demo import demo

    for command in (demo, eval_command, compare, sweep):
        main.add_command(command)


_register()

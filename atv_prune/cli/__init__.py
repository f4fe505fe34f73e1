"""The ``atv-prune`` command line. Commands import torch, transformers and lmms-eval only when they
run, so ``--help`` and usage errors answer at once."""

from __future__ import annotations

from pathlib import Path

import click

from .options import RegistryChoice, method_names, pool_names, shared
from .support import Group, one_line_errors


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atv-prune")
def main() -> None:
    """Modality-aware pruning of vision-language models (ATV-Pruning, Wanda, SparseGPT, TAMP, magnitude)."""


@main.command()
@shared("model")
@click.option("--calib", "calib_path", type=click.Path(path_type=Path),
              help="Calibration file: conversation JSON or image-text JSONL (not needed for magnitude).")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="recipe.json from 'motprobe sensitivity': sets --method, --pool and --alpha "
                   "(options given explicitly win).")
@click.option("--method", type=RegistryChoice(method_names), default="atv", show_default=True)
@click.option("--pool", type=RegistryChoice(pool_names), default=None,
              help="Calibration pool [default: mixed for wanda and sparsegpt, atv for atv, amia for tamp].")
@click.option("--sparsity", type=float, default=None,
              help="Unstructured sparsity in (0, 1): exact in every output row (SparseGPT: in every 128-column "
                   "block).")
@click.option("--pattern", default=None, help="N:M semi-structured pattern (N of every M weights pruned), e.g. 2:4.")
@click.option("--structure", type=click.Choice(["channels", "heads", "both"]), default=None,
              help="Structured pruning (--method wanda-sp or flap): remove MLP channels, attention heads (whole "
                   "key/value groups) or both; the saved model is smaller.")
@click.option("--ratio", type=float, default=None,
              help="With --structure: fraction of each block's channels / key-value groups removed, in [0, 1) "
                   "(floor per block).")
@click.option("--no-bias-compensation", "no_bias_compensation", is_flag=True,
              help="FLAP without its bias compensation (needed where the config has no bias flag, e.g. Qwen2-VL).")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="ATV visual budget scale.")
@click.option("--visual-ratio", type=float, default=0.1, show_default=True,
              help="Fraction of visual tokens kept by the *-fixed pools.")
@click.option("--allocation", type=click.Choice(["uniform", "das"]), default=None,
              help="Per-matrix sparsity: uniform, or TAMP's diversity-aware DAS [default: das for tamp].")
@shared("samples", "seed", "device")
@click.option("--offload-device", default="cpu", show_default=True, help="Where calibration activations live.")
@shared("load", "activation-memory", "spill-dir", "max-shard-size", "dtype", "image-root", "max-pixels",
        "max-frames", "fps", "max-length", "out", "overwrite", "trust-remote-code", "quiet")
@click.pass_context
@one_line_errors
def prune(ctx: click.Context, recipe_path: Path | None, model_path: Path, calib_path: Path | None, method: str,
          pool: str | None, sparsity: float | None, pattern: str | None, structure: str | None, ratio: float | None,
          no_bias_compensation: bool, alpha: float, visual_ratio: float, allocation: str | None, samples: int,
          seed: int, device: str | None, offload_device: str, load: str, activation_memory: str | None,
          spill_dir: Path | None, max_shard_size: str | None, dtype: str, image_root: Path | None,
          max_pixels: int | None, max_frames: int, fps: float | None, max_length: int | None, out_dir: Path,
          overwrite: bool, trust_remote_code: bool, quiet: bool) -> None:
    """Prune a checkpoint's language model and save it with pruning_report.json."""
    from ..errors import AtvPruneError, not_a_file
    from ..model.loading import silence_loading_bars
    from ..model.videos import VideoSampling
    from ..runs.checkpoint import prune_checkpoint
    from ..runs.config import PruneConfig, RunSettings, parse_pattern
    from ..runs.export import check_output_dir
    from ..runs.preflight import check_run_inputs
    from ..runs.recipe import Recipe

    if recipe_path is not None:
        given = {name for name in ("method", "pool", "alpha")
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        recipe = {k: v for k, v in Recipe.load(recipe_path).settings().items() if k not in given}
        method, pool, alpha = recipe.get("method", method), recipe.get("pool", pool), recipe.get("alpha", alpha)
    if quiet:
        silence_loading_bars()
    config = PruneConfig(method=method, pool=pool, sparsity=sparsity, alpha=alpha, visual_ratio=visual_ratio,
                         pattern=parse_pattern(pattern) if pattern else None, allocation=allocation,
                         samples=samples, seed=seed, structure=structure, ratio=ratio,
                         bias_compensation=not no_bias_compensation)
    settings = RunSettings(device=device, offload_device=offload_device, progress=not quiet, load=load,
                           max_shard_size=max_shard_size, activation_memory=activation_memory,
                           spill_dir=str(spill_dir) if spill_dir else None)
    if config.needs_calibration and calib_path is None:
        raise AtvPruneError(f"--method {method} needs calibration data: pass --calib FILE")
    if calib_path is not None and not calib_path.is_file():
        raise AtvPruneError(f"calibration file {calib_path} {not_a_file(calib_path)}: pass an existing --calib FILE")
    check_output_dir(out_dir, overwrite, protected=[model_path])
    check_run_inputs(model_path, [config], calib_path=calib_path, image_root=image_root, max_pixels=max_pixels,
                     device=device, offload_device=offload_device, trust_remote_code=trust_remote_code,
                     max_length=max_length)
    report = prune_checkpoint(model_path, out_dir, calib_path, config, settings=settings, dtype=dtype,
                              image_root=image_root, max_pixels=max_pixels, max_length=max_length,
                              trust_remote_code=trust_remote_code, overwrite=overwrite,
                              video=VideoSampling(max_frames=max_frames, fps=fps),
                              extra={"recipe": str(recipe_path.resolve())} if recipe_path is not None else None)
    if report.structure is not None:
        heads, channels, parameters = (report.structure[k] for k in ("heads", "channels", "parameters"))
        done = (f"structured-pruned {report.model['blocks']} blocks to {heads['after']}/{heads['before']} heads and "
                f"{channels['after']}/{channels['before']} MLP channels, {parameters['before'] / 1e6:.2f}M -> "
                f"{parameters['after'] / 1e6:.2f}M parameters")
    else:
        done = f"pruned {report.model['blocks']} blocks to {report.sparsity['overall']:.2%} sparsity"
    click.echo(f"{done} ({config.method}, pool {config.resolved_pool}, {config.target_label}, "
               f"{report.settings['load']}) in {report.seconds['total']:.1f}s; saved to {out_dir} in "
               f"{report.seconds['save']:.1f}s")
    for note in (report.structure or {}).get("notes", []):
        click.echo(f"note: {note}")


@main.command()
def families() -> None:
    """List the model families the registry knows (and which take video calibration)."""
    from ..model.families import FAMILIES

    for family in FAMILIES.values():
        inputs = "image+video" if family.takes_video else "image"
        click.echo(f"{family.name:16s} model_type {', '.join(family.model_types):20s} {inputs:12s} {family.notes}")


def _register() -> None:
    from .demo import demo
    from .evaluate import eval_command, tasks_command
    from .study import compare, sweep

    for command in (demo, eval_command, tasks_command, compare, sweep):
        main.add_command(command)


_register()

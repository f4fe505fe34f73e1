"""``atv-prune demo``: the paper's main comparison on the built-in trained model, out of the box.

Prunes the shipped LLaVA (``atv_prune/builtin/checkpoint``) with magnitude, Wanda (mixed pool),
Wanda (text pool) and ATV at 50% and 60% unstructured and 2:4, evaluates the dense model and each
pruned one on the built-in benchmark's test split through lmms-eval, and writes a Table-2-style
retention table (``report.md``), ``report.json``, ``report.csv`` and ``retention.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import builtin
from ..errors import AtvPruneError
from .options import CLUSTER_OPTIONS, DEFAULT_MAX_FRAMES, shared
from .support import Command, one_line_errors

DEMO_METHODS = ["magnitude", "wanda", "wanda:text", "atv"]
DEMO_TARGETS = [dict(sparsity=0.5, pattern=None), dict(sparsity=0.6, pattern=None), dict(sparsity=None, pattern=(2, 4))]


def builtin_checkpoint() -> Path:
    """The shipped trained model, or a one-line error saying how to get it."""
    folder = builtin.CHECKPOINT_DIR
    if not (folder / "config.json").is_file():
        raise AtvPruneError(f"the built-in model is not in {folder}: use a full checkout of the project, "
                            "or retrain it with the training command in docs/builtin.md")
    return folder


def builtin_benchmark() -> Path:
    """The shipped benchmark (test split and calibration captions), or a one-line error."""
    folder = builtin.BENCHMARK_DIR
    if not (folder / "test").is_dir() or not (folder / "calib.json").is_file():
        arguments = ", ".join(f"{k}={v}" for k, v in builtin.SHIPPED_BENCHMARK_ARGS.items())
        raise AtvPruneError(f"the built-in benchmark is not in {folder}: generate it with "
                            f"atv_prune.builtin.scenes.generate_benchmark('{folder}', {arguments})")
    return folder


@click.command("demo", cls=Command)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("atv-demo"), show_default=True,
              help="Output folder; re-running resumes it.")
@shared("samples", "limit", "batch-size", "device", "dtype", "seed")
@click.option("--overwrite", is_flag=True, help="Recompute everything in --out.")
@shared("quiet", *CLUSTER_OPTIONS)
@one_line_errors
def demo(out_dir: Path, samples: int, limit: int | None, batch_size: int, device: str | None, dtype: str,
         seed: int, overwrite: bool, quiet: bool, **cluster: Any) -> None:
    """Prune the built-in model with magnitude, Wanda, Wanda (text) and ATV; print the retention table."""
    from ..eval.tasks import builtin_tasks
    from .study import run_comparison

    model, bench = builtin_checkpoint(), builtin_benchmark()
    kw: dict[str, Any] = dict(model_path=model, calib_path=bench / "calib.json", tasks=tuple(builtin_tasks(bench)),
                              bench_dir=bench, limit=limit, batch_size=batch_size, samples=samples, seed=seed,
                              device=device, dtype=dtype, image_root=None, max_pixels=None, max_length=None,
                              max_frames=DEFAULT_MAX_FRAMES, fps=None, out_dir=out_dir, overwrite=overwrite,
                              trust_remote_code=False, quiet=quiet, load="auto",
                              device_map=None, max_memory=None, offload_folder=None, **cluster)
    names = {"json": "report.json", "md": "report.md", "csv": "report.csv", "png": "retention.png"}
    run_comparison(kw, DEMO_METHODS, DEMO_TARGETS, 1.0, "demo", names)
    click.echo(f"written to {out_dir}: report.md, report.json, report.csv, retention.png")

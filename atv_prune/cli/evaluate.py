"""``atv-prune eval``: score a checkpoint on built-in and lmms-eval tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import AtvPruneError, ConfigError
from .cluster import placement
from .options import PLACEMENT_OPTIONS, shared
from .support import ListOptionsCommand, one_line_errors

if TYPE_CHECKING:
    from ..eval.run import EvalResult

RESULTS_FILE = "eval_results.json"


def _read_result(path: Path) -> EvalResult:
    """The result saved in a dense model's eval_results.json."""
    from ..eval.run import EvalResult

    fix = "pass the eval_results.json 'atv-prune eval --out' wrote for the dense model"
    if not path.is_file():
        raise AtvPruneError(f"--baseline {path} is not a file: {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AtvPruneError(f"cannot read --baseline {path} ({error}): {fix}") from None
    result = data.get("result", data) if isinstance(data, dict) else None
    scores = result.get("scores") if isinstance(result, dict) else None
    if not isinstance(scores, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores.values()):
        raise AtvPruneError(f"--baseline {path} holds no numeric per-task scores: {fix}")
    try:
        return EvalResult.from_dict(result)
    except AtvPruneError as error:
        raise AtvPruneError(f"--baseline {path}: {error}") from None


@click.command("eval", cls=ListOptionsCommand)
@shared("model", "tasks", "bench", "limit", "batch-size", "device", "dtype", *PLACEMENT_OPTIONS, "max-frames", "fps")
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path), default=None,
              help="eval_results.json of the dense model: adds retention (pruned / dense) "
                   "per task and its mean.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help=f"Folder to write {RESULTS_FILE} into (created if missing).")
@click.option("--overwrite", is_flag=True, help=f"Replace an existing {RESULTS_FILE} in --out.")
@shared("trust-remote-code", "quiet")
@one_line_errors
def eval_command(model_path: Path, tasks: tuple[str, ...], bench_dir: Path | None, limit: int | None,
                 batch_size: int, device: str | None, dtype: str, device_map: str | None, max_memory: str | None,
                 offload_folder: Path | None, max_frames: int, fps: float | None, baseline_path: Path | None,
                 out_dir: Path | None, overwrite: bool, trust_remote_code: bool, quiet: bool) -> None:
    """Evaluate a checkpoint with lmms-eval (offline, greedy) and print a score per task."""
    from ..builtin import default_benchmark
    from ..eval.env import require_lmms_eval
    from ..model.loading import compute_dtype, load_model_and_processor, resolve_device, silence_loading_bars
    from ..model.videos import VideoSampling
    from ..runs.export import check_creatable, write_json_atomic
    from ..runs.preflight import check_model

    spread = placement({"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder})
    if spread is not None and device is not None:
        raise ConfigError("--device-map places the model itself: drop --device (or --device-map)")
    out_file = out_dir / RESULTS_FILE if out_dir is not None else None
    if out_file is not None:
        check_creatable(out_dir)
        if out_file.exists() and not out_file.is_file():
            raise AtvPruneError(f"{out_file} is a folder: remove it or choose another --out")
        if out_file.exists() and not overwrite:
            raise AtvPruneError(f"{out_file} already exists: pass --overwrite or choose another --out")
    if bench_dir is not None and not bench_dir.is_dir():
        raise AtvPruneError(f"benchmark folder {bench_dir} not found: pass an existing --bench DIR")
    bench_dir = bench_dir if bench_dir is not None else default_benchmark()
    require_lmms_eval()
    from ..eval.run import check_comparable, check_tasks, evaluate, retention

    # Everything checkable is checked before the (possibly long) model load and evaluation,
    # the cheap checks first (the tasks may need lmms-eval's task index and their datasets).
    compute_dtype(dtype, resolve_device(device))
    check_model(model_path, device=device, trust_remote_code=trust_remote_code)
    baseline = _read_result(baseline_path) if baseline_path is not None else None
    task_ids = check_tasks(list(tasks), bench_dir)
    if baseline is not None:
        check_comparable(task_ids.values(), limit, baseline)
    if quiet:
        silence_loading_bars()
    loaded = load_model_and_processor(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                      placement=spread)
    if spread is None:
        loaded.model.to(loaded.device)
    result = evaluate(loaded.model, loaded.processor, list(tasks), bench_dir=bench_dir, limit=limit,
                      batch_size=batch_size, device=str(loaded.device), progress=not quiet,
                      video=VideoSampling(max_frames=max_frames, fps=fps))
    kept = retention(result, baseline) if baseline is not None else None

    header = f"{'task':28s} {'lmms-eval id':28s} {'docs':>6s} {'score':>8s}"
    click.echo(header + ("  retention" if kept else ""))
    for name, task in result.task_ids.items():
        line = f"{name:28s} {task:28s} {result.samples[task]:6d} {result.scores[task]:8.2f}"
        if kept:
            line += f"  {kept['tasks'][task]:9.2f}" if task in kept["tasks"] else "  (dense 0)"
        click.echo(line)
    footer = f"{'mean':28s} {'':28s} {'':6s} {result.mean:8.2f}"
    click.echo(footer + (f"  {kept['mean']:9.2f}" if kept else ""))
    click.echo(f"lmms-eval {result.versions['lmms-eval']}, transformers {result.versions['transformers']}, "
               f"torch {result.versions['torch']}; {result.seconds:.1f}s")
    if out_file is not None:
        record = {"model": str(model_path), "result": result.to_dict()}
        if kept is not None:
            record["baseline"] = str(baseline_path)
            record["retention"] = kept
        write_json_atomic(out_file, record)
        click.echo(f"wrote {out_file}")


@click.command("tasks", cls=ListOptionsCommand)
@click.option("--tasks", multiple=True, help="Built-in task names, e.g. exist count [default: every task of --bench].")
@shared("bench", "out", "overwrite")
@one_line_errors
def tasks_command(tasks: tuple[str, ...], bench_dir: Path | None, out_dir: Path, overwrite: bool) -> None:
    """Write the built-in tasks as an lmms-eval task folder, to score any checkpoint with the stock
    lmms-eval command line (--include_path)."""
    from ..builtin import default_benchmark
    from ..eval.tasks import TASK_PREFIX, builtin_tasks, write_builtin_tasks
    from ..runs.export import write_dir_atomic
    from .study import words

    bench = bench_dir if bench_dir is not None else default_benchmark()
    if bench is None or not Path(bench).is_dir():
        raise AtvPruneError(f"benchmark folder {bench_dir} not found: pass an existing --bench DIR")
    names = [name.removeprefix(TASK_PREFIX) for name in words(tasks)] or builtin_tasks(bench)
    out = out_dir.resolve()
    ids: dict[str, str] = {}
    write_dir_atomic(out, lambda folder: ids.update(write_builtin_tasks(bench, folder, names, located_at=out)),
                     overwrite)
    click.echo(f"wrote {len(ids)} lmms-eval tasks to {out}: {' '.join(ids.values())}")
    click.echo("score a checkpoint with the stock lmms-eval command line (offline, greedy), e.g.:\n"
               f"  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model llava_hf "
               f"--model_args pretrained=CHECKPOINT,device_map=cpu,dtype=float32 --include_path {out} "
               f"--tasks {','.join(ids.values())} --batch_size 1 --device cpu")

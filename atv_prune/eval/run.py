"""Evaluate an in-memory model on built-in and lmms-eval tasks; retention of a pruned model.

:func:`evaluate` writes the built-in tasks' YAMLs into a temporary ``include_path``, loads every
task offline one by one (so a task whose data is not on this machine fails with one line naming
it), runs ``lmms_eval.evaluator.simple_evaluate`` with an :class:`~atv_prune.eval.model.InMemoryVLM`,
and checks the returned results instead of trusting that nothing went wrong: every task must come
back with its score. Each task's score is put on a 0-100 scale (see :data:`PRIMARY_METRICS`).
"""

from __future__ import annotations

import difflib
import math
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..errors import AtvPruneError, one_line
from ..model.videos import VideoSampling
from .env import offline, progress_bars, require_lmms_eval, versions
from .tasks import TASK_PREFIX, builtin_tasks, read_records, task_id, write_builtin_tasks

#: Task id -> ([metric names summed], divisor): score = 100 * sum / divisor. The built-in tasks
#: report accuracy in [0, 100] already; MME's perception (max 2000) and cognition (max 800)
#: scores are summed and put over their maximum. MMBench-dev needs an OpenAI judge; its
#: ``_static`` variant does not.
PRIMARY_METRICS: dict[str, tuple[tuple[str, ...], float]] = {
    "gqa": (("exact_match",), 1.0),
    "mmbench_en_dev": (("gpt_eval_score",), 100.0),
    "mmbench_en_dev_static": (("gpt_eval_score",), 100.0),
    "mme": (("mme_perception_score", "mme_cognition_score"), 2800.0),
    "mmmu_val": (("mmmu_acc",), 1.0),
    "ok_vqa_val2014": (("exact_match",), 1.0),
    "pope": (("pope_accuracy",), 1.0),
    "scienceqa_img": (("exact_match",), 1.0),
    "textvqa_val": (("exact_match",), 1.0),
    "vizwiz_vqa_val": (("exact_match",), 1.0),
}
#: For any other lmms-eval task: its first metric, read as a fraction in [0, 1] when it is one of
#: these, and as already on a 0-100 scale otherwise (flagged in the result's ``scale``).
FRACTION_METRICS = frozenset({"exact_match", "acc", "acc_norm", "accuracy", "anls", "f1", "relaxed_accuracy"})


@dataclass
class EvalResult:
    """Scores of one model: per task in [0, 100] and their mean, with what produced them."""

    scores: dict[str, float]
    mean: float
    samples: dict[str, int]
    metrics: dict[str, dict[str, Any]]
    scale: dict[str, str]
    versions: dict[str, str]
    seconds: float
    limit: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    bench_dir: str | None = None
    task_ids: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Read back :meth:`to_dict` output (e.g. a saved ``eval_results.json``)."""
        required = [name for name, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise AtvPruneError(f"not an atv-prune evaluation result (no {', '.join(missing)}): pass an "
                                "eval_results.json written by 'atv-prune eval'")
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def resolve_tasks(names: list[str], bench_dir: str | Path | None) -> dict[str, str]:
    """Map each requested task name to its lmms-eval task id, in order.

    A name is built-in when it is a task of ``bench_dir``'s test split (given as ``exist`` or as
    ``atvbench_exist``) and maps to ``atvbench_<task>``; every other name is an lmms-eval task id,
    passed on as is.
    """
    if not names:
        raise AtvPruneError("no tasks given: name built-in tasks (e.g. exist count) or lmms-eval task ids")
    available = builtin_tasks(bench_dir) if bench_dir is not None else []
    ids: dict[str, str] = {}
    for name in names:
        short = name.removeprefix(TASK_PREFIX)
        if short in available:
            task = task_id(short)
        elif name.startswith(TASK_PREFIX):
            where = f"in {bench_dir}" if bench_dir is not None else "without a benchmark folder (--bench)"
            raise AtvPruneError(f"built-in task '{short}' not found {where}; built-in tasks: "
                                f"{', '.join(available) or 'none'}")
        else:
            task = name
        if task in ids.values():
            raise AtvPruneError(f"task {task} requested more than once")
        ids[name] = task
    return ids


def check_tasks(names: list[str], bench_dir: str | Path | None) -> dict[str, str]:
    """:func:`resolve_tasks` against ``bench_dir`` (None: no built-in tasks), with every
    built-in task's records read and checked and every other task loaded from lmms-eval (offline,
    from the local datasets cache): the task errors an evaluation would meet, before any model
    is loaded."""
    require_lmms_eval()
    task_ids = resolve_tasks(list(names), bench_dir)
    others = [task for task in task_ids.values() if not task.startswith(TASK_PREFIX)]
    for task in task_ids.values():
        if task.startswith(TASK_PREFIX):
            read_records(Path(bench_dir) / "test" / f"{task.removeprefix(TASK_PREFIX)}.jsonl", Path(bench_dir))
    if others:
        from lmms_eval.tasks import TaskManager

        task_manager = TaskManager(verbosity="WARNING")
        with progress_bars(False):
            for name in others:
                _load_task(name, task_manager, _task_hint(bench_dir))
    return task_ids


def _task_hint(bench_dir: str | Path | None) -> str:
    """What an unknown task name is not, and what the built-in names are."""
    if bench_dir is None:
        return "no benchmark folder for built-in tasks (pass --bench)"
    return f"not a task of {bench_dir} (built-in: {', '.join(builtin_tasks(bench_dir))})"


def _root_cause(error: BaseException) -> BaseException:
    """The exception under tenacity's RetryError (lmms-eval retries dataset loading five times)."""
    attempt = getattr(error, "last_attempt", None)
    inner = attempt.exception() if attempt is not None else None
    return _root_cause(inner) if inner is not None else error


def _check_known(name: str, task_manager: Any, builtin_hint: str) -> None:
    """Refuse a name that is not a task in lmms-eval's index (suggesting close ones)."""
    if name not in task_manager.all_tasks:
        close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AtvPruneError(f"unknown task '{name}': not an lmms-eval task id and {builtin_hint}{hint}; "
                            "pass built-in task names or lmms-eval task ids")
    if task_manager.task_index[name]["type"] not in ("task", "python_task"):
        raise AtvPruneError(f"'{name}' is an lmms-eval group or tag, not a task: pass its tasks by name")


def _load_task(name: str, task_manager: Any, builtin_hint: str) -> Any:
    """Load one lmms-eval task (config, hooks and data) offline; one-line errors name the task."""
    from lmms_eval.api.task import Task
    from lmms_eval.tasks import get_task_dict

    _check_known(name, task_manager, builtin_hint)
    try:
        with offline():
            loaded = get_task_dict([name], task_manager)
    except Exception as error:
        raise AtvPruneError(f"task '{name}' cannot be loaded offline: {one_line(_root_cause(error), with_type=True)}; "
                            "its data must be in this machine's datasets cache "
                            "(LMMS_EVAL_DATASETS_CACHE, HF_DATASETS_CACHE or HF_HOME/datasets)") from None
    task = loaded.get(name)
    if not isinstance(task, Task):
        raise AtvPruneError(f"lmms-eval did not return task '{name}' (got {sorted(map(str, loaded))})")
    if task.OUTPUT_TYPE != "generate_until":
        raise AtvPruneError(f"task '{name}' has output type {task.OUTPUT_TYPE}; only generate_until tasks "
                            "can be evaluated (the paper's nine all are)")
    return task


def _metric_value(row: dict[str, Any], metric: str) -> Any:
    """A metric from a results row keyed ``metric,filter``: the unfiltered value, else the first filter's."""
    keys = sorted(key for key in row if key.split(",")[0] == metric)
    if f"{metric},none" in keys:
        return row[f"{metric},none"]
    return row[keys[0]] if keys else None


def _score(name: str, row: dict[str, Any], config: dict[str, Any]) -> tuple[float, str]:
    """(score on 0-100, how it was scaled) from one task's lmms-eval results row."""
    if name.startswith(TASK_PREFIX):
        metrics, divisor = ("accuracy",), 100.0
    elif name in PRIMARY_METRICS:
        metrics, divisor = PRIMARY_METRICS[name]
    else:
        listed = [m["metric"] for m in config.get("metric_list") or []
                  if isinstance(m, dict) and "metric" in m]
        if not listed:
            raise AtvPruneError(f"task '{name}' lists no metric in its config")
        metrics, divisor = (listed[0],), 1.0 if listed[0] in FRACTION_METRICS else 100.0
    values = []
    for metric in metrics:
        value = _metric_value(row, metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AtvPruneError(f"lmms-eval returned no finite '{metric}' for task '{name}' (got {value!r})")
        values.append(float(value))
    how = "+".join(metrics) + (f" / {divisor:g} * 100" if divisor != 100.0 else "")
    return 100.0 * sum(values) / divisor, how


def evaluate(model: nn.Module, processor: Any, tasks: list[str], *, bench_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, device: str = "cpu",
             progress: bool = False, video: VideoSampling | None = None) -> EvalResult:
    """Evaluate ``model`` (on ``device`` already) with lmms-eval on ``tasks``; scores in [0, 100].

    ``tasks``: built-in task names (resolved against the benchmark folder ``bench_dir``; the
    command line defaults it to the shipped benchmark) or lmms-eval task ids. ``limit``: the
    first N documents of every task. Runs offline, single process, greedy. ``progress``: show the
    generation bar and lmms-eval's and datasets' own bars (off: none of them). Raises
    :class:`AtvPruneError` for anything the user can fix, :class:`~atv_prune.eval.model.GenerationError`
    when generating fails. ``video``: how frames are drawn from video documents' clips (default
    :class:`~atv_prune.model.videos.VideoSampling`).
    """
    started = time.perf_counter()
    require_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .model import InMemoryVLM

    if limit is not None and limit < 1:
        raise AtvPruneError(f"limit must be at least 1, got {limit}")
    task_ids = resolve_tasks(list(tasks), bench_dir)
    ids = list(task_ids.values())
    builtin = [task.removeprefix(TASK_PREFIX) for task in ids if task.startswith(TASK_PREFIX)]
    wrapper = InMemoryVLM(model, processor, batch_size=batch_size, device=device, progress=progress, video=video)
    with tempfile.TemporaryDirectory(prefix="atv-eval-tasks-") as include:
        if builtin:
            write_builtin_tasks(bench_dir, include, builtin)
        # Indexing lmms-eval's ~2000 bundled task YAMLs takes seconds: only when one is asked for.
        task_manager = TaskManager(verbosity="WARNING", include_path=include,
                                   include_defaults=len(builtin) < len(ids))
        # Without cli_args, tasks such as textvqa and mmbench write submission files into the
        # working directory; output_path sends them to the temporary folder instead.
        cli_args = SimpleNamespace(output_path=include, process_with_media=True)
        with offline(), progress_bars(progress):
            loaded = [_load_task(name, task_manager, _task_hint(bench_dir)) for name in ids]
            results = simple_evaluate(model=wrapper, tasks=loaded, task_manager=task_manager, limit=limit,
                                      batch_size=batch_size, device=device, bootstrap_iters=0,
                                      log_samples=False, process_docs_parallel=1, verbosity="WARNING",
                                      cli_args=cli_args)
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise AtvPruneError("lmms-eval returned no results (is RANK set to a non-zero rank here?)")
    missing = [name for name in ids if name not in results["results"]]
    if missing:
        raise AtvPruneError(f"lmms-eval returned no result for task {', '.join(missing)}")
    scores, scale, metrics, samples = {}, {}, {}, {}
    for name in ids:
        row = results["results"][name]
        scores[name], scale[name] = _score(name, row, results.get("configs", {}).get(name, {}))
        metrics[name] = {k: v for k, v in row.items() if k != "alias" and "_stderr" not in k}
        samples[name] = int(results.get("n-samples", {}).get(name, {}).get("effective", 0))
    return EvalResult(scores=scores, mean=sum(scores.values()) / len(scores), samples=samples,
                      metrics=metrics, scale=scale, versions=versions(),
                      seconds=round(time.perf_counter() - started, 3), limit=limit, batch_size=batch_size,
                      device=str(device), bench_dir=str(Path(bench_dir).resolve()) if builtin else None,
                      task_ids=task_ids)


def check_comparable(tasks: Iterable[str], limit: int | None, dense: EvalResult) -> None:
    """Raise unless a run over ``tasks`` with ``limit`` can be compared with ``dense``."""
    tasks = set(tasks)
    if tasks != set(dense.scores):
        raise AtvPruneError(f"retention needs the same tasks: {', '.join(sorted(tasks))} here, "
                            f"{', '.join(sorted(dense.scores))} in the dense result")
    if limit != dense.limit:
        raise AtvPruneError(f"retention needs the same documents: limit {limit} here, "
                            f"{dense.limit} in the dense result")
    if not any(dense.scores.values()):
        raise AtvPruneError("the dense model scores 0 on every task: retention is undefined")


def retention_of(scores: dict[str, float], dense: dict[str, float]) -> dict[str, Any]:
    """Per-task retention (``scores`` / ``dense`` * 100) and its mean over tasks, as in the paper.

    A task whose dense score is 0 has no defined retention: it is left out of the mean with a
    warning and listed under ``excluded``; all tasks at 0 raises.
    """
    per_task, excluded = {}, []
    for name, base in dense.items():
        if base == 0:
            excluded.append(name)
        else:
            per_task[name] = 100.0 * scores[name] / base
    if not per_task:
        raise AtvPruneError("the dense model scores 0 on every task: retention is undefined")
    if excluded:
        warnings.warn(f"dense score is 0 on {', '.join(excluded)}: left out of the mean retention",
                      stacklevel=3)
    return {"tasks": per_task, "mean": sum(per_task.values()) / len(per_task), "excluded": excluded}


def retention(pruned: EvalResult, dense: EvalResult) -> dict[str, Any]:
    """:func:`retention_of` two evaluations, which must cover the same tasks with the same ``limit``."""
    check_comparable(pruned.scores, pruned.limit, dense)
    return retention_of(pruned.scores, dense.scores)

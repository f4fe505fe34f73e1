"""The built-in benchmark's test split as lmms-eval tasks over local files.

A benchmark folder ``BENCH`` holds ``BENCH/test/<task>.jsonl``, one record a line::

    {"id": str, "task": str, "image": "images/x.png" | null, "question": str, "answer": str,
     "choices": [str, ...] (optional; the answer is then a letter), "chance": float,
     "image_position": "before" | "after" (optional, default "before": where the image goes),
     "video": "videos/x.png" (optional, instead of an image: a clip, see atv_prune.model.videos)}

with image and video paths relative to ``BENCH``. :func:`write_builtin_tasks` checks every record, writes a
normalised copy (absolute image paths, every key present) and an lmms-eval task YAML per task
(``atvbench_<task>``, the local ``json`` dataset builder) plus a ``utils.py`` pointing at
:mod:`atv_prune.eval.hooks`, into a folder that is then a TaskManager ``include_path``.
Nothing is downloaded: the YAMLs name only local files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from ..errors import AtvPruneError
from .hooks import LETTERS, METRIC

TASK_PREFIX = "atvbench_"
#: Where a record's image goes relative to its question.
IMAGE_POSITIONS = ("before", "after")
#: Answers are a word or two; 8 new tokens leave room for a tokenizer that splits words.
MAX_NEW_TOKENS = 8

_UTILS = (
    '"""lmms-eval hooks of the atvbench tasks in this folder (written by atv_prune.eval.tasks)."""\n\n'
    "from atv_prune.eval.hooks import doc_to_messages, doc_to_text, doc_to_visual, process_results  # noqa: F401\n"
)
_FUNCTIONS = (
    "doc_to_visual: !function utils.doc_to_visual\n"
    "doc_to_text: !function utils.doc_to_text\n"
    "doc_to_messages: !function utils.doc_to_messages\n"
    "process_results: !function utils.process_results\n"
)


def builtin_tasks(bench_dir: str | Path) -> list[str]:
    """The task names of a benchmark folder's test split (the ``test/*.jsonl`` stems), sorted."""
    test = Path(bench_dir) / "test"
    if not test.is_dir():
        raise AtvPruneError(f"no test split in {bench_dir} ({test} missing): "
                            "pass a benchmark folder as --bench")
    names = sorted(path.stem for path in test.glob("*.jsonl"))
    if not names:
        raise AtvPruneError(f"{test} holds no <task>.jsonl files: pass a generated benchmark folder")
    return names


def task_id(name: str) -> str:
    """The lmms-eval task id of built-in task ``name``."""
    return f"{TASK_PREFIX}{name}"


def _record(raw: Any, bench: Path, where: str) -> dict[str, Any]:
    """One checked, normalised test record."""
    if not isinstance(raw, dict):
        raise AtvPruneError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("id", "question", "answer"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise AtvPruneError(f"{where}: '{key}' must be a non-empty string")
    image = raw.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise AtvPruneError(f"{where}: 'image' must be a path relative to {bench} or null")
        path = (bench / image).resolve()
        if not path.is_file():
            raise AtvPruneError(f"{where}: image {image} not found under {bench}")
        image = str(path)
    video = raw.get("video")
    if video is not None:
        if not isinstance(video, str) or image is not None:
            raise AtvPruneError(f"{where}: 'video' must be a path relative to {bench}, in a record without an image")
        path = (bench / video).resolve()
        if not path.exists():
            raise AtvPruneError(f"{where}: video {video} not found under {bench}")
        video = str(path)
    choices = raw.get("choices") or []
    if (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
            or len(choices) > len(LETTERS)):
        raise AtvPruneError(f"{where}: 'choices' must be a list of at most {len(LETTERS)} strings")
    if choices and raw["answer"] not in LETTERS[: len(choices)]:
        raise AtvPruneError(f"{where}: answer '{raw['answer']}' is not one of the letters "
                            f"of its {len(choices)} choices")
    position = raw.get("image_position", "before")
    if position not in IMAGE_POSITIONS:
        raise AtvPruneError(f"{where}: 'image_position' must be one of {', '.join(IMAGE_POSITIONS)}, got {position!r}")
    chance = raw.get("chance")
    if chance is not None and (not isinstance(chance, (int, float)) or not math.isfinite(chance)):
        raise AtvPruneError(f"{where}: 'chance' must be a number")
    return {"id": raw["id"], "task": str(raw.get("task", "")), "image": image, "video": video,
            "question": raw["question"],
            "answer": raw["answer"], "choices": choices, "chance": None if chance is None else float(chance),
            "image_position": position}


def read_records(jsonl: Path, bench: Path) -> list[dict[str, Any]]:
    """All records of one task file, checked; raises :class:`AtvPruneError` naming file and line."""
    fix = "fix the file, or regenerate the benchmark with atv_prune.builtin.scenes.generate_benchmark"
    records = []
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise AtvPruneError(f"cannot read {jsonl}: {error.strerror or error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as error:
            raise AtvPruneError(f"{jsonl}:{number}: not valid JSON ({error}): {fix}") from None
        try:
            records.append(_record(raw, bench, f"{jsonl}:{number}"))
        except AtvPruneError as error:
            raise AtvPruneError(f"{error}: {fix}") from None
    if not records:
        raise AtvPruneError(f"{jsonl} holds no records: {fix}")
    return records


def task_config(name: str, data_file: Path, cache_dir: Path, bench: Path) -> dict[str, Any]:
    """The lmms-eval task config of built-in task ``name`` (without the ``!function`` hooks)."""
    return {
        "task": task_id(name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": MAX_NEW_TOKENS, "until": ["\n"], "do_sample": False,
                              "temperature": 0.0, "num_beams": 1},
        "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "benchmark": str(bench)},
    }


def write_builtin_tasks(bench_dir: str | Path, dest: str | Path, names: list[str] | None = None,
                        located_at: str | Path | None = None) -> dict[str, str]:
    """Write lmms-eval tasks for the test split of ``bench_dir`` into folder ``dest``.

    ``names`` limits the tasks (default: all). ``located_at``: where the folder will be read from
    when that is not ``dest`` (it is written elsewhere and moved there): the YAMLs name their data
    files there. Returns built-in name -> lmms-eval task id. Every record is checked first, so a
    bad benchmark fails here with one line, not inside lmms-eval.
    """
    bench = Path(bench_dir).resolve()
    available = builtin_tasks(bench)
    names = available if names is None else names
    unknown = [name for name in names if name not in available]
    if unknown:
        raise AtvPruneError(f"no task {', '.join(unknown)} in {bench}/test; "
                            f"built-in tasks: {', '.join(available)}")
    dest = Path(dest)
    home = Path(located_at) if located_at is not None else dest
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "utils.py").write_text(_UTILS, encoding="utf-8")
    ids = {}
    for name in names:
        records = read_records(bench / "test" / f"{name}.jsonl", bench)
        data_file = f"{task_id(name)}.jsonl"
        (dest / data_file).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records),
                                      encoding="utf-8")
        config = yaml.safe_dump(task_config(name, home / data_file, home / "hf_datasets", bench), sort_keys=False)
        (dest / f"{task_id(name)}.yaml").write_text(config + _FUNCTIONS, encoding="utf-8")
        ids[name] = task_id(name)
    return ids

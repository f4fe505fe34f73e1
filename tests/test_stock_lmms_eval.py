"""Our scores equal stock lmms-eval's: the built-in tasks scored through our model class and through
lmms-eval's own ``llava_hf`` (its chat class and its simple one), on the shipped model dense and
pruned, greedy, give the same answer to every document.

lmms-eval's ``llava_hf`` imports ``decord`` (not declared by lmms-eval; requirements-ci.txt
installs it). It cannot answer text-only documents (the simple class reuses the previous
document's inputs, the chat class passes an empty image batch and scores ""), so the text-only
task is left out here (docs/usage.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("decord", reason="lmms-eval's llava_hf imports decord: pip install decord==0.6.0")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from atv_prune.builtin import BENCHMARK_DIR, CHECKPOINT_DIR  # noqa: E402
from atv_prune.eval.env import offline  # noqa: E402
from atv_prune.eval.model import InMemoryVLM  # noqa: E402
from atv_prune.eval.run import evaluate  # noqa: E402
from atv_prune.eval.tasks import builtin_tasks, read_records, write_builtin_tasks  # noqa: E402
from atv_prune.model.loading import load_model_and_processor  # noqa: E402
from atv_prune.runs.checkpoint import prune_checkpoint  # noqa: E402
from atv_prune.runs.config import PruneConfig, RunSettings  # noqa: E402

LIMIT = 40  # documents per task


def _image_tasks() -> list[str]:
    return [name for name in builtin_tasks(BENCHMARK_DIR)
            if all(r["image"] for r in read_records(BENCHMARK_DIR / "test" / f"{name}.jsonl", BENCHMARK_DIR))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped model and an ATV 60% pruning of it, saved as ``atv-prune prune`` saves it."""
    pruned = tmp_path_factory.mktemp("stock") / "atv60"
    prune_checkpoint(CHECKPOINT_DIR, pruned, BENCHMARK_DIR / "calib.json",
                     PruneConfig(method="atv", sparsity=0.6, samples=32),
                     settings=RunSettings(device="cpu", progress=False), dtype="float32")
    return {"dense": CHECKPOINT_DIR, "pruned": pruned}


def _answers(results: dict[str, Any]) -> dict[tuple[str, int], str]:
    """(task, document) -> the answer lmms-eval scored."""
    return {(task, sample["doc_id"]): str(sample["filtered_resps"][0])
            for task, samples in results["samples"].items() for sample in samples}


def _run(model: Any, folder: Path, tasks: list[str], **kwargs: Any) -> dict[str, Any]:
    with offline():
        return simple_evaluate(model=model, tasks=tasks, limit=LIMIT, device="cpu", bootstrap_iters=0,
                               log_samples=True, process_docs_parallel=1, verbosity="WARNING",
                               task_manager=TaskManager(verbosity="WARNING", include_path=str(folder),
                                                        include_defaults=False), **kwargs)


@pytest.fixture(scope="module")
def ours(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per checkpoint: our published scores (``evaluate``) and our class's answer to every document."""
    names = _image_tasks()
    folder = tmp_path_factory.mktemp("tasks")
    ids = list(write_builtin_tasks(BENCHMARK_DIR, folder, names).values())
    found: dict[str, Any] = {"names": names, "folder": folder, "ids": ids}
    for which, path in checkpoints.items():
        loaded = load_model_and_processor(path, dtype="float32", device="cpu")
        scores = evaluate(loaded.model, loaded.processor, names, bench_dir=BENCHMARK_DIR, limit=LIMIT,
                          batch_size=16).scores
        answers = _answers(_run(InMemoryVLM(loaded.model, loaded.processor, batch_size=16), folder, ids,
                                batch_size=16))
        found[which] = {"scores": scores, "answers": answers}
    return found


def test_the_comparison_covers_the_image_tasks_and_differing_models(ours: dict[str, Any]) -> None:
    assert ours["names"] == ["attribute", "count", "exist", "mcq", "reading", "rule", "spatial"]
    assert len(ours["dense"]["answers"]) == 7 * LIMIT
    changed = sum(ours["dense"]["answers"][key] != answer for key, answer in ours["pruned"]["answers"].items())
    assert changed >= 20  # the pruned model answers differently: two different models are compared


@pytest.mark.parametrize("force_simple", [True, False], ids=["simple", "chat"])
@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_builtin_scores_equal_stock_llava_hf(checkpoints: dict[str, Path], ours: dict[str, Any], which: str,
                                             force_simple: bool) -> None:
    stock = _run("llava_hf", ours["folder"], ours["ids"], batch_size=1, force_simple=force_simple,
                 model_args=f"pretrained={checkpoints[which]},device_map=cpu,dtype=float32")
    assert _answers(stock) == ours[which]["answers"]
    assert {task: stock["results"][task]["accuracy,none"] for task in ours["ids"]} == ours[which]["scores"]

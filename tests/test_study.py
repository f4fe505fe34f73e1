"""``atv-prune compare`` / ``sweep``: cells, resume, tables and figures (the evaluation is scripted here;
the lmms-eval bridge itself is tested in test_eval_bridge.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atv_prune.cli import main
from atv_prune.eval.run import EvalResult
from atv_prune.runs.cells import CellRunner
from tiny_checkpoints import make_llava_workspace

TASKS = ("exist", "count")


def _scripted_evaluate(self: CellRunner, model: torch.nn.Module, processor) -> dict:
    """Score = 100 x the fraction of non-zero decoder weights (dense 100, 50% pruned 50); ``count``
    also rewards ATV-like text calibration by a deterministic weight checksum so methods differ."""
    weights = [p.detach() for n, p in model.named_parameters() if "language_model.layers" in n and p.dim() == 2]
    kept = float(sum((w != 0).sum() for w in weights) / sum(w.numel() for w in weights))
    checksum = float(sum(w.abs().sum() for w in weights))
    scores = {"exist": 100 * kept, "count": min(100.0, 100 * kept + checksum % 7)}
    self.evaluations = getattr(self, "evaluations", 0) + 1
    return EvalResult(scores=scores, mean=sum(scores.values()) / 2, samples={t: 4 for t in TASKS}, metrics={},
                      scale={}, versions={}, seconds=0.0, limit=self.settings.limit).to_dict()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llava_workspace(tmp_path_factory.mktemp("study"))


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_compare_writes_a_table_and_resumes(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(CellRunner, "_evaluate", lambda self, m, p: calls.append(1) or _scripted_evaluate(self, m, p))
    out = workspace["root"] / "compare"
    args = ["compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", *TASKS,
            "--methods", "magnitude", "wanda", "atv", "--sparsity", "0.5", "0.6", "--pattern", "2:4",
            "--samples", "4", "--out", out]
    code, output = _invoke(*args)
    assert code == 0, output
    assert len(calls) == 1 + 3 * 3  # dense + 3 methods x 3 targets
    results = json.loads((out / "results.json").read_text())
    labels = [cell["label"] for cell in results["cells"]]
    assert labels == [f"{m} {t}" for m in ("magnitude", "wanda", "atv") for t in ("50%", "60%", "2:4")]
    for cell in results["cells"]:
        target = 0.6 if "60%" in cell["label"] else 0.5
        assert abs(cell["sparsity"] - target) < 0.01  # floor(p * in_features) per row
        assert abs(cell["retention"]["tasks"]["exist"] - 100 * (1 - cell["sparsity"])) < 1e-4
        assert cell["prune_seconds"] > 0 and cell["peak_memory_bytes"] >= 0
    table = (out / "table.md").read_text()
    assert "| label | exist | count | mean | prune_seconds | peak_memory_gib |" in table.splitlines()[0]
    assert (out / "table.csv").read_text().count("\n") == 1 + 1 + 9 and (out / "retention.png").stat().st_size
    calls.clear()
    code, output = _invoke(*args)  # resume: nothing recomputed
    assert code == 0 and calls == []
    code, output = _invoke(*args[:-6], "--sparsity", "0.7", "--samples", "4", "--out", out)
    assert code == 0 and len(calls) == 3  # only the new target's cells


def test_sweep_reports_tokens_against_retention(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    out = workspace["root"] / "sweep"
    code, output = _invoke("sweep", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks",
                           *TASKS, "--alpha", "0", "4", "--ratios", "0.25", "1.0", "--samples", "4", "--out", out)
    assert code == 0, output
    cells = {c["label"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == {"alpha=0", "alpha=4", "ratio=0.25", "ratio=1"}
    assert cells["alpha=0"]["visual_tokens_per_sample"] == 0
    assert cells["ratio=1"]["visual_tokens_per_sample"] == 16  # every visual token of the tiny LLaVA
    assert cells["ratio=0.25"]["visual_tokens_per_sample"] == 4
    assert cells["alpha=4"]["config"]["pool"] == "atv" and cells["ratio=1"]["config"]["pool"] == "drift-fixed"
    assert (out / "sweep.png").stat().st_size and (out / "sweep.md").exists()


def test_a_different_study_is_not_mixed_in(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    out = workspace["root"] / "mixed-up"
    base = ["--model", workspace["model"], "--calib", workspace["calib"], "--samples", "4", "--out", out]
    assert _invoke("compare", *base, "--tasks", "exist", "--methods", "magnitude", "--sparsity", "0.5")[0] == 0
    code, output = _invoke("compare", *base, "--tasks", "count", "--methods", "magnitude", "--sparsity", "0.5")
    assert code == 2 and "holds a different study" in output
    code, output = _invoke("compare", *base, "--tasks", "exist", "--methods", "magnitude")
    assert code == 2 and "at least one target" in output


def test_demo_runs_the_papers_grid_on_the_builtin_paths(workspace, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from atv_prune.cli import demo

    builtin = tmp_path / "builtin"
    shutil.copytree(workspace["model"], builtin / "checkpoint")
    bench = builtin / "benchmark"
    shutil.copytree(workspace["calib"].parent, bench)
    shutil.copy(workspace["calib"], bench / "calib.json")
    (bench / "test").mkdir()
    for task in TASKS:
        (bench / "test" / f"{task}.jsonl").write_text(json.dumps(
            {"id": f"{task}-0", "task": task, "image": None, "question": "q?", "answer": "a", "chance": 0.5}) + "\n")
    monkeypatch.setattr(demo.builtin, "CHECKPOINT_DIR", builtin / "checkpoint")
    monkeypatch.setattr(demo.builtin, "BENCHMARK_DIR", builtin / "benchmark")
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    code, output = _invoke("demo", "--samples", "4", "--out", tmp_path / "demo")
    assert code == 0, output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [c["label"] for c in report["cells"]] == [
        f"{m} {t}" for m in ("magnitude", "wanda", "wanda:text", "atv") for t in ("50%", "60%", "2:4")]
    assert set(report["dense"]["evaluation"]["scores"]) == set(TASKS)
    assert {p.name for p in (tmp_path / "demo").iterdir()} >= {"report.json", "report.md", "report.csv",
                                                               "retention.png"}
    monkeypatch.setattr(demo.builtin, "CHECKPOINT_DIR", tmp_path / "nowhere")
    code, output = _invoke("demo", "--out", tmp_path / "demo2")
    assert code == 2 and "built-in model is not in" in output
    monkeypatch.setattr(demo.builtin, "CHECKPOINT_DIR", builtin / "checkpoint")
    monkeypatch.setattr(demo.builtin, "BENCHMARK_DIR", tmp_path / "no-bench")
    code, output = _invoke("demo", "--out", tmp_path / "demo3")
    assert code == 2 and "n_test=100, n_calib=256" in output and not (tmp_path / "demo3").exists()


def test_tamp_cells_use_das_unstructured_and_uniform_nm(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    out = workspace["root"] / "tamp"
    code, output = _invoke("compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks",
                           "exist", "--methods", "tamp", "wanda:amia", "--sparsity", "0.5", "--pattern", "2:4",
                           "--samples", "4", "--out", out)
    assert code == 0, output
    cells = {c["label"]: c["config"] for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["tamp 50%"]["allocation"] == "das" and cells["tamp 2:4"]["allocation"] == "uniform"
    assert cells["wanda:amia 50%"]["allocation"] == "uniform" and cells["wanda:amia 50%"]["pool"] == "amia"


def _saved_in_bfloat16(model: Path, dest: Path) -> Path:
    """A copy of the checkpoint ``model`` with its weights saved in bf16 (as most real checkpoints are)."""
    import shutil

    from transformers import AutoModelForImageTextToText

    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors*"))
    AutoModelForImageTextToText.from_pretrained(model).to(torch.bfloat16).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("saved", ["float32", "bfloat16"])
def test_a_streamed_study_gives_the_cells_of_one_in_memory(workspace, saved: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--load stream: each cell pruned block by block into a temporary folder, evaluated from there
    (loaded into its placement), the folder removed; the cells equal those of --load memory, weights
    included, also for a bf16 checkpoint pruned in fp32 (an in-memory cell evaluates its weights
    rounded to bf16, as `prune` would save them and as the streamed cell reads them back: SparseGPT
    changes the weights it keeps)."""
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    model = workspace["model"]
    if saved == "bfloat16":
        model = _saved_in_bfloat16(model, workspace["root"] / "llava-bf16")
    results = {}
    for load in ("memory", "stream"):
        out = workspace["root"] / f"compare-{saved}-{load}"
        code, output = _invoke("compare", "--model", model, "--calib", workspace["calib"], "--tasks",
                               *TASKS, "--methods", "wanda", "atv", "sparsegpt", "--sparsity", "0.5",
                               "--samples", "4", "--load", load, "--out", out)
        assert code == 0, output
        results[load] = json.loads((out / "results.json").read_text())
        assert [p.name for p in (out / "cells").iterdir() if p.name.startswith(".")] == []
    for memory, stream in zip(results["memory"]["cells"], results["stream"]["cells"]):
        assert memory["label"] == stream["label"] and memory["scores"] == stream["scores"]
        assert memory["sparsity"] == stream["sparsity"] and memory["weights_sha256"] == stream["weights_sha256"]
        assert (memory["load"], stream["load"]) == ("memory", "stream")  # the path each cell took is recorded
    assert results["memory"]["dense"] == results["stream"]["dense"]


def test_a_streamed_cell_prunes_into_the_offload_folder_and_leaves_it_empty(
        workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pruned checkpoint of a streamed cell (as large as the model) goes where the user put
    the offloaded weights, not into the system's temporary folder, and is removed after the cell."""
    import tempfile

    made = []
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(kw) or real_mkdtemp(**kw))
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    offload = tmp_path / "offload"
    code, output = _invoke("compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", *TASKS,
                           "--methods", "wanda", "--sparsity", "0.5", "--samples", "4", "--load", "stream",
                           "--device-map", "auto", "--offload-folder", offload, "--out", tmp_path / "s")
    assert code == 0, output
    cells = [kw for kw in made if kw.get("prefix") == "atv-cell-"]
    assert len(cells) == 1 and cells[0]["dir"] == offload
    assert list(offload.iterdir()) == []


def test_a_streamed_study_with_structured_cells_is_refused_before_anything_runs(
        workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    code, output = _invoke("compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", *TASKS,
                           "--methods", "wanda", "wanda-sp", "--sparsity", "0.5", "--structure", "channels",
                           "--ratio", "0.25", "--samples", "4", "--load", "stream", "--out", tmp_path / "s")
    assert code == 2, output
    assert "cells wanda-sp" in output and "cannot be streamed" in output and "--load memory" in output
    assert not (tmp_path / "s").exists()  # refused before the dense evaluation


def test_study_settings_refuse_an_unknown_load(workspace) -> None:
    from atv_prune.errors import ConfigError
    from atv_prune.runs.cells import StudySettings

    with pytest.raises(ConfigError, match="unknown load 'disk': choose auto, memory, stream"):
        StudySettings(model=workspace["model"], calib=workspace["calib"], tasks=list(TASKS), load="disk")


def test_a_study_that_changes_the_model_in_memory_refuses_to_stream(workspace, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from motprobe.cli import main as motprobe_main

    monkeypatch.setattr(CellRunner, "_evaluate", _scripted_evaluate)
    result = CliRunner().invoke(motprobe_main, ["sensitivity", "--model", str(workspace["model"]), "--calib",
                                                str(workspace["calib"]), "--tasks", *TASKS, "--samples", "4",
                                                "--sparsity", "0.5", "--load", "stream", "--out",
                                                str(tmp_path / "s")])
    assert result.exit_code == 2 and "cannot stream" in result.output and "--load memory" in result.output
    assert not (tmp_path / "s").exists()  # refused before the dense evaluation, nothing written


def test_a_failed_cell_is_missing_from_the_tables_named_at_exit_and_computed_next_time(
        workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from atv_prune.errors import NumericalError

    calls = []
    monkeypatch.setattr(CellRunner, "_evaluate", lambda self, m, p: calls.append(1) or _scripted_evaluate(self, m, p))
    compute = CellRunner.cell
    fault: list[Exception] = [RuntimeError("out of luck")]

    def flaky(self, cell, prune_function):
        if cell.label == "wanda 50%":
            raise fault[0]
        return compute(self, cell, prune_function)

    monkeypatch.setattr(CellRunner, "cell", flaky)
    out = workspace["root"] / "faulty"
    args = ["compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", *TASKS,
            "--methods", "magnitude", "wanda", "atv", "--sparsity", "0.5", "--samples", "4", "--out", out]
    code, output = _invoke(*args)
    assert code == 1, output  # not an input problem: the environment's
    assert output.splitlines()[-1] == (f"error: 1 cell failed: 'wanda 50%' (RuntimeError: out of luck); the finished "
                                       f"cells are stored in {out}: re-run the same command to compute what is missing")
    assert len(calls) == 3 and len(list((out / "cells").glob("*.json"))) == 3  # dense, magnitude and atv went on
    table = (out / "table.md").read_text()
    assert "| wanda 50% | – | – | – | – | – | – |" in table
    assert "Failed, missing above: wanda 50% (RuntimeError: out of luck)." in table
    failed = [c for c in json.loads((out / "results.json").read_text())["cells"] if "failed" in c]
    assert [c["label"] for c in failed] == ["wanda 50%"] and "out of luck" in failed[0]["failed"]["traceback"]
    fault[0] = NumericalError("non-finite activations in block 0")
    code, output = _invoke(*args)
    assert code == 2 and "'wanda 50%' (non-finite activations in block 0)" in output  # an input problem
    monkeypatch.setattr(CellRunner, "cell", compute)
    calls.clear()
    code, output = _invoke(*args)
    assert code == 0 and len(calls) == 1 and "Failed" not in (out / "table.md").read_text()


def test_cluster_options_need_ray_and_ray_must_be_installed(workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    out = workspace["root"] / "no-cluster"
    args = ["compare", "--model", workspace["model"], "--calib", workspace["calib"], "--tasks", *TASKS,
            "--methods", "magnitude", "--sparsity", "0.5", "--out", out]
    code, output = _invoke(*args, "--cpus-per-cell", "2")
    assert code == 2 and output.startswith("error: --cpus-per-cell places cells on a Ray cluster: add --ray")
    if importlib.util.find_spec("ray") is not None:
        code, output = _invoke(*args, "--ray", "127.0.0.1:1")  # nothing listens there
        assert code == 1 and "error: cannot reach the Ray cluster at '127.0.0.1:1'" in output
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # where 'auto' leads
        code, output = _invoke(*args, "--ray", "auto")
        assert code == 1 and "error: cannot reach the Ray cluster at 'auto' (" in output and ":1): " in output
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as in a plain install
    code, output = _invoke(*args, "--ray")
    assert code == 2 and "--ray needs Ray, which is not installed: pip install 'atv-prune[cluster]'" in output
    assert not out.exists()

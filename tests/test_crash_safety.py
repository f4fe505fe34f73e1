"""Crash safety, proven on real processes: a prune killed (SIGKILL) during calibration, in the
block loop or while saving leaves --out absent (or as it was), the next run's --out is complete
and loadable and its leftovers are gone; a study killed in a cell resumes to the same table as an
uninterrupted run; two prunes racing into one --out leave one whole result and one clean failure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from crash import start

from atv_prune.builtin import BENCHMARK_DIR, CHECKPOINT_DIR
from atv_prune.cli import main as atv_main
from atv_prune.model.loading import load_model
from tiny_checkpoints import make_llava_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llava_workspace(tmp_path_factory.mktemp("crash"))


def _prune_args(workspace: dict[str, Path], out: Path, *extra: str) -> list:
    return ["prune", "--quiet", "--model", workspace["model"], "--calib", workspace["calib"], "--method", "wanda",
            "--sparsity", "0.5", "--samples", "3", "--out", out, *extra]


def _complete(out: Path) -> dict[str, torch.Tensor]:
    """The decoder weights of a complete, loadable output folder (loaded strictly)."""
    assert {"model.safetensors", "config.json", "pruning_report.json", "processor_config.json"} <= {
        p.name for p in out.iterdir()}
    model, _ = load_model(out)
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if "language_model.layers" in name}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.mark.parametrize("moment", ["calibration", "blocks", "saving"])
def test_a_killed_prune_leaves_no_output_and_the_next_run_completes(workspace, tmp_path: Path, moment: str) -> None:
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    start(atv_main, _prune_args(workspace, out), moment, tmp_path / "log").kill()
    assert not out.exists()
    if moment == "saving":
        assert len(_siblings(out)) == 1  # the killed run's staging folder, with its weights
    result = CliRunner().invoke(atv_main, [str(a) for a in _prune_args(workspace, out)])
    assert result.exit_code == 0, result.output
    _complete(out)
    assert _siblings(out) == []  # the next writer removed what the killed one left


def test_a_killed_overwrite_keeps_the_previous_result(workspace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert CliRunner().invoke(atv_main, [str(a) for a in _prune_args(workspace, out)]).exit_code == 0
    before = _complete(out)
    start(atv_main, _prune_args(workspace, out, "--overwrite", "--sparsity", "0.7"), "saving",
          tmp_path / "log").kill()
    after = _complete(out)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_two_prunes_racing_into_one_out_leave_one_whole_result(workspace, tmp_path: Path) -> None:
    out, release = tmp_path / "out", tmp_path / "release"
    first = start(atv_main, _prune_args(workspace, out), "publishing", tmp_path / "log", release=release)
    result = CliRunner().invoke(atv_main, [str(a) for a in _prune_args(workspace, out, "--sparsity", "0.7")])
    assert result.exit_code == 0, result.output  # the second run wins the race
    release.touch()
    code, lines = first.wait()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: output folder {out.resolve()} was written by another run while this one")
    weights = _complete(out)
    linears = [w for name, w in weights.items() if name.endswith("proj.weight")]
    assert abs(sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears) - 0.7) < 0.02  # not 0.5
    assert _siblings(out) == ["log", "release"]


def _table(folder: Path) -> list[dict[str, str]]:
    """The study's table without the columns that measure the run (time, memory)."""
    with (folder / "table.csv").open() as stream:
        return [{k: v for k, v in row.items() if k not in ("prune_seconds", "peak_memory_gib")}
                for row in csv.DictReader(stream)]


@pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="no built-in checkpoint")
def test_a_study_killed_mid_cell_resumes_to_the_uninterrupted_table(tmp_path: Path) -> None:
    """On the built-in trained model (a random one scores 0, leaving retention undefined), with
    the real evaluation."""
    args = ["compare", "--quiet", "--model", CHECKPOINT_DIR, "--calib", BENCHMARK_DIR / "calib.json",
            "--tasks", "exist", "count", "--limit", "8", "--methods", "magnitude", "wanda", "--sparsity", "0.6",
            "--samples", "3"]
    whole = CliRunner().invoke(atv_main, [str(a) for a in [*args, "--out", tmp_path / "whole"]])
    assert whole.exit_code == 0, whole.output
    resumed = tmp_path / "resumed"
    start(atv_main, [*args, "--out", resumed], "second cell", tmp_path / "log").kill()
    assert len(list((resumed / "cells").glob("*.json"))) == 2  # the dense evaluation and the first cell
    assert not (resumed / "table.csv").exists()
    result = CliRunner().invoke(atv_main, [str(a) for a in [*args, "--out", resumed]])
    assert result.exit_code == 0, result.output
    assert _table(resumed) == _table(tmp_path / "whole") and len(_table(resumed)) == 3

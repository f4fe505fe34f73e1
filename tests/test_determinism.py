"""Determinism, proven: the same prune command twice gives byte-identical output files (weights,
config, processor) for every method, whatever state the process's global random generators are in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atv_prune.cli import main as atv_main
from tiny_checkpoints import make_llava_workspace

#: Every method, with its default pool; atv also with its random-token ablation (a seeded generator).
RUNS = [["--method", "magnitude"], ["--method", "wanda"], ["--method", "atv"], ["--method", "atv", "--pool", "random"],
        ["--method", "sparsegpt"], ["--method", "tamp"], ["--method", "wanda", "--pattern", "2:4"]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llava_workspace(tmp_path_factory.mktemp("determinism"))


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes but the report's (it holds wall times)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "pruning_report.json"}


@pytest.mark.parametrize("options", RUNS, ids=lambda options: " ".join(options[1::2]))
def test_the_same_command_twice_gives_identical_files(workspace, tmp_path: Path, options: list[str]) -> None:
    target = [] if "--pattern" in options else ["--sparsity", "0.5"]
    outputs = []
    for run, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)  # a different global state each time: the result must not see it
        out = tmp_path / f"run{run}"
        result = CliRunner().invoke(atv_main, ["prune", "--quiet", "--model", str(workspace["model"]), "--calib",
                                               str(workspace["calib"]), "--samples", "4", "--seed", "3", *options,
                                               *target, "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs.append(_files(out))
    assert "model.safetensors" in outputs[0] and outputs[0].keys() == outputs[1].keys()
    assert all(outputs[0][name] == outputs[1][name] for name in outputs[0])

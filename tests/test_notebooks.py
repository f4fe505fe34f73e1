"""The analysis notebooks run top to bottom on the outputs of the motprobe commands on the built-in model."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner
from nbclient import NotebookClient

from atv_prune.builtin import BENCHMARK_DIR, CHECKPOINT_DIR
from atv_prune.cli import main as atv_main
from motprobe.cli import main as motprobe_main

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every CLI output the notebooks read, produced on the built-in trained model and benchmark
    (a real sensitivity study, evaluated through lmms-eval on a few items per task)."""
    root = tmp_path_factory.mktemp("analysis")
    common = ["--model", str(CHECKPOINT_DIR), "--calib", str(BENCHMARK_DIR / "calib.json"), "--samples", "8"]
    runner = CliRunner()
    for args in (["iou", *common, "--out", str(root / "iou")],
                 ["tsne", *common, "--blocks", "0", "--blocks", "3", "--tokens", "40", "--out", str(root / "tsne")],
                 ["sensitivity", *common, "--tasks", "reading", "--tasks", "attribute", "--limit", "8",
                  "--sparsity", "0.6", "--out", str(root / "study")]):
        result = runner.invoke(motprobe_main, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(atv_main, ["prune", "--quiet", *common, "--sparsity", "0.5", "--out", str(root / "atv")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(motprobe_main, ["drift", "--report", str(root / "atv" / "pruning_report.json"),
                                           "--out", str(root / "drift")])
    assert result.exit_code == 0, result.output
    return {"MOTPROBE_IOU_DIR": root / "iou", "MOTPROBE_TSNE_DIR": root / "tsne",
            "MOTPROBE_DRIFT_DIR": root / "drift", "MOTPROBE_STUDY_DIR": root / "study"}


@pytest.mark.parametrize("name", ["mask_iou", "tsne", "drift", "sensitivity"])
def test_notebook_executes(name: str, outputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, folder in outputs.items():
        monkeypatch.setenv(key, str(folder))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(ANALYSIS)}}).execute()  # raises on a failing cell
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors

"""The analysis notebooks run top to bottom on the outputs of the motprobe commands."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner
from nbclient import NotebookClient

from atv_prune.cli import main as atv_main
from atv_prune.study import Study
from motprobe.cli import main as motprobe_main
from test_motprobe_sensitivity import _scripted_evaluate
from tiny_checkpoints import make_calibration_files, make_checkpoint

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    model = make_checkpoint(root / "llava", "llava")
    calib = make_calibration_files(root / "calib")["json"]
    common = ["--model", str(model), "--calib", str(calib), "--samples", "4"]
    runner = CliRunner()
    for args in (["iou", *common, "--out", str(root / "iou")],
                 ["tsne", *common, "--blocks", "0", "--blocks", "1", "--tokens", "20", "--out", str(root / "tsne")]):
        result = runner.invoke(motprobe_main, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(atv_main, ["prune", "--quiet", *common, "--sparsity", "0.5", "--out", str(root / "atv")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(motprobe_main, ["drift", "--report", str(root / "atv" / "pruning_report.json"),
                                           "--out", str(root / "drift")])
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Study, "_evaluate", _scripted_evaluate)
        result = runner.invoke(motprobe_main, ["sensitivity", *common, "--tasks", "exist", "--sparsity", "0.5",
                                               "--out", str(root / "study")])
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

"""motprobe diagnostics: mask IoU, t-SNE activations, drift plot — functions and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atv_prune.model.calibration import CalibrationSample, CalibrationSet
from atv_prune.model.layout import resolve
from motprobe.cli import main
from motprobe.diagnostics import block_activations, iou_summary, mask_iou
from tiny_checkpoints import make_llava_workspace
from tiny_models import build_tiny_model, make_inputs


def test_mask_iou_arithmetic() -> None:
    a = {"m.layers.3.mlp.up_proj": torch.tensor([[True, True, False, False]])}
    b = {"m.layers.3.mlp.up_proj": torch.tensor([[True, False, True, False]])}
    rows = mask_iou(a, b)
    assert rows == [{"linear": "m.layers.3.mlp.up_proj", "block": 3, "module": "mlp.up_proj", "iou": 1 / 3}]
    summary = iou_summary(rows + [{"linear": "x.7.q", "block": 7, "module": "q", "iou": 0.93}])
    assert summary["linears"] == 2 and summary["share_by_bin"]["0.90-0.95"] == 0.5
    assert summary["share_by_bin"]["0.00-0.60"] == 0.5


@pytest.mark.parametrize("name", ["qwen3_vl", "gemma3"])
@torch.no_grad()
def test_block_activations_are_the_models_own_block_inputs(name: str) -> None:
    model = build_tiny_model(name)
    layout = resolve(model)
    inputs = [make_inputs(model, name, seed=s) for s in range(2)]
    calibration = CalibrationSet([CalibrationSample(x, f"s{i}") for i, x in enumerate(inputs)], "mem", 2, 0)
    blocks = [0, len(layout.blocks(model)) - 1]
    activations = block_activations(model, calibration, blocks)
    for block in blocks:
        seen = []
        hook = layout.blocks(model)[block].register_forward_pre_hook(lambda m, args, sink=seen: sink.append(args[0][0]))
        for x in inputs:
            model(**layout.prepare_inputs(x), use_cache=False)
        hook.remove()
        expected = torch.cat(seen)
        acts, visual = activations[block]
        assert (acts - expected).abs().max() <= 1e-5
        assert visual.sum() == sum(int(torch.isin(x["input_ids"], torch.tensor(layout.visual_token_ids)).sum())
                                   for x in inputs)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_llava_workspace(tmp_path_factory.mktemp("motprobe"))


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_iou_tsne_and_drift_commands_write_their_files(workspace) -> None:
    root, model, calib = workspace["root"], workspace["model"], workspace["calib"]
    code, output = _run("iou", "--model", model, "--calib", calib, "--samples", "4", "--out", root / "iou")
    assert code == 0, output
    summary = json.loads((root / "iou" / "iou_summary.json").read_text())
    assert summary["linears"] == 14 and 0 <= summary["min"] <= summary["mean"] <= summary["max"] <= 1
    assert (root / "iou" / "iou.csv").read_text().count("\n") == 15 and (root / "iou" / "iou_hist.png").stat().st_size
    code, output = _run("tsne", "--model", model, "--calib", calib, "--samples", "4", "--blocks", "1",
                        "--tokens", "20", "--out", root / "tsne")
    assert code == 0, output
    lines = (root / "tsne" / "tsne.csv").read_text().splitlines()
    assert lines[0] == "block,x,y,modality" and len(lines) == 41
    assert (root / "tsne" / "tsne.png").stat().st_size
    from atv_prune.cli import main as atv_main

    result = CliRunner().invoke(atv_main, ["prune", "--quiet", "--model", str(model), "--calib", str(calib),
                                           "--samples", "4", "--sparsity", "0.5", "--out", str(root / "atv")])
    assert result.exit_code == 0, result.output
    code, output = _run("drift", "--report", root / "atv" / "pruning_report.json", "--out", root / "drift")
    assert code == 0, output
    assert (root / "drift" / "drift.csv").read_text().count("\n") == 3


def test_bad_inputs_are_one_line_errors(workspace, tmp_path: Path) -> None:
    code, output = _run("tsne", "--model", workspace["model"], "--calib", workspace["calib"], "--samples", "2",
                        "--blocks", "9", "--out", tmp_path / "t")
    assert code == 2 and "out of range" in output and not (tmp_path / "t").exists()
    (tmp_path / "r.json").write_text("{}")
    code, output = _run("drift", "--report", tmp_path / "r.json", "--out", tmp_path / "d")
    assert code == 2 and output.startswith("error: ") and not (tmp_path / "d").exists()

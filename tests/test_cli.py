"""``atv-prune prune`` end to end on tiny local checkpoints, and its handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from atv_prune.cli import main
from atv_prune.model.processors import load_processor
from tiny_checkpoints import make_calibration_files, make_checkpoint


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    files = make_calibration_files(root / "calib")
    return {
        "root": root,
        "llava": make_checkpoint(root / "llava", "llava"),
        "qwen2_vl": make_checkpoint(root / "qwen2_vl", "qwen2_vl"),
        "json": files["json"],
        "jsonl": files["jsonl"],
        "images": files["root"],
    }


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["prune", "--quiet", *map(str, args)])
    return result.exit_code, result.output


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("family,calib,target", [
    ("llava", "json", ["--sparsity", "0.5"]),
    ("qwen2_vl", "jsonl", ["--pattern", "2:4"]),
])
def test_prune_saves_a_reloadable_pruned_model(workspace, family: str, calib: str, target: list[str]) -> None:
    out = workspace["root"] / f"out-{family}"
    code, output = _run("--model", workspace[family], "--calib", workspace[calib], "--method", "atv",
                        "--samples", "4", *target, "--out", out)
    assert code == 0, output
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["config"]["method"] == "atv" and report["config"]["samples"] == 4
    assert report["calibration"]["samples_used"] == 4
    assert abs(report["sparsity"]["overall"] - 0.5) < 1e-9
    assert len(report["blocks"]) == 2 and all(b["mean_drift"] is not None for b in report["blocks"])
    assert {"capture", "statistics", "masks", "propagation", "move_blocks", "total", "load_model"} <= set(
        report["seconds"])
    assert report["versions"]["transformers"] and report["config"]["seed"] == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = load_processor(out)
    linears = [m for n, m in model.named_modules() if "language_model.layers." in n and isinstance(m, torch.nn.Linear)]
    assert linears and all(float((m.weight == 0).float().mean()) == 0.5 for m in linears)
    tokens = processor.tokenizer("hello", return_tensors="pt")
    generated = model.generate(**tokens, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == tokens["input_ids"].shape[1] + 3
    original = load_file(workspace[family] / "model.safetensors")
    pruned = load_file(out / "model.safetensors")
    vision_keys = [k for k in original if "vision" in k or "projector" in k or "visual" in k]
    assert vision_keys and all(torch.equal(original[k], pruned[k]) for k in vision_keys)


def test_magnitude_needs_no_calibration_and_text_pool_runs(workspace) -> None:
    out = workspace["root"] / "magnitude"
    assert _run("--model", workspace["llava"], "--method", "magnitude", "--sparsity", "0.6", "--out", out)[0] == 0
    assert json.loads((out / "pruning_report.json").read_text())["calibration"] is None
    out = workspace["root"] / "wanda-text"
    code, output = _run("--model", workspace["llava"], "--calib", workspace["json"], "--method", "wanda",
                        "--pool", "text", "--sparsity", "0.5", "--samples", "3", "--out", out)
    assert code == 0, output


def test_existing_output_is_refused_unless_overwrite(workspace) -> None:
    out = workspace["root"] / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", workspace["llava"], "--method", "magnitude", "--sparsity", "0.5", "--out", out]
    code, output = _run(*args)
    assert code == 2 and "already exists" in output and (out / "keep.txt").exists()
    assert _run(*args, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "pruning_report.json").exists()
    assert _leftovers(workspace["root"]) == []


def test_output_inside_the_model_folder_is_refused(workspace) -> None:
    code, output = _run("--model", workspace["llava"], "--method", "magnitude", "--sparsity", "0.5",
                        "--out", workspace["llava"] / "pruned")
    assert code == 2 and "overlaps the input" in output


def _bad_json(tmp: Path) -> Path:
    path = tmp / "bad.json"
    path.write_text('[{"image": "images/img0.png", "conversations": [}]')
    return path


def _bad_jsonl(tmp: Path) -> Path:
    path = tmp / "bad.jsonl"
    path.write_text('{"image": "images/img0.png", "text": "ok"}\n{"image": oops}\n')
    return path


def _missing_image(tmp: Path) -> Path:
    path = tmp / "missing.jsonl"
    path.write_text('{"image": "images/nope.png", "text": "a caption"}\n')
    return path


def _corrupt_image(tmp: Path) -> Path:
    (tmp / "images" / "broken.png").write_bytes(b"not a png at all")
    path = tmp / "corrupt.jsonl"
    path.write_text('{"image": "images/broken.png", "text": "a caption"}\n')
    return path


def _no_images(tmp: Path) -> Path:
    path = tmp / "textonly.jsonl"
    path.write_text('{"image": null, "text": "just words"}\n{"text": "more words"}\n')
    return path


@pytest.mark.parametrize("make,message", [
    (_bad_json, "line 1"),
    (_bad_jsonl, "line 2"),
    (_missing_image, "nope.png"),
    (_corrupt_image, "broken.png"),
    (_no_images, "has an image or a video: the calibration needs visual tokens"),
])
def test_bad_calibration_input_is_one_line_and_leaves_nothing(workspace, make, message: str) -> None:
    calib = make(workspace["images"])
    out = workspace["root"] / f"never-{calib.stem}"
    code, output = _run("--model", workspace["llava"], "--calib", calib, "--method", "atv", "--sparsity", "0.5",
                        "--image-root", workspace["images"], "--out", out)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], output
    assert not out.exists() and _leftovers(workspace["root"]) == []


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.3"], "outside (0, 1)"),
    (["--sparsity", "0"], "outside (0, 1)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "4:12"], "divisible by 12"),
    (["--pattern", "two:four"], "N:M"),
    (["--sparsity", "0.5", "--pattern", "2:4"], "exactly one"),
])
def test_bad_targets_are_one_line_errors(workspace, args: list[str], message: str) -> None:
    out = workspace["root"] / "never-target"
    code, output = _run("--model", workspace["llava"], "--method", "magnitude", *args, "--out", out)
    assert code == 2 and output.startswith("error: ") and message in output, output
    assert len(output.strip().splitlines()) == 1 and not out.exists()


def test_unsupported_model_is_refused_with_the_supported_list(workspace, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=64)).save_pretrained(tmp_path / "llama")
    code, output = _run("--model", tmp_path / "llama", "--method", "magnitude", "--sparsity", "0.5",
                        "--out", tmp_path / "out")
    assert code == 2 and "supported families" in output and "qwen2_vl" in output, output
    code, output = _run("--model", tmp_path / "nowhere", "--method", "magnitude", "--sparsity", "0.5",
                        "--out", tmp_path / "out")
    assert code == 2 and "no model found" in output


def test_non_finite_weights_are_refused(workspace, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in workspace["llava"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if "layers.1.mlp.down_proj.weight" in k)
    weights[key][0, 0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    code, output = _run("--model", broken, "--calib", workspace["json"], "--image-root", workspace["images"],
                        "--method", "wanda", "--sparsity", "0.5", "--out", tmp_path / "out")
    assert code == 2 and "non-finite weights" in output and "down_proj" in output, output
    assert not (tmp_path / "out").exists()


def test_families_lists_the_registry() -> None:
    result = CliRunner().invoke(main, ["families"])
    assert result.exit_code == 0 and "qwen3_vl" in result.output and "smolvlm" in result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "image+video" in lines["qwen2_5_vl"] and "image+video" not in lines["llava"]


def test_outputs_get_the_usual_permissions(workspace) -> None:
    import os

    out = workspace["root"] / "modes"
    assert _run("--model", workspace["llava"], "--method", "magnitude", "--sparsity", "0.5", "--out", out)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "pruning_report.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_importing_the_command_lines_imports_no_torch() -> None:
    """``--help`` and usage errors answer at once: the CLI modules import torch, transformers and
    lmms-eval only when a command runs."""
    import subprocess
    import sys

    code = ("import sys, atv_prune.cli, motprobe.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

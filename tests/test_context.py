"""Samples longer than the model's context (or --max-length): truncated from the end of their
text, never inside an image's tokens, or skipped when the image does not fit; counted in the
report, warned about, and a --max-length beyond the context refused before the weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atv_prune import PruneConfig, prune
from atv_prune.cli import main as atv_main
from atv_prune.errors import CalibrationError, ConfigError
from atv_prune.model.calibration import CalibrationSet, fit_context, load_calibration
from atv_prune.model.layout import context_length, resolve
from atv_prune.model.loading import load_model_and_processor
from tiny_checkpoints import make_calibration_files, make_checkpoint

LONG_ANSWER = " ".join(["The image shows a red square and a blue circle."] * 40)


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("context")
    files = make_calibration_files(root / "calib", n_images=3)
    records = [{"image": f"images/img{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                                  {"from": "gpt", "value": LONG_ANSWER if i < 2 else "A square."}]}
               for i in range(3)]
    long_calib = root / "calib" / "long.json"
    long_calib.write_text(json.dumps(records))
    late_image = [{"image": "images/img0.png",
                   "conversations": [{"from": "human", "value": f"{LONG_ANSWER}\n<image>"},
                                     {"from": "gpt", "value": "A square."}]}]
    late_calib = root / "calib" / "late.json"
    late_calib.write_text(json.dumps(late_image))
    return {"root": root, "calib": files["json"], "long": long_calib, "late": late_calib,
            "llava": make_checkpoint(root / "llava", "llava"), "qwen2_vl": make_checkpoint(root / "qwen", "qwen2_vl")}


def _short_context(source: Path, dest: Path, positions: int) -> Path:
    """A copy of a checkpoint whose config declares a shorter context."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = positions
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_long_sample_is_truncated_from_the_end_of_its_text(space, family: str) -> None:
    loaded = load_model_and_processor(space[family])
    layout = resolve(loaded.model)
    calib = load_calibration(space["long"], loaded.processor, samples=3, seed=0, max_length=60)
    fitted, fit = fit_context(calib, context_length(loaded.model.config), layout.visual_token_ids)
    assert fit.max_length == 60 and fit.truncated == 2 and fit.skipped == 0
    assert any("truncated 2 calibration samples longer than --max-length (60 tokens)" in w for w in fitted.warnings)
    for before, after in zip(calib.samples, fitted.samples):
        ids, cut = before.inputs["input_ids"], after.inputs["input_ids"]
        length = min(ids.shape[1], 60)
        assert torch.equal(cut, ids[:, :length])  # a prefix: only the end is dropped
        assert int(layout.visual_mask(cut).sum()) == int(layout.visual_mask(ids).sum())  # every image token kept
        for name, value in after.inputs.items():
            original = before.inputs[name]
            aligned = original.ndim == 2 and original.shape == ids.shape
            assert torch.equal(value, original[:, :length] if aligned else original), name
    assert fit.tokens_dropped == sum(max(0, s.inputs["input_ids"].shape[1] - 60) for s in calib.samples) > 0
    config = PruneConfig(method="wanda", sparsity=0.5, samples=3)
    uncapped = load_calibration(space["long"], loaded.processor, samples=3, seed=0)  # max_length given to prune
    report = prune(loaded.model, loaded.processor, uncapped, config, max_length=60)
    assert report.calibration["truncated_too_long"] == 2 and report.calibration["max_length"] == 60
    assert report.calibration["tokens_per_sample"] <= 60 and report.calibration["samples_used"] == 3


def test_a_pathway_of_the_probe_is_calibrated_under_the_same_max_length(space) -> None:
    from motprobe import make_probe, prune_pathway

    loaded = load_model_and_processor(space["llava"])
    make_probe(loaded.model)
    uncapped = load_calibration(space["long"], loaded.processor, samples=3, seed=0)
    config = PruneConfig(method="wanda", sparsity=0.5, samples=3)
    report = prune_pathway(loaded.model, loaded.processor, uncapped, config, "text", max_length=60)
    assert report.calibration["truncated_too_long"] == 2 and report.calibration["max_length"] == 60


def test_the_models_context_is_the_default_limit(space, tmp_path: Path) -> None:
    model = _short_context(space["llava"], tmp_path / "short", 48)
    out = tmp_path / "out"
    result = CliRunner().invoke(atv_main, ["prune", "--quiet", "--model", str(model), "--calib", str(space["long"]),
                                           "--method", "wanda", "--sparsity", "0.5", "--samples", "3",
                                           "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["max_length"] == 48 and report["calibration"]["truncated_too_long"] == 2
    assert any("longer than the model's context (48 tokens)" in w for w in report["warnings"])


def test_a_sample_whose_image_does_not_fit_is_skipped(space) -> None:
    loaded = load_model_and_processor(space["llava"])
    layout = resolve(loaded.model)
    mixed = load_calibration(space["calib"], loaded.processor, samples=2, seed=0)
    late = load_calibration(space["late"], loaded.processor, samples=1, seed=0, max_length=40)
    both = CalibrationSet(late.samples + mixed.samples, "both", 3, 0, max_length=40)
    fitted, fit = fit_context(both, 1024, layout.visual_token_ids)
    assert fit.skipped == 1 and len(fitted.samples) == 2
    assert any("skipped 1 calibration samples whose image/video tokens end beyond --max-length" in w
               for w in fitted.warnings)
    with pytest.raises(CalibrationError, match="the image/video tokens of all 1 calibration samples end beyond"):
        fit_context(late, 1024, layout.visual_token_ids)


def test_a_max_length_beyond_the_context_is_refused_before_loading(space, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("atv_prune.model.loading.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    result = CliRunner().invoke(atv_main, ["prune", "--model", str(space["llava"]), "--calib", str(space["calib"]),
                                           "--max-length", "5000", "--sparsity", "0.5", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --max-length 5000 is beyond the model's context (1024 positions, its "
                                     "max_position_embeddings): pass --max-length 1024 or less")
    with pytest.raises(ConfigError, match="beyond the model's context"):
        fit_context(CalibrationSet([], "calib.json", 0, 0, max_length=5000), 1024, ())

"""Models larger than one device at evaluation (``--device-map auto``): on the CPU a small
``max_memory`` forces a real split (some modules on the CPU, the rest offloaded to disk), and the
scores must equal the single-device run's, for a model loaded that way (``atv-prune eval``) and
for one dispatched after it was loaded (a study's cells)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atv_prune.builtin import BENCHMARK_DIR, CHECKPOINT_DIR
from atv_prune.cli import main
from atv_prune.errors import ConfigError
from atv_prune.eval import evaluate
from atv_prune.model.calibration import load_calibration
from atv_prune.model.loading import Placement, load_model_and_processor, main_device, parse_max_memory
from atv_prune.runs.cells import CellRunner, StudySettings

#: Tasks the built-in model gets partly right on their first three documents (67, 33, 67).
TASKS = ["reading", "mcq", "spatial"]
#: Less than the built-in model's 19 MB: the vision tower's first layers stay, the rest goes to disk.
SPLIT = {"cpu": "12MB"}


@pytest.fixture(scope="module")
def single_device() -> dict:
    loaded = load_model_and_processor(CHECKPOINT_DIR)
    return evaluate(loaded.model, loaded.processor, TASKS, bench_dir=BENCHMARK_DIR, limit=3).to_dict()


def _logits(model, processor) -> torch.Tensor:
    """The model's logits on one calibration sample (an image and its caption)."""
    sample = load_calibration(BENCHMARK_DIR / "calib.json", processor, samples=1).samples[0]
    with torch.inference_mode():
        return model(**sample.inputs).logits


def test_a_model_split_over_cpu_and_disk_at_load_scores_the_same(single_device: dict, tmp_path: Path) -> None:
    loaded = load_model_and_processor(CHECKPOINT_DIR, placement=Placement(max_memory=SPLIT, offload_folder=tmp_path))
    placed = set(loaded.model.hf_device_map.values())
    assert placed == {"cpu", "disk"} and loaded.device.type == "cpu"
    reference = load_model_and_processor(CHECKPOINT_DIR)
    assert torch.equal(_logits(loaded.model, loaded.processor), _logits(reference.model, reference.processor))
    result = evaluate(loaded.model, loaded.processor, TASKS, bench_dir=BENCHMARK_DIR, limit=3,
                      device=str(loaded.device))
    assert result.scores == single_device["scores"] and result.metrics == single_device["metrics"]
    del loaded
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []  # the offload folder goes with the model


def test_a_study_cell_dispatched_after_loading_scores_the_same(single_device: dict) -> None:
    settings = StudySettings(model=CHECKPOINT_DIR, calib=BENCHMARK_DIR / "calib.json", tasks=TASKS,
                             bench_dir=str(BENCHMARK_DIR), limit=3, batch_size=8, progress=False,
                             placement=Placement(max_memory=SPLIT))
    runner = CellRunner(settings)
    loaded = runner._load()
    evaluation = runner._evaluate(loaded.model, loaded.processor)
    assert set(loaded.model.hf_device_map.values()) == {"cpu", "disk"}
    assert evaluation["scores"] == single_device["scores"]


def test_eval_command_with_a_device_map(single_device: dict, tmp_path: Path) -> None:
    base = ["eval", "--model", str(CHECKPOINT_DIR), "--tasks", *TASKS, "--limit", "3", "--quiet"]
    result = CliRunner().invoke(main, [*base, "--device-map", "auto", "--max-memory", "cpu=12MB", "--out",
                                       str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval_results.json").read_text())["result"]["scores"]
    assert scores == single_device["scores"]
    for extra, message in ((["--max-memory", "cpu=1GB"], "add --device-map auto"),
                           (["--device-map", "auto", "--max-memory", "cpu"], "'cpu' is not DEVICE=SIZE"),
                           (["--device-map", "auto", "--max-memory", "0=lots"], "'lots' is not a size"),
                           (["--device-map", "auto", "--device", "cpu"], "drop --device")):
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, extra


def test_max_memory_and_main_device_parsing() -> None:
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    with pytest.raises(ConfigError, match="'gpu=1GB' is not DEVICE=SIZE"):
        parse_max_memory("gpu=1GB")
    assert str(main_device({"a": "cpu", "b": 1, "c": 0, "d": "disk"})) == "cuda:1"
    assert str(main_device({"a": "disk", "b": "cpu"})) == "cpu"
    with pytest.raises(ConfigError, match="unknown device map 'everywhere'"):
        Placement(device_map="everywhere")


def test_a_placement_on_one_device_keeps_the_model_off_the_others() -> None:
    """--load stream with --device cpu: the evaluated model may use host memory and disk only."""
    on_cpu = Placement.on(torch.device("cpu"), offload_folder=Path("/x"))
    assert set(on_cpu.max_memory) == {"cpu"} and on_cpu.max_memory["cpu"] > 0
    assert on_cpu.offload_folder == Path("/x") and on_cpu.device_map == "auto"

"""``benchmarks/gpu_check.sh`` (the first GPU run) works end to end on the CPU with tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_with_tiny_shapes(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["device"] == "cpu" and figures["size"] == "tiny" and figures["skipped"] == []
    runs = {(row["shape"], row["run"]) for row in figures["runs"]}
    assert len(runs) == 12 and ("llava_next_8b", "atv 2:4") in runs and ("qwen2_vl_7b", "sparsegpt 50%") in runs
    assert all(abs(row["sparsity"] - 0.5) < 1e-6 and row["seconds"]["total"] > 0 for row in figures["runs"])
    assert all(row["host_added_bytes"] is None or 0 <= row["host_added_bytes"] <= row["host_peak_bytes"]
               for row in figures["runs"])
    assert len(figures["agreement"]) == 6  # ATV, Wanda and SparseGPT at 50% on both shapes
    assert all(0.95 < row["mask_agreement"] <= 1.0 for row in figures["agreement"])  # bf16 against fp32
    assert "gpu_check finished" in result.stdout


def test_gpu_check_makes_only_the_runs_asked_for_on_cut_decoders(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--layers", "1",
                             "--shapes", "qwen2_vl_7b", "--only", "sparsegpt 2:4", "wanda 50%"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert figures["layers"] == 1 and not (tmp_path / "gpu_check.json.partial").exists()
    assert [row["run"] for row in figures["runs"]] == ["wanda 50%", "sparsegpt 2:4"]
    assert [row["run"] for row in figures["agreement"]] == ["wanda 50%"]
    assert "(decoder blocks: 1)" in result.stdout

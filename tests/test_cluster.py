"""Studies on a real local Ray cluster (not a mock): the cells' records equal the serial run's,
a worker killed mid-cell is retried, a cell whose worker always dies is recorded as failed, a
driver killed mid-study leaves only complete cells, and every study resumes with or without
--ray. One two-CPU cluster, started in this process, serves the whole module (each start costs
seconds); the study is the built-in model on two tasks, two documents each."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from atv_prune.builtin import BENCHMARK_DIR, CHECKPOINT_DIR
from atv_prune.cli import main
from atv_prune.runs.cells import Cell, CellRunner, StudySettings
from atv_prune.runs.config import PruneConfig
from atv_prune.runs.executors import RayExecutor
from atv_prune.runs.study import CellsFailed, Study, retention_rows

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.cluster

TESTS = Path(__file__).resolve().parent
STUDY = ["compare", "--model", str(CHECKPOINT_DIR), "--calib", str(BENCHMARK_DIR / "calib.json"), "--tasks", "exist",
         "count", "--limit", "2", "--samples", "4", "--methods", "magnitude", "wanda", "--sparsity", "0.5", "--quiet"]
#: What the worker and the clock decide, not the study: left out when records are compared.
TIMINGS = ("prune_seconds", "peak_memory_bytes")


@pytest.fixture(scope="module")
def handshake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("handshake")


@pytest.fixture(scope="module")
def cluster(handshake: Path):
    """A local two-CPU Ray cluster whose workers can import this folder's helpers."""
    from cluster_helpers import HANDSHAKE

    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", HANDSHAKE)}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved["PYTHONPATH"]) if p)
    os.environ[HANDSHAKE] = str(handshake)
    temp = tempfile.mkdtemp(prefix="atv-ray-test-")  # short: Ray's socket paths must stay under 108 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             logging_level=logging.ERROR, object_store_memory=256 * 2**20)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study run serially in this process: the reference every cluster run must reproduce."""
    out = tmp_path_factory.mktemp("serial") / "study"
    result = CliRunner().invoke(main, [*STUDY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _records(folder: Path) -> dict[str, dict]:
    """The stored records by file name, without their timings."""
    records = {}
    for path in sorted((folder / "cells").glob("*.json")):
        record = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMINGS}
        record["evaluation"] = {k: v for k, v in record["evaluation"].items() if k != "seconds"}
        records[path.name] = record
    return records


def _settings() -> StudySettings:
    """The settings the command line builds for STUDY (so the API runs resume its folders)."""
    return StudySettings(model=CHECKPOINT_DIR, calib=BENCHMARK_DIR / "calib.json", tasks=["exist", "count"],
                         bench_dir=str(BENCHMARK_DIR), limit=2, batch_size=16, progress=False)


def _cells() -> list[Cell]:
    return [Cell(f"{method} 50%", PruneConfig(method=method, sparsity=0.5, samples=4)) for method in ("magnitude",
                                                                                                     "wanda")]


def _copy_without(serial: Path, target: Path, labels: tuple[str, ...]) -> Path:
    """A copy of the serial study with the named cells removed (so that only they are computed)."""
    shutil.copytree(serial, target)
    for cell in _cells():
        if cell.label in labels:
            (target / "cells" / f"{cell.key()}.json").unlink()
    return target


def _refuse_to_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, job):
        raise AssertionError(f"recomputed {job.label}")

    monkeypatch.setattr(CellRunner, "run", refuse)


def test_cells_on_two_workers_equal_the_serial_run_and_resume_either_way(
        cluster: str, serial: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ray"
    result = CliRunner().invoke(main, [*STUDY, "--out", str(out), "--ray"])
    assert result.exit_code == 0, result.output
    assert _records(out) == _records(serial)  # same masks (weights_sha256), same scores, same everything
    assert len(_records(out)) == 3 and all(len(r["weights_sha256"]) == 16 for k, r in _records(out).items()
                                           if k != "dense.json")
    assert _table(out) == _table(serial)
    _refuse_to_compute(monkeypatch)
    for folder, ray_option in ((out, []), (serial, ["--ray"])):  # a finished study: nothing runs, no cluster
        result = CliRunner().invoke(main, [*STUDY, "--out", str(folder), *ray_option])
        assert result.exit_code == 0, result.output


def _table(folder: Path) -> list[dict[str, str]]:
    """A study's table.csv without the columns of pruning time and memory."""
    with open(folder / "table.csv", newline="") as stream:
        return [{k: v for k, v in row.items() if k not in ("prune_seconds", "peak_memory_gib")}
                for row in csv.DictReader(stream)]


def test_a_worker_killed_mid_cell_is_retried_and_gives_the_same_record(
        cluster: str, serial: Path, handshake: Path, tmp_path: Path) -> None:
    from cluster_helpers import prune_after_first_attempt

    for stale in handshake.glob("*.pid"):
        stale.unlink()
    folder = _copy_without(serial, tmp_path / "killed", ("wanda 50%",))
    results: list = []
    study = Study(folder, _settings(), "compare")
    runner = threading.Thread(target=lambda: results.append(
        study.run_all(_cells(), prune_after_first_attempt, RayExecutor(retries=1))))
    runner.start()
    deadline = time.monotonic() + 240
    while not list(handshake.glob("0-*.pid")) and time.monotonic() < deadline:
        time.sleep(0.2)
    first = list(handshake.glob("0-*.pid"))
    assert first, "the cell never started"
    os.kill(int(first[0].read_text()), signal.SIGKILL)  # the worker, with its model loaded, mid-cell
    runner.join(timeout=300)
    assert not runner.is_alive() and results
    attempts = sorted(p.name.split("-")[0] for p in handshake.glob("*.pid"))
    assert attempts == ["0", "1"]
    assert first[0].read_text() != next(handshake.glob("1-*.pid")).read_text()  # a new worker process
    _, records = results[0]
    assert "failed" not in records[1]
    assert _records(folder) == _records(serial)


def test_a_cell_whose_worker_always_dies_is_recorded_as_failed_and_resumed(
        cluster: str, serial: Path, handshake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster_helpers import prune_or_die

    for stale in handshake.glob("*.pid"):
        stale.unlink()
    folder = _copy_without(serial, tmp_path / "dies", ("magnitude 50%", "wanda 50%"))
    cells = [*_cells(), Cell("atv 50%", PruneConfig(method="atv", sparsity=0.5, samples=4))]
    dense, records = Study(folder, _settings(), "compare").run_all(cells, prune_or_die, RayExecutor(retries=1))
    magnitude, wanda, atv = records
    assert magnitude["failed"]["worker_lost"] and magnitude["failed"]["attempts"] == 2
    assert "worker lost" in magnitude["failed"]["error"] and len(list(handshake.glob("*.pid"))) == 2
    assert atv["failed"] == {"error": "non-finite activations in block 0", "input_error": True, "worker_lost": False,
                             "attempts": 1, "traceback": None}  # raised by the cell's code: not retried
    assert "failed" not in wanda and wanda["retention"]["mean"] > 0  # the other cell went on
    assert sorted(p.stem for p in (folder / "cells").glob("*.json")) == sorted(["dense", cells[1].key()])
    rows = retention_rows(records, dense)
    assert [row["mean"] is None for row in rows] == [False, True, False, True]
    error = CellsFailed([magnitude, atv], folder)
    assert error.exit_status == 1 and "'magnitude 50%' (worker lost" in str(error) and "2 attempts" in str(error)
    result = CliRunner().invoke(main, [*STUDY, "--out", str(folder)])  # the next run computes only what is missing
    assert result.exit_code == 0, result.output
    assert _records(folder) == _records(serial)


def test_a_driver_killed_mid_study_leaves_complete_cells_and_the_next_run_resumes(
        cluster: str, serial: Path, tmp_path: Path) -> None:
    out = tmp_path / "driver"
    command = [sys.executable, "-c", "from atv_prune.cli import main; main()", *STUDY, "--out", str(out),
               "--ray", cluster]  # joins the module's cluster by its address
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "cells").glob("*.json")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None, driver.stderr.read().decode()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    stored = _records(out)  # every stored cell parses and is complete
    assert 1 <= len(stored) < 3 and all(stored[name] == _records(serial)[name] for name in stored)
    result = CliRunner().invoke(main, [*STUDY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _records(out) == _records(serial)

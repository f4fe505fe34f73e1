"""Wall time of a study run serially and on a local Ray cluster, side by side.

Runs the method comparison of docs/results.md (the built-in model, 5 methods x 6 targets = 30
cells plus the dense evaluation) twice from scratch, one run after the other: in one process
(the default), then with ``--ray --cpus-per-cell 1`` (a local cluster with one single-threaded
worker per CPU). Both runs have ``OMP_NUM_THREADS=1``. Prints each wall time, the speed-up, the
machine's load average around each run (other users' jobs slow both), and checks that the two
studies stored the same records (same weights fingerprint and scores for every cell):

    python benchmarks/bench_cluster.py --out /tmp/ray-bench

``--startup N`` instead times the local cluster's start and shutdown N times, through the same
``RayExecutor`` the studies use (a fixed cost of every ``--ray`` run without an address).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "atv_prune" / "builtin"
STUDY = ["compare", "--model", str(BUILTIN / "checkpoint"), "--calib", str(BUILTIN / "benchmark" / "calib.json"),
         "--tasks", "exist", "attribute", "count", "spatial", "reading", "mcq", "rule", "textonly",
         "--methods", "magnitude", "wanda", "sparsegpt", "tamp", "atv", "--sparsity", "0.5", "0.6", "0.7", "0.8",
         "--pattern", "2:4", "4:8", "--batch-size", "16", "--quiet", "--overwrite"]


def run(out: Path, extra: list[str]) -> dict[str, float]:
    """One study from scratch in ``out``: wall seconds and the load averages before and after."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "from atv_prune.cli import main; main()", *STUDY, "--out", str(out), *extra]
    before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    return {"wall": time.perf_counter() - started, "load_before": before, "load_after": os.getloadavg()[0]}


def outcomes(folder: Path) -> dict[str, tuple]:
    """Per stored record: its weights fingerprint and scores (what must not depend on where it ran)."""
    records = {}
    for path in sorted((folder / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        records[path.name] = (record.get("weights_sha256"), record["evaluation"]["scores"])
    return records


def startup(repeats: int) -> None:
    """Print the local cluster's start and shutdown seconds, ``repeats`` times."""
    from atv_prune.runs.executors import RayExecutor

    for _ in range(repeats):
        executor = RayExecutor(cpus_per_cell=1)
        started = time.perf_counter()
        executor.__enter__()
        ready = time.perf_counter()
        executor.__exit__(None, None, None)
        print(f"local cluster: start {ready - started:.2f} s, shutdown {time.perf_counter() - ready:.2f} s "
              f"(load average {os.getloadavg()[0]:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Folder for the two study folders.")
    parser.add_argument("--cpus-per-cell", default="1", help="CPUs (threads) per cell on the cluster.")
    parser.add_argument("--startup", type=int, default=0, metavar="N", help="Only time the local cluster's start.")
    args = parser.parse_args()
    if args.startup:
        startup(args.startup)
        return
    if args.out is None:
        parser.error("--out is required")
    serial = run(args.out / "serial", [])
    print(f"serial: {serial['wall']:.1f} s (load average {serial['load_before']:.2f} -> "
          f"{serial['load_after']:.2f})", flush=True)
    ray = run(args.out / "ray", ["--ray", "--cpus-per-cell", args.cpus_per_cell])
    print(f"ray:    {ray['wall']:.1f} s (load average {ray['load_before']:.2f} -> {ray['load_after']:.2f})",
          flush=True)
    same = outcomes(args.out / "serial") == outcomes(args.out / "ray")
    print(f"speed-up serial / ray: {serial['wall'] / ray['wall']:.2f}; {len(outcomes(args.out / 'ray'))} records, "
          f"{'identical' if same else 'DIFFERENT'} weights fingerprints and scores")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

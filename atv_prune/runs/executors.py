"""Where a study's cells run: one after another in this process (:class:`SerialExecutor`, the
default), or as tasks on a Ray cluster (:class:`RayExecutor`, ``--ray``).

An executor takes the cells' jobs and yields each one's :class:`CellOutcome` as it finishes: the
record, or the failure. Everything else (what is stored, resume, failure records, tables) is the
driver's (:class:`~atv_prune.runs.study.Study`), written once for both. ``ray`` is imported only
when a :class:`RayExecutor` starts.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import torch

from ..errors import AtvPruneError, ConfigError, EnvironmentFailure, one_line
from ..model.loading import parse_device
from .cells import CellJob, CellRunner, compute

#: Object store of a local cluster: the workers return records of a few kilobytes.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CellFailure:
    """Why a cell has no record: its one-line error, whether it is a problem with the inputs
    (an :class:`AtvPruneError` raised by the cell) or the environment's (a lost worker, an
    unforeseen exception), and how many attempts were made."""

    error: str
    input_error: bool
    worker_lost: bool
    attempts: int
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "input_error": self.input_error, "worker_lost": self.worker_lost,
                "attempts": self.attempts, "traceback": self.traceback}

    @classmethod
    def raised(cls, error: BaseException, trace: str | None) -> CellFailure:
        """The failure of a cell whose own code raised ``error`` (not retried: it would again)."""
        input_error = isinstance(error, AtvPruneError)
        return cls(one_line(error, with_type=not input_error), input_error, False, 1,
                   None if input_error else trace)


@dataclass(frozen=True)
class CellOutcome:
    """A finished job: its record, or its failure."""

    job: CellJob
    record: dict[str, Any] | None
    failure: CellFailure | None = None


class CellExecutor(Protocol):
    """Runs jobs and yields their outcomes as they finish. Used as a context manager around
    :meth:`run` (a cluster is joined or started on entry, and left on exit)."""

    #: Whether the cells run in this process (their device is then checked here first).
    local: bool

    def __enter__(self) -> CellExecutor: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...

    def run(self, jobs: list[CellJob], running: Callable[[int], None]) -> Iterator[CellOutcome]:
        """Each job's outcome as it finishes; ``running(n)`` says how many cells are running."""
        ...


class SerialExecutor:
    """The cells one after another in this process: no start-up cost, the default."""

    local = True

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def run(self, jobs: list[CellJob], running: Callable[[int], None]) -> Iterator[CellOutcome]:
        """The jobs in order (they share one study's settings, so one runner keeps the
        calibration draws between them)."""
        if not jobs:
            return
        runner = CellRunner(jobs[0].settings)
        for job in jobs:
            running(1)
            try:
                record = runner.run(job)
            except Exception as error:  # noqa: BLE001 - the cell fails, the study goes on
                yield CellOutcome(job, None, CellFailure.raised(error, traceback.format_exc()))
            else:
                yield CellOutcome(job, record, None)
        running(0)


def compute_on_threads(job: CellJob, threads: int) -> dict[str, Any]:
    """A Ray task: the job's record, computed with ``threads`` torch threads (the task's CPUs)."""
    torch.set_num_threads(threads)
    return compute(job)


def _check_reachable(address: str) -> None:
    """Refuse an address where nothing listens: Ray itself would wait for it for minutes.
    ``auto`` is checked where it leads (``RAY_ADDRESS``, or the cluster ``ray start`` last
    recorded on this machine, which may be gone); ``ray://`` addresses are left to Ray."""
    target = _auto_address() if address == "auto" else address
    host, _, port = (target or "").rpartition(":")
    if "://" in target or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        where = f"'{address}'" if target == address else f"'{address}' ({target})"
        raise EnvironmentFailure(f"cannot reach the Ray cluster at {where}: {error.strerror or error}: start it "
                                 "first (ray start --head), check the address, or pass --ray alone for a local "
                                 "cluster") from None


def _auto_address() -> str:
    """Where Ray's ``auto`` address leads ("" when it finds none, or cannot say)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto") or ""
    except Exception:  # noqa: BLE001 - Ray's private helper: without it, ray.init decides alone
        return ""


class RayExecutor:
    """Each cell as a Ray task holding ``cpus_per_cell`` CPUs (and as many torch threads, at
    least one) and ``gpus_per_cell`` GPUs.

    ``address`` None starts a local cluster on this machine (its CPUs, at least
    ``cpus_per_cell``; its GPUs), shut down at the end; ``"auto"`` or an address joins a running
    cluster. A process already connected to Ray (``ray.init`` called) uses that connection. A
    task whose worker dies (process killed, node lost) is retried ``retries`` times, then
    reported as failed; an exception raised by the cell's own code is not retried.
    ``gpus_per_cell`` None: 1 when the cells' device is CUDA (or not given and the cluster has
    GPUs), else 0.
    """

    local = False

    def __init__(self, address: str | None = None, *, cpus_per_cell: float = 1.0,
                 gpus_per_cell: float | None = None, retries: int = 2, device: str | None = None) -> None:
        if cpus_per_cell <= 0 or (gpus_per_cell is not None and gpus_per_cell < 0) or retries < 0:
            raise ConfigError("--cpus-per-cell must be > 0, --gpus-per-cell and --retries >= 0")
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell
        self.retries = retries
        self.device = parse_device(device) if device is not None else None
        self.slots = 0
        self._started = False
        self._temp_dir: str | None = None
        self._keep_logs = False

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise AtvPruneError("--ray needs Ray, which is not installed: pip install 'atv-prune[cluster]'") from None
        if not ray.is_initialized():
            self._connect(ray)
        try:
            self._size(ray)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _connect(self, ray: Any) -> None:
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.address is None:
            self._temp_dir = tempfile.mkdtemp(prefix="atv-ray-")
            cpus = max(len(os.sched_getaffinity(0)), math.ceil(self.cpus_per_cell))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=self._temp_dir,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        else:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise EnvironmentFailure(f"cannot join the Ray cluster at '{self.address}': {one_line(error)}; start "
                                         "it first (ray start --head) or pass --ray alone for a local cluster"
                                         ) from None
        self._started = True

    def _size(self, ray: Any) -> None:
        """Resolve the GPUs per cell and count the cells the cluster runs at once; refuse a
        request no node can meet (its cells would wait forever)."""
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        has_gpus = any(node.get("GPU", 0) > 0 for node in nodes)
        if self.gpus_per_cell is None:
            wants_cuda = self.device.type == "cuda" if self.device is not None else has_gpus
            self.gpus_per_cell = 1.0 if wants_cuda else 0.0
        if self.device is not None and self.device.type == "cuda" and self.gpus_per_cell == 0:
            raise ConfigError(f"--device {self.device} needs a GPU per cell: pass --gpus-per-cell 1 (or more)")

        def fits(node: dict[str, float]) -> int:
            by_cpu = node.get("CPU", 0) // self.cpus_per_cell
            by_gpu = node.get("GPU", 0) // self.gpus_per_cell if self.gpus_per_cell else by_cpu
            return int(min(by_cpu, by_gpu))

        self.slots = sum(fits(node) for node in nodes)
        if self.slots == 0:
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise AtvPruneError(
                f"no node of the Ray cluster offers {self.cpus_per_cell:g} CPUs and {self.gpus_per_cell:g} GPUs per "
                f"cell (the largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs): lower "
                "--cpus-per-cell / --gpus-per-cell, or add such a node")

    def __exit__(self, *exc_info: Any) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        if self._temp_dir is not None and not self._keep_logs:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._temp_dir = None

    def run(self, jobs: list[CellJob], running: Callable[[int], None]) -> Iterator[CellOutcome]:
        import ray

        task = ray.remote(compute_on_threads)
        resources = {"num_cpus": self.cpus_per_cell, "num_gpus": self.gpus_per_cell, "max_retries": self.retries,
                     "retry_exceptions": False}
        threads = max(1, math.floor(self.cpus_per_cell))
        pending = {task.options(name=f"atv-prune cell {job.label}", **resources).remote(job, threads): job
                   for job in jobs}
        try:
            while pending:
                running(min(len(pending), self.slots))
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    yield self._outcome(ray, pending.pop(ref), ref)
        finally:
            for ref in pending:  # the driver stops early (an interrupt): leave nothing running
                ray.cancel(ref, force=True)
            running(0)

    def _outcome(self, ray: Any, job: CellJob, ref: Any) -> CellOutcome:
        try:
            return CellOutcome(job, ray.get(ref))
        except ray.exceptions.RayTaskError as error:  # the cell's own code raised
            cause = error.cause if isinstance(error.cause, BaseException) else error
            return CellOutcome(job, None, CellFailure.raised(cause, str(error)))
        except ray.exceptions.RayError as error:  # its worker or node died on every attempt
            logs = ""
            if self._temp_dir is not None:  # a local cluster's logs are kept to tell why
                self._keep_logs = True
                logs = f" (logs: {self._temp_dir}/session_latest/logs)"
            return CellOutcome(job, None, CellFailure(f"worker lost{logs}: {one_line(error)}", False, True,
                                                      self.retries + 1))

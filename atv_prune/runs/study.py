"""Resumable studies: a grid of pruning runs, each evaluated, compared with the dense model.

A study is a list of :class:`Cell` (a label and a :class:`PruneConfig`, plus any extra settings
such as the MoT pathway). Each cell loads the checkpoint afresh, prunes it, evaluates it through
the lmms-eval bridge and stores ``cells/<key>.json`` atomically in the study folder; a re-run of
the same study skips the cells already stored. The folder's ``study.json`` pins what the study is
(model, calibration, tasks, evaluation settings), so a different study is never mixed into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from ..errors import AtvPruneError
from ..model.calibration import CalibrationSet, load_calibration
from ..model.loading import load_model_and_processor, resolve_device
from ..validation import Record
from ..versions import package_versions
from .api import PruneReport, prune
from .config import PruneConfig, RunSettings
from .export import check_creatable, write_json_atomic
from .tables import markdown_text

PruneFunction = Callable[[nn.Module, Any, CalibrationSet, PruneConfig, RunSettings, dict[str, Any]], PruneReport]


class StudyManifest(Record):
    """``study.json``: what the study is (its identity) and the versions that started it."""

    identity: dict[str, Any]
    versions: dict[str, str]


@dataclass(frozen=True)
class Cell:
    """One pruning run of a study."""

    label: str
    config: PruneConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Stable identifier of what decides this cell's result."""
        payload = json.dumps({"config": self.config.to_dict(), "extra": self.extra}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


@dataclass
class StudySettings:
    """What every cell of a study shares: its inputs and evaluation (the study's identity), and how
    it runs (``device``, ``progress``, ``load``: not part of the identity). ``load``: ``memory``
    prunes and evaluates the model in memory; ``stream`` prunes it block by block from the checkpoint
    into a temporary folder and evaluates it loaded across the GPU, host memory and disk
    (accelerate's big-model dispatch); ``auto`` streams when the model would not fit in memory."""

    model: Path
    calib: Path
    tasks: list[str]
    bench_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    dtype: str = "auto"
    image_root: Path | None = None
    max_pixels: int | None = None
    trust_remote_code: bool = False
    device: str | None = None
    progress: bool = True
    load: str = "auto"

    def identity(self) -> dict[str, Any]:
        """What makes two runs' cells comparable: the inputs (by content), tasks and evaluation."""
        return {"model": str(self.model.resolve()), "model_fingerprint": _fingerprint(self.model),
                "calib": str(self.calib.resolve()), "calib_sha1": _file_sha1(self.calib), "tasks": self.tasks,
                "bench_dir": self.bench_dir, "limit": self.limit, "batch_size": self.batch_size,
                "dtype": self.dtype, "image_root": str(self.image_root) if self.image_root else None,
                "max_pixels": self.max_pixels}


def _file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(folder: Path) -> str:
    """config.json's content and the weight files' names and sizes (hashing gigabytes of weights
    would cost more than the check is worth)."""
    digest = hashlib.sha1()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()


class PeakMemory:
    """Peak memory used while the block runs: CUDA allocator peak, or the process's resident set
    size sampled every 10 ms on the CPU (minus what was resident before)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - before
            return
        before = self._rss()
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], self._rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak_bytes = max(peak[0], self._rss()) - before


def _default_prune(model: nn.Module, processor: Any, calibration: CalibrationSet, config: PruneConfig,
                   settings: RunSettings, extra: dict[str, Any]) -> PruneReport:
    return prune(model, processor, calibration, config, settings=settings)


class Study:
    """Runs cells into a study folder, resuming finished ones."""

    def __init__(self, folder: Path, settings: StudySettings, kind: str, overwrite: bool = False) -> None:
        """Check that ``folder`` is new, or holds this same study (unless ``overwrite``); nothing
        is written until :meth:`run_all` has checked the inputs."""
        resolve_device(settings.device)  # a bad device is that, not "a different study"
        self.folder = Path(folder)
        self.settings = settings
        self.cells_dir = self.folder / "cells"
        self.overwrite = overwrite
        self.versions = package_versions()
        self.identity = {"kind": kind, **settings.identity(),
                         "versions": {k: self.versions[k] for k in ("atv-prune", "torch", "transformers")}}
        manifest = self.folder / "study.json"
        check_creatable(self.folder)
        if manifest.exists() and not overwrite:
            try:
                stored = StudyManifest.model_validate(json.loads(manifest.read_text()))
            except (OSError, ValueError, ValidationError):
                raise AtvPruneError(f"{manifest} is unreadable or not a study manifest: pass --overwrite to start "
                                    "the study afresh, or choose another --out") from None
            if stored.identity != self.identity:
                changed = sorted(k for k in self.identity if stored.identity.get(k) != self.identity[k])
                raise AtvPruneError(f"{self.folder} holds a different study (differs in {', '.join(changed)}): "
                                    "choose another --out or pass --overwrite")
        elif self.folder.exists() and any(self.folder.iterdir()) and not manifest.exists():
            raise AtvPruneError(f"{self.folder} exists and is not a study folder: choose another --out")
        self._calibrations: dict[tuple[int, int], CalibrationSet] = {}
        self._mode: str | None = None
        self._processor: Any = None

    @property
    def mode(self) -> str:
        """``memory`` or ``stream`` (``settings.load``, with ``auto`` resolved once)."""
        if self._mode is None:
            from .checkpoint import choose_load

            self._mode, _ = choose_load(self.settings.model, self.settings.load, dtype=self.settings.dtype,
                                        device=self.settings.device,
                                        trust_remote_code=self.settings.trust_remote_code)
        return self._mode

    def check_inputs(self, cells: list[Cell]) -> None:
        """Everything about the model, calibration file, tasks and device that can fail, checked
        before the first cell: such an error then costs seconds and leaves no folder behind."""
        from ..eval.run import check_tasks
        from .preflight import check_run_inputs

        settings = self.settings
        check_run_inputs(settings.model, [cell.config for cell in cells], calib_path=settings.calib,
                         image_root=settings.image_root, max_pixels=settings.max_pixels, device=settings.device,
                         trust_remote_code=settings.trust_remote_code)
        check_tasks(settings.tasks, settings.bench_dir)

    def _open(self) -> None:
        """Create the folder (or empty its cells for ``overwrite``) and pin the study in
        ``study.json``."""
        if self.overwrite and self.cells_dir.exists():
            for stale in self.cells_dir.glob("*.json"):
                stale.unlink()
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / "study.json",
                          StudyManifest(identity=self.identity, versions=self.versions).to_dict())

    def _load(self, path: Path | None = None) -> tuple[nn.Module, Any]:
        """The model (the study's, or the pruned one in ``path``) and its processor: in memory, or,
        when the study streams, dispatched across the compute device, host memory and disk."""
        path = self.settings.model if path is None else path
        if self.mode == "memory":
            loaded = load_model_and_processor(path, dtype=self.settings.dtype, device=self.settings.device,
                                              trust_remote_code=self.settings.trust_remote_code)
            return loaded.model, loaded.processor
        from ..model.streaming import load_dispatched

        model = load_dispatched(path, self.cells_dir / ".offload", dtype=self.settings.dtype,
                                device=self.settings.device, trust_remote_code=self.settings.trust_remote_code)
        return model, self._study_processor()

    def _study_processor(self) -> Any:
        if self._processor is None:
            from ..model.processors import load_processor

            self._processor = load_processor(self.settings.model, trust_remote_code=self.settings.trust_remote_code)
        return self._processor

    def _calibration_for(self, processor: Any, config: PruneConfig) -> CalibrationSet:
        """The calibration draw for the cell's samples and seed (read once per draw)."""
        key = (config.samples, config.seed)
        if key not in self._calibrations:
            self._calibrations[key] = load_calibration(
                self.settings.calib, processor, image_root=self.settings.image_root, samples=config.samples,
                seed=config.seed, max_pixels=self.settings.max_pixels)
        return self._calibrations[key]

    def _evaluate(self, model: nn.Module, processor: Any) -> dict[str, Any]:
        from ..eval.run import evaluate

        device = resolve_device(self.settings.device)
        if not hasattr(model, "hf_device_map"):  # a dispatched model is already placed
            model.to(device)
        result = evaluate(model, processor, self.settings.tasks, bench_dir=self.settings.bench_dir,
                          limit=self.settings.limit, batch_size=self.settings.batch_size, device=str(device),
                          progress=self.settings.progress)
        return result.to_dict()

    def dense(self) -> dict[str, Any]:
        """The dense model's evaluation (computed once, then read back)."""
        path = self.cells_dir / "dense.json"
        if path.exists():
            return json.loads(path.read_text())
        record = {"label": "dense", "evaluation": self._evaluate_checkpoint()}
        write_json_atomic(path, record)
        return record

    def _evaluate_checkpoint(self, path: Path | None = None) -> dict[str, Any]:
        """Load the model in ``path`` (default: the study's) for evaluation and evaluate it."""
        try:
            model, processor = self._load(path)
            return self._evaluate(model, processor)
        finally:
            shutil.rmtree(self.cells_dir / ".offload", ignore_errors=True)

    def run(self, cell: Cell, prune_function: PruneFunction = _default_prune) -> dict[str, Any]:
        """Prune and evaluate one cell, or read its stored result."""
        path = self.cells_dir / f"{cell.key()}.json"
        if path.exists():
            return json.loads(path.read_text())
        from ..eval.run import EvalResult, retention

        settings = RunSettings(device=self.settings.device, progress=False)
        memory = PeakMemory(resolve_device(settings.device))
        if self.mode == "memory":
            model, processor = self._load()
            calibration = self._calibration_for(processor, cell.config) if cell.config.needs_calibration else None
            start = time.perf_counter()
            with memory.measure():
                report = prune_function(model, processor, calibration, cell.config, settings, cell.extra)
            seconds = time.perf_counter() - start
            evaluation = self._evaluate(model, processor)
        else:
            report, seconds, evaluation = self._run_streamed(cell, prune_function, settings, memory)
        dense = EvalResult.from_dict(self.dense()["evaluation"])
        record = {
            "label": cell.label, "key": cell.key(), "config": cell.config.to_dict(), "extra": cell.extra,
            "prune_seconds": round(seconds, 3), "peak_memory_bytes": memory.peak_bytes,
            "sparsity": report.sparsity["overall"], "blocks": report.blocks,
            "visual_tokens_per_sample": _mean_visual_tokens(report.blocks),
            "calibration": report.calibration, "warnings": report.warnings, "versions": report.versions,
            "evaluation": evaluation, "retention": retention(EvalResult.from_dict(evaluation), dense),
        }
        write_json_atomic(path, record)
        return record

    def _check_streamable(self, prune_function: PruneFunction) -> None:
        """A study whose pruning changes the model in memory first (the MoT probe) cannot stream."""
        if prune_function is not _default_prune and self.mode == "stream":
            raise AtvPruneError(f"this study changes the model in memory before pruning it, so it cannot stream "
                                f"{self.settings.model} block by block: run it with --load memory on a machine "
                                "whose memory holds the model")

    def _run_streamed(self, cell: Cell, prune_function: PruneFunction, settings: RunSettings,
                      memory: PeakMemory) -> tuple[PruneReport, float, dict[str, Any]]:
        """A cell of a streamed study: pruned block by block into a temporary folder beside the
        cells, evaluated from there (dispatched), then the folder removed."""
        from .checkpoint import prune_checkpoint

        self._check_streamable(prune_function)
        processor = self._study_processor()
        calibration = self._calibration_for(processor, cell.config) if cell.config.needs_calibration else None
        folder = self.cells_dir / f".{cell.key()}.pruned"
        try:
            start = time.perf_counter()
            with memory.measure():
                report = prune_checkpoint(self.settings.model, folder, calibration, cell.config,
                                          settings=settings.model_copy(update={"load": "stream"}),
                                          dtype=self.settings.dtype, trust_remote_code=self.settings.trust_remote_code,
                                          overwrite=True)
            seconds = time.perf_counter() - start
            evaluation = self._evaluate_checkpoint(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return report, seconds, evaluation

    def run_all(self, cells: list[Cell], prune_function: PruneFunction = _default_prune
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The dense evaluation and every cell's record, computing only what is not stored yet.

        The inputs are checked first (unless everything is stored already: a finished study's
        tables can be rebuilt without its inputs); a folder this call created is removed again
        if it fails before any result is stored."""
        stored = {path.name for path in self.cells_dir.glob("*.json")} if not self.overwrite else set()
        pending = [cell for cell in cells if f"{cell.key()}.json" not in stored]
        if pending or "dense.json" not in stored:
            self.check_inputs(pending)
        if pending:
            self._check_streamable(prune_function)
        created = not self.folder.exists()
        try:
            self._open()
            dense = self.dense()
            records = []
            for number, cell in enumerate(cells, 1):
                print(f"[{number}/{len(cells)}] {cell.label}", file=sys.stderr, flush=True)
                records.append(self.run(cell, prune_function))
        except BaseException:
            if created and not any(self.cells_dir.glob("*.json")):
                shutil.rmtree(self.folder, ignore_errors=True)
            raise
        return dense, records


def _mean_visual_tokens(blocks: list[dict[str, Any]]) -> float | None:
    values = [b["visual_tokens_per_sample"] for b in blocks if b.get("visual_tokens_per_sample") is not None]
    return sum(values) / len(values) if values else None


def retention_rows(records: list[dict[str, Any]], dense: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per cell: label, settings, per-task retention, mean, time and memory."""
    tasks = list(dense["evaluation"]["scores"])
    rows = [{"label": "dense", **{t: 100.0 for t in tasks}, "mean": 100.0, "prune_seconds": None,
             "peak_memory_gib": None, "visual_tokens_per_sample": None}]
    for record in records:
        per_task = record["retention"]["tasks"]
        rows.append({"label": record["label"], **{t: per_task.get(t) for t in tasks},
                     "mean": record["retention"]["mean"], "prune_seconds": record["prune_seconds"],
                     "peak_memory_gib": record["peak_memory_bytes"] / 2**30,
                     "visual_tokens_per_sample": record["visual_tokens_per_sample"]})
    return rows


def markdown_table(rows: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    """The rows as a Table-2-style markdown table (retention %, dense scores in the note below)."""
    scores = ", ".join(f"{t} {s:.1f}" for t, s in dense["evaluation"]["scores"].items())
    return markdown_text(rows) + f"\nRetention = pruned / dense × 100 per task. Dense scores: {scores}.\n"


def cell_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a cell record worth keeping in a study's summary file."""
    return {k: record[k] for k in ("label", "config", "extra", "prune_seconds", "peak_memory_bytes", "sparsity",
                                   "visual_tokens_per_sample", "retention")} | {
        "scores": record["evaluation"]["scores"]}


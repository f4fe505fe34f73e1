"""One cell of a study, computed in whichever process runs it: the driver, or a cluster worker.

A :class:`CellJob` holds everything a cell needs: the study's settings, the cell (``None`` for the
dense evaluation) and the prune function (a module-level function, which a worker imports by
name). :meth:`CellRunner.run` turns it into the cell's record, a JSON-ready dict; it reads nothing
from the study folder and writes nothing to it, so a worker needs no shared file system for
results (only for the model and calibration files). The driver stores the records
(:class:`~atv_prune.runs.study.Study`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AtvPruneError, ConfigError
from ..model.calibration import CalibrationSet, load_calibration
from ..model.layout import resolve
from ..model.loading import (
    LoadedModel,
    Placement,
    dispatch,
    load_model_and_processor,
    main_device,
    resolve_device,
    round_through,
)
from ..model.videos import VideoSampling
from .api import PruneReport, prune
from .config import LOADS, STRUCTURED_CANNOT_STREAM, Load, PruneConfig, RunSettings

PruneFunction = Callable[[nn.Module, Any, CalibrationSet, PruneConfig, RunSettings, dict[str, Any]], PruneReport]


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
    it runs (``device``, ``placement``, ``progress``, ``load``: not part of the identity).
    ``placement`` spreads each evaluated model over the GPUs, the CPU and disk (``--device-map``).
    ``load``: ``memory`` prunes and evaluates the model in memory; ``stream`` prunes it block by
    block from the checkpoint into a scratch folder (under the placement's ``offload_folder``, else
    the system's temporary folder) and evaluates it from there, loaded across the GPU, host memory
    and disk (``placement``; default: accelerate's ``auto`` map, kept to ``device`` when one is
    given); ``auto`` streams when the model would not fit in memory, decided once by the study's
    driver for all its cells (each cell's record says which path it took)."""

    model: Path
    calib: Path
    tasks: list[str]
    bench_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    dtype: str = "auto"
    image_root: Path | None = None
    max_pixels: int | None = None
    max_length: int | None = None
    max_frames: int = VideoSampling.max_frames
    fps: float | None = None
    trust_remote_code: bool = False
    device: str | None = None
    placement: Placement | None = None
    progress: bool = True
    load: Load = "auto"

    def __post_init__(self) -> None:
        if self.load not in LOADS:
            raise ConfigError(f"unknown load '{self.load}': choose {', '.join(LOADS)}")

    def identity(self) -> dict[str, Any]:
        """What makes two runs' cells comparable: the inputs (by content), tasks and evaluation."""
        return {"model": str(self.model.resolve()), "model_fingerprint": _fingerprint(self.model),
                "calib": str(self.calib.resolve()), "calib_sha1": _file_sha1(self.calib), "tasks": self.tasks,
                "bench_dir": self.bench_dir, "limit": self.limit, "batch_size": self.batch_size,
                "dtype": self.dtype, "image_root": str(self.image_root) if self.image_root else None,
                "max_pixels": self.max_pixels,
                # only when set, so that studies from before the option resume
                **({"max_length": self.max_length} if self.max_length is not None else {}),
                **({"max_frames": self.max_frames} if self.max_frames != VideoSampling().max_frames else {}),
                **({"fps": self.fps} if self.fps is not None else {})}

    @property
    def video(self) -> VideoSampling:
        """How frames are drawn from the calibration file's clips."""
        return VideoSampling(max_frames=self.max_frames, fps=self.fps)


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


def default_prune(model: nn.Module, processor: Any, calibration: CalibrationSet, config: PruneConfig,
                  settings: RunSettings, extra: dict[str, Any]) -> PruneReport:
    """A study's usual prune function: :func:`~atv_prune.runs.api.prune` with the cell's config."""
    return prune(model, processor, calibration, config, settings=settings)


@dataclass(frozen=True)
class CellJob:
    """A cell to compute, self-contained so that another process can run it."""

    settings: StudySettings
    cell: Cell | None  # None: the dense model's evaluation
    prune_function: PruneFunction = default_prune

    @property
    def key(self) -> str:
        """The name of the cell's record in the study folder (``cells/<key>.json``)."""
        return "dense" if self.cell is None else self.cell.key()

    @property
    def label(self) -> str:
        return "dense" if self.cell is None else self.cell.label


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


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the decoder blocks' weights, byte for byte: two cells with the
    same fingerprint have the same masks (and the same SparseGPT updates). Weights a placement
    left on disk are brought in one block at a time."""
    from accelerate.utils import align_module_device

    digest = hashlib.sha256()
    cpu = torch.device("cpu")
    for index, block in enumerate(resolve(model).blocks(model)):
        with ExitStack() as aligned:
            for module in block.modules():
                aligned.enter_context(align_module_device(module, cpu))
            for name, parameter in sorted(block.named_parameters()):
                digest.update(f"{index}.{name}".encode())
                digest.update(parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class CellRunner:
    """Computes cells of one study in this process, one at a time; keeps each calibration draw
    (samples, seed) for the next cell that needs it."""

    def __init__(self, settings: StudySettings) -> None:
        self.settings = settings
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

    def _load(self, path: Path | None = None) -> LoadedModel:
        """The model (the study's, or the pruned one in ``path``) and its processor: in memory, or,
        when the study streams, loaded straight into its placement (GPU, host memory, disk)."""
        placement = self._stream_placement() if self.mode == "stream" else None
        return load_model_and_processor(path or self.settings.model, dtype=self.settings.dtype,
                                        device=self.settings.device,
                                        trust_remote_code=self.settings.trust_remote_code, placement=placement)

    def _stream_placement(self) -> Placement:
        """Where a streamed study's models go: the study's placement, else accelerate's ``auto``
        map (kept to ``device`` when the study names one)."""
        if self.settings.placement is not None:
            return self.settings.placement
        return Placement() if self.settings.device is None else Placement.on(resolve_device(self.settings.device))

    def _study_processor(self) -> Any:
        """The study model's processor alone (a streamed cell loads no model to prune)."""
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
                seed=config.seed, max_pixels=self.settings.max_pixels, max_length=self.settings.max_length,
                video=self.settings.video)
        return self._calibrations[key]

    def _evaluate(self, model: nn.Module, processor: Any) -> dict[str, Any]:
        """The model's evaluation, on the compute device or spread as the placement says (a model
        loaded into its placement is evaluated where it is)."""
        from ..eval.run import evaluate

        if hasattr(model, "hf_device_map"):
            device = main_device(model.hf_device_map)
        elif self.settings.placement is not None:
            device = dispatch(model, self.settings.placement)
        else:
            device = resolve_device(self.settings.device)
            model.to(device)
        result = evaluate(model, processor, self.settings.tasks, bench_dir=self.settings.bench_dir,
                          limit=self.settings.limit, batch_size=self.settings.batch_size, device=str(device),
                          progress=self.settings.progress, video=self.settings.video)
        return result.to_dict()

    def dense(self) -> dict[str, Any]:
        """The dense model's record: its evaluation."""
        loaded = self._load()
        return {"label": "dense", "evaluation": self._evaluate(loaded.model, loaded.processor)}

    def check_streamable(self, prune_function: PruneFunction, cells: list[Cell]) -> str:
        """This study's load mode (``memory`` or ``stream``), checked against its cells before
        any runs: a study whose pruning changes the model in memory first (the MoT probe), or
        with structured cells (they change the blocks' shapes), cannot stream."""
        if self.mode == "stream":
            if prune_function is not default_prune:
                raise AtvPruneError(f"this study changes the model in memory before pruning it, so it cannot stream "
                                    f"{self.settings.model} block by block: run it with --load memory on a machine "
                                    "whose memory holds the model")
            structured = [cell.label for cell in cells if cell.config.structured]
            if structured:
                raise ConfigError(f"cells {', '.join(structured)}: {STRUCTURED_CANNOT_STREAM}")
        return self.mode

    def cell(self, cell: Cell, prune_function: PruneFunction = default_prune) -> dict[str, Any]:
        """Prune and evaluate one cell; its record (retention is the driver's: it needs the dense
        evaluation)."""
        settings = RunSettings(device=self.settings.device, progress=False)
        memory = PeakMemory(resolve_device(settings.device))
        if self.mode == "stream":
            return self._streamed_cell(cell, prune_function, settings, memory)
        loaded = self._load()
        model, processor = loaded.model, loaded.processor
        calibration = self._calibration_for(processor, cell.config) if cell.config.needs_calibration else None
        start = time.perf_counter()
        with memory.measure():
            report = prune_function(model, processor, calibration, cell.config, settings, cell.extra)
        seconds = time.perf_counter() - start
        round_through(model, loaded.saved_dtype)  # as `prune` would save it, and as a streamed cell reads it back
        return self._record(cell, report, seconds, memory, weights_fingerprint(model),
                            self._evaluate(model, processor), load="memory")

    def _streamed_cell(self, cell: Cell, prune_function: PruneFunction, settings: RunSettings,
                       memory: PeakMemory) -> dict[str, Any]:
        """A cell of a streamed study: pruned block by block into a temporary folder, evaluated
        from there, then the folder removed."""
        from .checkpoint import prune_checkpoint

        self.check_streamable(prune_function, [cell])
        processor = self._study_processor()
        calibration = self._calibration_for(processor, cell.config) if cell.config.needs_calibration else None
        offload = self.settings.placement.offload_folder if self.settings.placement is not None else None
        if offload is not None:
            offload.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="atv-cell-", dir=offload))
        folder = scratch / "pruned"
        try:
            start = time.perf_counter()
            with memory.measure():
                report = prune_checkpoint(self.settings.model, folder, calibration, cell.config,
                                          settings=settings.model_copy(update={"load": "stream"}),
                                          dtype=self.settings.dtype, trust_remote_code=self.settings.trust_remote_code)
            seconds = time.perf_counter() - start
            pruned = self._load(folder)
            record = self._record(cell, report, seconds, memory, weights_fingerprint(pruned.model),
                                  self._evaluate(pruned.model, pruned.processor), load="stream")
            del pruned
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return record

    @staticmethod
    def _record(cell: Cell, report: PruneReport, seconds: float, memory: PeakMemory, fingerprint: str,
                evaluation: dict[str, Any], load: str) -> dict[str, Any]:
        return {
            "label": cell.label, "key": cell.key(), "config": cell.config.to_dict(), "extra": cell.extra, "load": load,
            "prune_seconds": round(seconds, 3), "peak_memory_bytes": memory.peak_bytes,
            "sparsity": report.sparsity["overall"], "weights_sha256": fingerprint, "blocks": report.blocks,
            "visual_tokens_per_sample": _mean_visual_tokens(report.blocks),
            "calibration": report.calibration, "warnings": report.warnings, "versions": report.versions,
            **({"structure": report.structure} if report.structure is not None else {}),
            "evaluation": evaluation,
        }

    def run(self, job: CellJob) -> dict[str, Any]:
        """The record of ``job`` (a cell of this runner's study, or its dense evaluation)."""
        return self.dense() if job.cell is None else self.cell(job.cell, job.prune_function)


#: The runner of the study this process last computed a cell of (a cluster worker runs many).
_RUNNER: list[CellRunner] = []


def compute(job: CellJob) -> dict[str, Any]:
    """A job's record, computed in this process (what a cluster worker runs); the calibration
    draws are kept between the jobs of one study."""
    if not _RUNNER or _RUNNER[0].settings != job.settings:
        _RUNNER[:] = [CellRunner(job.settings)]
    return _RUNNER[0].run(job)


def _mean_visual_tokens(blocks: list[dict[str, Any]]) -> float | None:
    values = [b["visual_tokens_per_sample"] for b in blocks if b.get("visual_tokens_per_sample") is not None]
    return sum(values) / len(values) if values else None

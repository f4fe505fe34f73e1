"""A checkpoint folder pruned into an output folder: loaded whole, or its blocks streamed.

:func:`prune_checkpoint` is what ``atv-prune prune`` runs. Where the model fits in host memory
it is loaded whole (``load="memory"``); otherwise (``load="stream"``, or ``"auto"`` choosing it)
only its non-block weights are loaded and each decoder block is read from the checkpoint's
shards when the engine reaches it, pruned, written out and freed (:mod:`atv_prune.model.streaming`).
Both give the same pruned weights, bit for bit; the output folder appears whole or not at all.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError
from ..model.calibration import CalibrationSet
from ..model.loading import compute_dtype, config_dtype, load_model, model_skeleton, read_config, resolve_device
from ..model.memory import available_memory, parse_size, resident_peak
from ..model.processors import load_processor
from ..model.streaming import WORKDIR, block_bytes, load_streamed, model_bytes
from ..model.videos import VideoSampling
from .api import PruneReport, prune
from .config import STRUCTURED_CANNOT_STREAM, PruneConfig, RunSettings
from .export import write_dir_atomic, write_json_atomic

#: The in-memory path is taken when the model needs at most this share of the available memory.
MEMORY_SHARE = 0.8


def _compute_dtype(model_path: Path, dtype: str, device: torch.device, trust_remote_code: bool) -> torch.dtype:
    """The dtype the model would be loaded in on ``device`` (``auto`` on a GPU: the checkpoint's)."""
    chosen = compute_dtype(dtype, device)
    return chosen if isinstance(chosen, torch.dtype) else config_dtype(read_config(model_path, trust_remote_code),
                                                                        torch.float32)


def choose_load(model_path: Path, load: str = "auto", *, dtype: str = "auto", device: str | None = None,
                trust_remote_code: bool = False) -> tuple[str, dict[str, Any]]:
    """``"memory"`` or ``"stream"`` for ``load="auto"``: memory when the model in its compute dtype
    needs at most 80% of the memory available, and why (bytes needed and available)."""
    if load != "auto":
        return load, {"chosen_by": "--load"}
    skeleton = model_skeleton(model_path, trust_remote_code)
    if skeleton is None:
        return "memory", {"chosen_by": "auto: the model cannot be built on the meta device"}
    needed = model_bytes(skeleton, _compute_dtype(model_path, dtype, resolve_device(device), trust_remote_code))
    available = available_memory()
    fits = available is None or needed <= MEMORY_SHARE * available
    return ("memory" if fits else "stream"), {"chosen_by": "auto", "model_bytes": needed, "available_bytes": available}


def _processor(model_path: Path, calibration: Any, trust_remote_code: bool) -> tuple[Any, str | None]:
    """The checkpoint's processor; a calibration set already made into model inputs needs none, so
    a checkpoint without a usable one is then pruned anyway (and the reason reported)."""
    try:
        return load_processor(model_path, trust_remote_code=trust_remote_code), None
    except CalibrationError as error:
        if isinstance(calibration, (str, Path)):
            raise
        return None, f"no processor saved with the pruned model: {error}"


def prune_checkpoint(
    model_path: str | Path,
    out: str | Path,
    calibration: CalibrationSet | str | Path | None = None,
    config: PruneConfig | None = None,
    *,
    settings: RunSettings | None = None,
    dtype: str = "auto",
    image_root: str | Path | None = None,
    max_pixels: int | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    video: VideoSampling | None = None,
) -> PruneReport:
    """Prune the checkpoint in ``model_path`` and save the pruned model, its processor and
    ``pruning_report.json`` into ``out`` (atomically).

    ``calibration``: a calibration file (read with the checkpoint's processor) or a
    :class:`CalibrationSet`. ``settings.load`` picks the path: ``memory`` loads the whole model,
    ``stream`` its non-block weights only, reading each decoder block from the checkpoint when its
    turn comes; ``auto`` streams when the model would not fit in memory. A structured config
    changes the blocks' shapes, so it always loads the model whole. ``dtype`` as for
    :func:`~atv_prune.model.loading.load_model_and_processor`; ``max_length`` and ``video`` (how
    frames are drawn from the file's clips) as for :func:`~atv_prune.runs.api.prune`. ``extra``
    goes into the report.
    """
    model_path = Path(model_path)
    config = config if config is not None else PruneConfig()
    settings = settings or RunSettings()
    device = resolve_device(settings.device)
    if config.structured:
        if settings.load == "stream":
            raise ConfigError(STRUCTURED_CANNOT_STREAM)
        mode, why = "memory", {"chosen_by": "structured pruning loads the whole model"}
    else:
        mode, why = choose_load(model_path, settings.load, dtype=dtype, device=settings.device,
                                trust_remote_code=trust_remote_code)
    reports: list[PruneReport] = []

    def fill(folder: Path) -> None:
        run_settings = settings if settings.spill_dir else settings.model_copy(
            update={"spill_dir": str(folder / ".activations")})
        data = calibration if config.needs_calibration else None
        started = time.perf_counter()
        processor, note = _processor(model_path, data, trust_remote_code)
        chosen = compute_dtype(dtype, device)
        streamed = None
        if mode == "memory":
            model, saved_dtype = load_model(model_path, chosen, trust_remote_code)
        else:
            streamed = load_streamed(model_path, folder / WORKDIR, dtype=chosen, trust_remote_code=trust_remote_code)
            model, saved_dtype = streamed.model, streamed.saved_dtype
        load_seconds = time.perf_counter() - started
        report = prune(model, processor, data, config, settings=run_settings, image_root=image_root,
                       max_pixels=max_pixels, max_length=max_length, home=streamed.home if streamed else None,
                       video=video)
        save_start = time.perf_counter()
        model = model.to(saved_dtype)
        if streamed is None:
            model.save_pretrained(folder, **_shard_argument(settings, None, saved_dtype))
        else:
            blocks = streamed.layout.blocks(model)
            with streamed.home.attached_for_saving(model, blocks), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
                model.save_pretrained(folder, **_shard_argument(settings, blocks, saved_dtype))
            shutil.rmtree(folder / WORKDIR, ignore_errors=True)
            report.memory["block_bytes_read"] = streamed.home.bytes_read
        if processor is not None:
            processor.save_pretrained(folder)
        report.seconds["load_model"] = round(load_seconds, 4)
        report.seconds["save"] = round(time.perf_counter() - save_start, 4)
        report.settings.update(load=mode, load_reason=why, dtype=dtype, max_shard_size=settings.max_shard_size)
        report.memory["peak_resident_bytes"] = resident_peak()
        report.model["path"] = str(model_path.resolve())
        report.warnings.extend([note] if note else [])
        report.extra.update(extra or {})
        write_json_atomic(folder / "pruning_report.json", report.to_dict())
        reports.append(report)

    write_dir_atomic(Path(out), fill, overwrite)
    return reports[0]


def _shard_argument(settings: RunSettings, streamed_blocks: Any, saved_dtype: torch.dtype) -> dict[str, Any]:
    """``save_pretrained``'s ``max_shard_size``: ``--max-shard-size``, else for a streamed model two
    decoder blocks in the saved dtype (it holds one output shard in memory at a time), else its default."""
    if settings.max_shard_size is not None:
        return {"max_shard_size": parse_size(settings.max_shard_size, "--max-shard-size")}
    if streamed_blocks is None:
        return {}
    return {"max_shard_size": 2 * block_bytes(streamed_blocks, saved_dtype)}

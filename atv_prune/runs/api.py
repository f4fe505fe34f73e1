"""The Python entry point: ``prune(model, processor, calibration, config) -> PruneReport``."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from warnings import warn

import torch
from pydantic import ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.specs import POOLS
from ..errors import CalibrationError, ConfigError
from ..model.calibration import CalibrationSet, fit_context, load_calibration
from ..model.capture import ActivationStore, capture_sample, non_block_modules_on
from ..model.engine import LayerwisePruner, PrunePlan, TargetFinder, check_targets, linear_targets
from ..model.layout import ModelLayout, context_length, resolve
from ..model.loading import resolve_device
from ..model.memory import available_memory, parse_size
from ..model.shrink import shrink_surgery
from ..model.structured import StructuredPruner, SurgeryFactory
from ..model.videos import VideoSampling
from ..model.walk import BlockHome
from ..validation import Record
from ..versions import package_versions
from .config import STRUCTURED_CANNOT_STREAM, PruneConfig, RunSettings


class PruneReport(Record):
    """Everything needed to reproduce and audit one pruning run (``pruning_report.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    config: dict[str, Any]
    settings: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any]
    versions: dict[str, str]
    calibration: dict[str, Any] | None
    sparsity: dict[str, Any]
    blocks: list[dict[str, Any]]
    seconds: dict[str, float]
    warnings: list[str] = Field(default_factory=list)
    memory: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)  # what a caller adds (e.g. the MoT pathway)
    structure: dict[str, Any] | None = None  # structured pruning: counts before/after, parameters, config


def plan_of(config: PruneConfig) -> PrunePlan:
    """The engine's plan for a config: its method, pool, budget, target, allocation and seed."""
    return PrunePlan(method=config.method_spec,
                     pool=POOLS[config.resolved_pool] if config.needs_calibration else None,
                     budget=config.budget, sparsity=config.sparsity, pattern=config.pattern,
                     allocation=config.resolved_allocation, seed=config.seed, label=config.method)


def _model_summary(model: nn.Module, layout: ModelLayout) -> dict[str, Any]:
    return {
        "class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "family": layout.family.name,
        "block_path": layout.block_path,
        "blocks": len(layout.blocks(model)),
        "image_token_ids": list(layout.image_token_ids),
        "video_token_ids": list(layout.video_token_ids),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def _sparsity_summary(per_linear: dict[str, float], sizes: dict[str, int]) -> dict[str, Any]:
    total = sum(sizes.values())
    zeros = sum(per_linear[name] * sizes[name] for name in per_linear)
    return {"overall": zeros / total if total else 0.0, "per_linear": per_linear}


def _empty_budget_warning(pool: str, blocks: list[dict[str, Any]], samples: int) -> str | None:
    """The warning for an adaptive pool whose visual budget rounded to zero for most samples of
    some blocks (there the pool is the text pool), or None."""
    empty = [b for b in blocks if (b.get("samples_without_visual") or 0) * 2 > samples]
    if not empty:
        return None
    return (f"the {pool} pool selected no visual tokens for most samples in {len(empty)} of {len(blocks)} blocks: "
            "there it equals the text pool (its adaptive budget round(min(1, alpha * mean saliency) * n_text) "
            "rounded to 0; a larger alpha or a fixed-budget pool keeps some)")


def _calibration_set(
    calibration: CalibrationSet | str | Path | None, processor: Any, config: PruneConfig,
    image_root: str | Path | None, max_pixels: int | None, max_length: int | None, video: VideoSampling | None,
) -> CalibrationSet:
    if calibration is None:
        raise CalibrationError(f"method '{config.method}' needs calibration data: pass a calibration file")
    if isinstance(calibration, CalibrationSet):
        return calibration if max_length is None else replace(calibration, max_length=max_length)
    if processor is None:
        raise CalibrationError("a processor is needed to read a calibration file: pass the model's processor")
    return load_calibration(calibration, processor, image_root=image_root, samples=config.samples,
                            seed=config.seed, max_pixels=max_pixels, max_length=max_length, video=video)


def activation_store(settings: RunSettings, device: torch.device) -> ActivationStore:
    """Where a run's captured activations wait: the offload device within the budget of
    ``settings.activation_memory`` (default: half the memory available now when they wait on
    the CPU, no limit elsewhere), spilled to ``settings.spill_dir`` beyond it; pinned when a
    GPU computes."""
    offload = torch.device(settings.offload_device)
    if settings.activation_memory is not None:
        budget = parse_size(settings.activation_memory, "--activation-memory")
    else:
        available = available_memory() if offload.type == "cpu" else None
        budget = available // 2 if available is not None else None
    return ActivationStore(offload, budget, Path(settings.spill_dir) if settings.spill_dir else None,
                           pin=device.type == "cuda")


def _gpu_peak(device: torch.device) -> int | None:
    """The allocator's peak on a CUDA ``device`` since the last call (None elsewhere); restarts the count."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def prune(
    model: nn.Module,
    processor: Any = None,
    calibration: CalibrationSet | str | Path | None = None,
    config: PruneConfig | None = None,
    *,
    settings: RunSettings | None = None,
    image_root: str | Path | None = None,
    max_pixels: int | None = None,
    max_length: int | None = None,
    find_targets: TargetFinder = linear_targets,
    surgery: SurgeryFactory = shrink_surgery,
    home: BlockHome | None = None,
    video: VideoSampling | None = None,
) -> PruneReport:
    """Prune the language-model decoder of ``model`` in place and report what was done.

    ``calibration`` is a :class:`CalibrationSet` or the path of a conversation JSON / JSONL
    file (read with ``processor``); it is ignored by data-free methods (magnitude). ``settings``:
    the device, offload device, activation budget and progress bars (default :class:`RunSettings`).
    Samples longer than ``max_length`` tokens (default: the one a :class:`CalibrationSet`
    carries), or than the model's context, are truncated from the end of their text, or skipped
    when their image does not fit (:func:`~atv_prune.model.calibration.fit_context`); the report
    counts both. A structured config (``structure``/``ratio``) removes heads and channels with
    ``surgery`` (default: for real, and the model's config updated so that ``save_pretrained`` +
    ``from_pretrained`` rebuild it). ``home``: where the decoder blocks' weights live between
    their turns (default: in the model, in memory; :func:`~atv_prune.runs.checkpoint.prune_checkpoint`
    streams them from the checkpoint; unstructured configs only).
    ``video``: how frames are drawn from the calibration file's clips (default
    :class:`~atv_prune.model.videos.VideoSampling`: 8 frames evenly over each clip).
    """
    started = time.perf_counter()
    config = config if config is not None else PruneConfig()
    settings = settings or config.legacy_settings or RunSettings()
    layout = resolve(model)
    device = resolve_device(settings.device)
    blocks = layout.blocks(model)
    structured = None
    if config.structured:
        if home is not None:
            raise ConfigError(STRUCTURED_CANNOT_STREAM)
        structured = surgery(model, layout, config.structure, config.ratio, config.resolved_bias_compensation)
        pruner = StructuredPruner(plan_of(config), device, structured, compensate=config.resolved_bias_compensation,
                                  offload_device=settings.offload_device, progress=settings.progress)
    else:
        check_targets(blocks, layout.block_path, config.pattern, find_targets)
        pruner = LayerwisePruner(plan_of(config), device, find_targets, offload_device=settings.offload_device,
                                 progress=settings.progress)
    seconds = pruner.result.seconds
    was_training = model.training
    model.eval()
    calibration_summary = None
    warnings: list[str] = []
    captured = []
    store = activation_store(settings, device)
    gpu_peaks: dict[str, int | None] = {}
    _gpu_peak(device)
    try:
        if config.needs_calibration:
            start = time.perf_counter()
            calib = _calibration_set(calibration, processor, config, image_root, max_pixels, max_length, video)
            drawn = len(calib.samples)
            calib, fit = fit_context(calib, context_length(model.config), layout.visual_token_ids)
            warnings.extend(calib.warnings)
            seconds["load_calibration"] += time.perf_counter() - start
            start = time.perf_counter()
            skipped = 0
            with non_block_modules_on(layout.base_model(model), blocks, device):  # the LM head is not needed
                for sample in tqdm(calib.samples, desc="capture", disable=not settings.progress):
                    state = capture_sample(model, layout, sample.inputs, sample.source, device,
                                           settings.offload_device, store)
                    if state.visual.any():
                        captured.append(state)
                    else:
                        skipped += 1
            seconds["capture"] += time.perf_counter() - start
            if not captured:
                raise CalibrationError(
                    f"none of the {len(calib.samples)} calibration samples contains image or video tokens "
                    f"(ids {list(layout.visual_token_ids)}): give records with an image or a video"
                )
            if skipped:
                warnings.append(f"skipped {skipped} calibration samples without image tokens")
            calibration_summary = {
                "path": str(Path(calib.path).resolve()) if Path(calib.path).exists() else calib.path,
                "records_in_file": calib.records_in_file,
                "samples_drawn": drawn,
                "samples_used": len(captured),
                "skipped_without_image_tokens": skipped,
                "samples_with_video": sum(1 for s in calib.samples if s.video),
                **({"max_frames": calib.video.max_frames, "fps": calib.video.fps} if calib.video else {}),
                "seed": calib.seed,
                "visual_tokens_per_sample": sum(int(s.visual.sum()) for s in captured) / len(captured),
                "tokens_per_sample": sum(s.visual.numel() for s in captured) / len(captured),
                **(fit.summary() if fit is not None else {}),
            }
        gpu_peaks["capture"] = _gpu_peak(device)
        pruner.prune(blocks, layout.block_path, captured, home)
        gpu_peaks["blocks"] = _gpu_peak(device)
        structure = structured.finish(model) if structured is not None else None
    finally:
        model.train(was_training)
        samples_used = len(captured)
        captured.clear()
        store.close()
    seconds["total"] = time.perf_counter() - started
    result = pruner.result
    blocks = [asdict(block) for block in result.blocks]
    if config.budget.rule == "adaptive":
        message = _empty_budget_warning(config.resolved_pool, blocks, samples_used)
        if message is not None:
            warnings.append(message)
            warn(message, stacklevel=2)
    if structure is not None:
        warnings.extend(structure.get("notes", []))
        for block, removed in zip(blocks, pruner.removed):
            block.update(removed)
    return PruneReport(
        config=config.to_dict(),
        settings={"device": str(device), "offload_device": settings.offload_device},
        memory={"activation_budget_bytes": store.budget, "activations_kept_bytes": store.kept_bytes,
                "activations_spilled_bytes": store.spilled_bytes,
                **{f"gpu_peak_{phase}_bytes": peak for phase, peak in gpu_peaks.items() if peak is not None}},
        model=_model_summary(model, layout),
        versions=package_versions(),
        calibration=calibration_summary,
        sparsity=_sparsity_summary(result.sparsity, result.sizes),
        blocks=blocks,
        seconds={key: round(value, 4) for key, value in seconds.items()},
        warnings=warnings,
        structure=structure,
    )

"""Checks of a run's inputs that need neither the weights nor the processor.

Every command runs them before it loads a checkpoint, reads calibration samples or evaluates:
a bad calibration file, a model family we do not support, an N:M pattern that does not fit the
model's widths or a device that is not there then ends in one line within seconds, and before
anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import CalibrationError
from ..model.calibration import check_calibration_file, check_max_length
from ..model.checkpoint import check_checkpoint
from ..model.engine import check_targets
from ..model.layout import context_length, no_video_reason, resolve
from ..model.loading import model_skeleton, read_config, resolve_device
from ..model.shrink import DecoderGeometry, removal_for, shrink_surgery
from ..model.structured import SurgeryFactory
from .config import PruneConfig


def check_model(model_path: Path, configs: Iterable[PruneConfig] = (), *, device: str | None = None,
                offload_device: str = "cpu", trust_remote_code: bool = False,
                max_length: int | None = None, surgery: SurgeryFactory | None = shrink_surgery) -> int | None:
    """Check the devices (compute and offload) and the model: a supported family with locatable
    decoder blocks, weight files that are intact and fill the model exactly (from their headers),
    each config's N:M pattern against the widths, each structured config with ``surgery`` (by
    default the physical shrink: roles, widths, rounding of the ratio, and that the pruned config can
    be expressed; ``None``: the rounding only), and ``max_length`` against the model's context, on a
    meta-device skeleton (no weights read).
    Returns the number of decoder blocks (``None`` when the model cannot be built on the meta
    device; the run then checks the blocks and patterns itself, and only the weight files are
    checked here)."""
    configs = list(configs)
    resolve_device(device)
    resolve_device(offload_device)
    check_max_length(max_length, context_length(read_config(model_path, trust_remote_code)))
    skeleton = model_skeleton(model_path, trust_remote_code)
    if skeleton is None:
        check_checkpoint(model_path, None)
        return None
    layout = resolve(skeleton)
    check_checkpoint(model_path, skeleton)
    for config in configs:
        if not config.structured:
            check_targets(layout.blocks(skeleton), layout.block_path, config.pattern)
        elif surgery is None:
            removal_for(DecoderGeometry.of(skeleton), config.structure, config.ratio)
        else:
            surgery(skeleton, layout, config.structure, config.ratio, config.resolved_bias_compensation)
    return len(layout.blocks(skeleton))


def check_run_inputs(model_path: Path, configs: Iterable[PruneConfig], *, calib_path: Path | None = None,
                     image_root: Path | None = None, max_pixels: int | None = None, device: str | None = None,
                     offload_device: str = "cpu", trust_remote_code: bool = False,
                     max_length: int | None = None, surgery: SurgeryFactory | None = shrink_surgery) -> None:
    """:func:`check_model`, then the calibration file for every draw (samples, seed) that a
    calibrated config makes, its video records included (refused for a model that takes no video)."""
    configs = list(configs)
    check_model(model_path, configs, device=device, offload_device=offload_device,
                trust_remote_code=trust_remote_code, max_length=max_length, surgery=surgery)
    draws = sorted({(c.samples, c.seed) for c in configs if c.needs_calibration})
    if draws and calib_path is None:
        raise CalibrationError("these methods need calibration data: pass --calib FILE")
    video_model = no_video_reason(read_config(model_path, trust_remote_code)) if draws else None
    for samples, seed in draws:
        check_calibration_file(calib_path, image_root=image_root, samples=samples, seed=seed, max_pixels=max_pixels,
                               video_model=video_model)

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
from ..model.calibration import check_calibration_file
from ..model.engine import check_targets
from ..model.layout import resolve
from ..model.loading import model_skeleton, resolve_device
from .config import PruneConfig


def check_model(model_path: Path, configs: Iterable[PruneConfig] = (), *, device: str | None = None,
                offload_device: str = "cpu", trust_remote_code: bool = False) -> int | None:
    """Check the devices (compute and offload) and the model: a supported family with locatable
    decoder blocks, and each config's N:M pattern against the widths, on a meta-device skeleton
    (no weights read). Returns the number of decoder blocks (``None`` when the model cannot be
    built on the meta device; the run then checks the blocks and patterns itself)."""
    configs = list(configs)
    resolve_device(device)
    resolve_device(offload_device)
    skeleton = model_skeleton(model_path, trust_remote_code)
    if skeleton is None:
        return None
    layout = resolve(skeleton)
    for config in configs:
        check_targets(layout.blocks(skeleton), layout.block_path, config.pattern)
    return len(layout.blocks(skeleton))


def check_run_inputs(model_path: Path, configs: Iterable[PruneConfig], *, calib_path: Path | None = None,
                     image_root: Path | None = None, max_pixels: int | None = None, device: str | None = None,
                     offload_device: str = "cpu", trust_remote_code: bool = False) -> None:
    """:func:`check_model`, then the calibration file for every draw (samples, seed) that a
    calibrated config makes."""
    configs = list(configs)
    check_model(model_path, configs, device=device, offload_device=offload_device,
                trust_remote_code=trust_remote_code)
    draws = sorted({(c.samples, c.seed) for c in configs if c.needs_calibration})
    if draws and calib_path is None:
        raise CalibrationError("these methods need calibration data: pass --calib FILE")
    for samples, seed in draws:
        check_calibration_file(calib_path, image_root=image_root, samples=samples, seed=seed, max_pixels=max_pixels)

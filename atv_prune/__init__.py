"""atv_prune: modality-aware pruning of vision-language models.

``prune(model, processor, calibration, PruneConfig(...))`` prunes the language-model decoder of a
transformers VLM in place with ATV-Pruning, Wanda, SparseGPT, TAMP or magnitude and returns a
report. ``register_family`` / ``register_pool`` / ``register_method`` extend the registries.

The names below are imported on first use, so that ``import atv_prune`` (and the command lines'
``--help``) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AtvPruneError": "atv_prune.errors",
    "CalibrationSample": "atv_prune.model.calibration",
    "CalibrationSet": "atv_prune.model.calibration",
    "Family": "atv_prune.model.families",
    "Method": "atv_prune.algorithms.specs",
    "Pool": "atv_prune.algorithms.specs",
    "PruneConfig": "atv_prune.runs.config",
    "PruneReport": "atv_prune.runs.api",
    "RunSettings": "atv_prune.runs.config",
    "load_calibration": "atv_prune.model.calibration",
    "load_model_and_processor": "atv_prune.model.loading",
    "prune": "atv_prune.runs.api",
    "prune_checkpoint": "atv_prune.runs.checkpoint",
    "register_family": "atv_prune.model.families",
    "register_method": "atv_prune.algorithms.specs",
    "register_pool": "atv_prune.algorithms.specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atv_prune' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

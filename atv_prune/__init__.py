"""atv_prune: modality-aware pruning of vision-language models.

``prune(model, processor, calibration, PruneConfig(...))`` prunes the language-model decoder of a
transformers VLM in place with ATV-Pruning, Wanda, SparseGPT, TAMP or magnitude and returns a
report. ``register_family`` / ``register_pool`` / ``register_method`` extend the registries.

The names below are imported on first use, so that ``import atv_prune`` (and the command lines'
``--help``) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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

#: Modules that moved when the package was layered (0.3.0); the old paths still import, with a
#: DeprecationWarning, until 0.4.0.
MOVED_MODULES: dict[str, str] = {
    **{f"atv_prune.{name}": f"atv_prune.algorithms.{name}"
       for name in ("allocation", "masks", "pools", "scoring", "sparsegpt")},
    "atv_prune.methods": "atv_prune.algorithms.specs",
    **{f"atv_prune.{name}": f"atv_prune.model.{name}"
       for name in ("attention", "calibration", "capture", "engine", "loading", "processors")},
    "atv_prune.families": "atv_prune.model.layout",
    **{f"atv_prune.{name}": f"atv_prune.runs.{name}" for name in ("api", "config", "export", "plots", "preflight",
                                                                  "study")},
    "atv_prune.cli_support": "atv_prune.cli.support",
    "atv_prune.cli_eval": "atv_prune.cli.evaluate",
    "atv_prune.cli_study": "atv_prune.cli.study",
    "atv_prune.demo": "atv_prune.cli.demo",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that replaced it, with a DeprecationWarning."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        warnings.warn(f"{spec.name} moved to {MOVED_MODULES[spec.name]} (atv-prune 0.3.0); the old path will be "
                      "removed in 0.4.0", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: Any) -> None:
        """The replacement module ran already."""


sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atv_prune' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

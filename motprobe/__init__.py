"""motprobe: the Mixture-of-Transformer sensitivity probe (analysis only).

``make_probe(model)`` routes the decoder linears of a vision-language model by token modality
(a text copy and a visual copy of each); ``prune_pathway(model, ..., pathway="text")`` prunes one
pathway's copies with atv_prune's engine while the other stays dense. Names are imported on first
use, so the ``motprobe`` command line starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ModalityRoutedLinear": "motprobe.surgery",
    "ProbeError": "motprobe.surgery",
    "ProbeHandle": "motprobe.surgery",
    "make_probe": "motprobe.surgery",
    "pathway_targets": "motprobe.pathways",
    "probe_linears": "motprobe.surgery",
    "prune_pathway": "motprobe.pathways",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'motprobe' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

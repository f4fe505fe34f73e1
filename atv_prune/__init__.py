"""atv_prune: modality-aware pruning of vision-language models.

``prune(model, processor, calibration, PruneConfig(...))`` prunes the language-model decoder
of a transformers VLM in place with ATV-Pruning, Wanda or magnitude and returns a report.
"""

from .api import PruneReport, prune
from .calibration import CalibrationSample, CalibrationSet, load_calibration
from .config import PruneConfig
from .errors import AtvPruneError

__all__ = [
    "AtvPruneError",
    "CalibrationSample",
    "CalibrationSet",
    "PruneConfig",
    "PruneReport",
    "load_calibration",
    "prune",
]

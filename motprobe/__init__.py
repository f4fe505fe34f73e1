"""motprobe: the Mixture-of-Transformer sensitivity probe (analysis only).

``make_probe(model)`` routes the decoder linears of a vision-language model by token modality
(a text copy and a visual copy of each); ``prune_pathway(model, ..., pathway="text")`` prunes one
pathway's copies with atv_prune's engine while the other stays dense.
"""

from .pathways import pathway_targets, prune_pathway
from .surgery import ModalityRoutedLinear, ProbeError, ProbeHandle, make_probe, probe_linears

__all__ = [
    "ModalityRoutedLinear",
    "ProbeError",
    "ProbeHandle",
    "make_probe",
    "pathway_targets",
    "probe_linears",
    "prune_pathway",
]

"""Outlier features for the built-in model: an exact rescaling that makes its largest features LLM-sized.

Large language models carry a few residual-stream channels whose activations are tens of times
the rest (outlier features, Dettmers et al. 2022; massive activations, Sun et al. 2024). After
RMSNorm they stay large, so the linears that read them hold small weights on them, and magnitude
pruning removes those small but essential weights: this is why magnitude pruning collapses on
real LLMs while activation-aware scores (Wanda's |W|·||X||, SparseGPT's Hessian) do not. A 5M
parameter model trained for an hour has the same channels (the built-in model's largest
residual channel is about 10x the median) but not at that scale.

:func:`amplify_outlier_features` gives them that scale without changing what the model computes:
for each decoder block it multiplies the chosen channels of the RMSNorm gains by ``scale`` and
divides the same input columns of the linears that read the norm (q/k/v after the attention norm,
gate/up after the MLP norm) by ``scale``. With a power-of-two scale both steps are exact in binary
floating point, so every product, and so every output, is bit-identical. Wanda's and ATV's scores
are invariant to it; magnitude's are not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..model.layout import resolve

#: Each RMSNorm of a Llama/Qwen2-style decoder block and the linears that read its output.
NORM_READERS: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


@torch.no_grad()
def residual_rms(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Root mean square of each residual-stream channel at the input of every decoder block,
    over all blocks and all non-padding tokens of ``batches`` (keyword inputs of the model)."""
    squares: list[torch.Tensor] = []  # one sum per block input seen
    tokens = 0
    mask = torch.empty(0, dtype=torch.bool)

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = (args[0] if args else kwargs["hidden_states"]).float()
        squares.append(hidden[mask].pow(2).sum(0))

    hooks = [block.register_forward_pre_hook(record, with_kwargs=True) for block in resolve(model).blocks(model)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"].bool()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            tokens += int(mask.sum()) * len(hooks)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not tokens:
        raise ValueError("residual_rms needs at least one batch with a non-padding token")
    return (torch.stack(squares).sum(0) / tokens).sqrt()


def largest_channels(rms: torch.Tensor, k: int) -> list[int]:
    """The ``k`` channels of largest RMS, in ascending channel order."""
    if not 0 <= k <= rms.numel():
        raise ValueError(f"cannot pick {k} outlier channels of {rms.numel()}")
    return sorted(rms.topk(k).indices.tolist()) if k else []


def check_scale(scale: float) -> float:
    """``scale`` itself if it is a power of two above 1 (so the rescaling is exact), else ValueError."""
    if not (scale > 1 and math.log2(scale).is_integer()):
        raise ValueError(f"outlier scale must be a power of two above 1 (2, 4, 8, 16, ...), got {scale:g}")
    return scale


@torch.no_grad()
def amplify_outlier_features(model: nn.Module, channels: list[int], scale: float) -> None:
    """Scale ``channels`` of every decoder block's RMSNorm gains by ``scale`` and the same input
    columns of the linears reading them by ``1 / scale`` (in place; the outputs stay bit-identical).
    Everything is checked before any weight changes, so a refused call leaves the model as it was."""
    check_scale(scale)
    pairs: list[tuple[nn.Module, list[nn.Module]]] = []
    for i, block in enumerate(resolve(model).blocks(model)):
        for norm_name, reader_names in NORM_READERS.items():
            try:
                pairs.append((block.get_submodule(norm_name), [block.get_submodule(name) for name in reader_names]))
            except AttributeError:
                raise ValueError(f"decoder block {i} has no {norm_name} read by {', '.join(reader_names)}: "
                                 "outlier features need a Llama/Qwen2-style decoder") from None
    width = pairs[0][0].weight.numel() if pairs else 0
    if any(not 0 <= c < width for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"outlier channels must be distinct and in [0, {width}), got {channels}")
    index = torch.tensor(channels, dtype=torch.long)
    for norm, readers in pairs:
        norm.weight[index] *= scale
        for linear in readers:
            linear.weight[:, index] /= scale

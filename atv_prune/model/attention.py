"""Attention received by each token, recorded from a decoder block's own attention call.

Attention-based token selection (ABS, TAMP's AMIA) needs attention probabilities, which the
default sdpa kernel never materialises. While :func:`recording_attention` is active, the block's
attention modules dispatch (through transformers' public ``AttentionInterface``) to a function
that computes the block output with sdpa exactly as before and, beside it, the softmax
probabilities of just the query rows needed: every text query (averaged) and the last query.
The rotary embeddings, masks (sliding window, bidirectional image attention) and grouped KV heads
are the ones the model itself passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

RECORDING_IMPLEMENTATION = "atv_prune_recording"
_INTERNAL = "_attn_implementation_internal"  # where PreTrainedConfig stores _attn_implementation


@dataclass
class AttentionRecord:
    """Attention received by every key position, averaged over heads (and over attention calls)."""

    text_queries: torch.Tensor  # bool (seq,): which query rows are averaged into ``from_text``
    from_text: torch.Tensor | None = None  # (seq,) mean attention from the text queries
    from_last: torch.Tensor | None = None  # (seq,) attention from the last query
    calls: int = field(default=0)


_ACTIVE: ContextVar[AttentionRecord | None] = ContextVar("atv_prune_attention_record", default=None)


def _key_mask(attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, k_len: int,
              device: torch.device) -> torch.Tensor:
    """Additive mask for the chosen query rows: the model's own, or causal when it passed none."""
    if attention_mask is None:
        keys = torch.arange(k_len, device=device)
        allowed = keys.unsqueeze(0) <= (rows + k_len - q_len).unsqueeze(1)
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    if attention_mask.dim() == 2:  # (batch, keys) padding mask, as flash attention passes it
        mask = attention_mask[0, :k_len].bool().unsqueeze(0).expand(len(rows), -1)
        causal = torch.arange(k_len, device=device).unsqueeze(0) <= (rows + k_len - q_len).unsqueeze(1)
        mask = mask & causal
    else:
        mask = attention_mask[0, 0][rows, :k_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _received(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
              scaling: float, rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the given query rows over all keys, averaged over heads and rows."""
    heads, kv_heads = query.shape[1], key.shape[1]
    keys = key[0].repeat_interleave(heads // kv_heads, dim=0).float()  # (heads, k, d)
    scores = torch.einsum("hqd,hkd->hqk", query[0][:, rows].float(), keys) * scaling
    scores = scores + _key_mask(attention_mask, rows, query.shape[2], key.shape[2], query.device).unsqueeze(0)
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1))


def _recording_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    record = _ACTIVE.get()
    if record is not None and query.shape[0] == 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        text_rows = record.text_queries.to(query.device).nonzero().squeeze(1)
        last_row = torch.tensor([query.shape[2] - 1], device=query.device)
        with torch.no_grad():
            from_text = _received(query, key, attention_mask, scale, text_rows) if text_rows.numel() else None
            from_last = _received(query, key, attention_mask, scale, last_row)
        if from_text is not None:
            record.from_text = from_text if record.from_text is None else record.from_text + from_text
        record.from_last = from_last if record.from_last is None else record.from_last + from_last
        record.calls += 1
    return output


AttentionInterface.register(RECORDING_IMPLEMENTATION, _recording_attention)


def _attention_configs(block: nn.Module) -> list[Any]:
    """The distinct config objects the block's modules read their attention implementation from."""
    configs: dict[int, Any] = {}
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None and _INTERNAL in getattr(config, "__dict__", {}):
            configs[id(config)] = config
    return list(configs.values())


@contextmanager
def recording_attention(block: nn.Module, text_queries: torch.Tensor) -> Iterator[AttentionRecord]:
    """Record the attention received by each token during the block forwards run inside."""
    record = AttentionRecord(text_queries)
    configs = _attention_configs(block)
    # The stored value is switched directly: the public setter would also rewrite sub-configs.
    saved = [config.__dict__.get(_INTERNAL) for config in configs]
    token = _ACTIVE.set(record)
    for config in configs:
        config.__dict__[_INTERNAL] = RECORDING_IMPLEMENTATION
    try:
        yield record
    finally:
        for config, implementation in zip(configs, saved):
            config.__dict__[_INTERNAL] = implementation
        _ACTIVE.reset(token)
    if record.calls > 1:
        record.from_last = record.from_last / record.calls
        if record.from_text is not None:
            record.from_text = record.from_text / record.calls

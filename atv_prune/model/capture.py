"""Capture what every decoder block receives from the model's own forward, and replay blocks.

One cheap forward per sample records, for each decoder block, the positional and keyword
arguments the model passes to it (attention masks, the model's own rotary
``position_embeddings`` — 3-D M-RoPE for Qwen-VL, per-layer-type tables for Gemma3 — ...).
During that forward every block is temporarily replaced by a stand-in that records its
arguments and returns zeros. Because of the zeros, whatever the model adds to the hidden
states *between* blocks (Qwen3-VL's deepstack visual features) arrives at the next stand-in
exactly, and is kept as that block's additive ``delta``. No block weights are used, so the
capture costs the vision tower plus the embeddings, not a forward through the decoder.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NumericalError
from .layout import ModelLayout

_VISUAL_MASK: ContextVar[torch.Tensor | None] = ContextVar("atv_prune_visual_mask", default=None)


@contextmanager
def visual_mask_context(mask: torch.Tensor | None) -> Iterator[None]:
    """Expose the (batch, seq) visual-token mask of the tokens being processed to modules that route
    by modality (the MoT probe); set by :func:`run_block` and by the probe's own forward hook."""
    token = _VISUAL_MASK.set(mask)
    try:
        yield
    finally:
        _VISUAL_MASK.reset(token)


def current_visual_mask() -> torch.Tensor | None:
    """The visual-token mask set by the innermost :func:`visual_mask_context`, if any."""
    return _VISUAL_MASK.get()


@dataclass(frozen=True)
class SpilledTensor:
    """A tensor kept in a file and memory-mapped only while it is read or written, so that it
    costs neither resident memory nor address space between uses."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def _mapped(self, shared: bool) -> torch.Tensor:
        return torch.from_file(str(self.path), shared=shared, size=math.prod(self.shape), dtype=self.dtype)

    def read(self) -> torch.Tensor:
        """The values, mapped copy-on-write from the file (a CPU tensor)."""
        return self._mapped(shared=False).view(self.shape)

    def write(self, values: torch.Tensor) -> None:
        """Replace the values in the file."""
        self._mapped(shared=True).view(self.shape).copy_(values)


class ActivationStore:
    """Where the captured hidden states wait between blocks: on the offload device while their
    total stays within ``budget`` bytes, beyond it in files under ``folder`` (a temporary folder
    by default), memory-mapped only while they are used. ``pin``: keep CPU states in pinned
    memory, so that copies to a CUDA compute device can run asynchronously."""

    def __init__(self, device: torch.device | str = "cpu", budget: int | None = None, folder: Path | None = None,
                 pin: bool = False) -> None:
        self.device = torch.device(device)
        self.budget = budget
        self.pin = pin and self.device.type == "cpu"
        self._parent = folder
        self._made_parent = False
        self._folder: Path | None = None
        self.kept_bytes = 0
        self.spilled_bytes = 0

    def keep(self, tensor: torch.Tensor) -> torch.Tensor | SpilledTensor:
        """``tensor`` on the offload device, or spilled to a file when the budget is used up."""
        size = tensor.numel() * tensor.element_size()
        if self.budget is None or self.kept_bytes + size <= self.budget:
            self.kept_bytes += size
            kept = tensor.to(self.device)
            return kept.pin_memory() if self.pin else kept
        if self._folder is None:
            if self._parent is not None and not self._parent.exists():
                self._parent.mkdir(parents=True)
                self._made_parent = True
            self._folder = Path(tempfile.mkdtemp(prefix="atv-prune-activations-", dir=self._parent))
        spilled = SpilledTensor(self._folder / f"{self.spilled_bytes + self.kept_bytes}.bin", tuple(tensor.shape),
                                tensor.dtype)
        spilled.write(tensor)
        self.spilled_bytes += size
        return spilled

    def close(self) -> None:
        """Remove the spill files (and ``folder`` itself when the store made it)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if self._made_parent and self._parent is not None:
            shutil.rmtree(self._parent, ignore_errors=True)
            self._made_parent = False


@dataclass
class CapturedSample:
    """One calibration sample's replay state, kept on the offload device (its hidden states
    possibly spilled to disk: :class:`ActivationStore`)."""

    source: str
    visual: torch.Tensor  # bool (seq,)
    state: torch.Tensor | SpilledTensor  # (1, seq, d): the input of the next block to run
    block_args: list[tuple[Any, ...]] = field(default_factory=list)
    block_kwargs: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # block l -> (token positions, values) added to block l's output (only the non-zero rows)

    @property
    def hidden(self) -> torch.Tensor:
        """The input of the next block to run."""
        return self.state.read() if isinstance(self.state, SpilledTensor) else self.state

    @hidden.setter
    def hidden(self, values: torch.Tensor) -> None:
        """Store the next block's input where the states live: into the spill file, into the
        same (possibly pinned) buffer when it comes from another device, else as it is."""
        if isinstance(self.state, SpilledTensor):
            self.state.write(values)
        elif values.device != self.state.device and values.shape == self.state.shape:
            self.state.copy_(values)
        else:
            self.state = values.to(self.state.device)


def to_device(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts, moving a shared tensor only once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.to(device)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(to_device(item, device, memo) for item in obj)
    if isinstance(obj, list):
        return [to_device(item, device, memo) for item in obj]
    if isinstance(obj, dict):
        return {key: to_device(value, device, memo) for key, value in obj.items()}
    return obj


def to_compute(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on the compute device; from pinned CPU memory to a GPU without waiting (later work
    on the same stream orders after the copy, and the source is not written before a synchronising
    copy back)."""
    asynchronous = device.type == "cuda" and tensor.device.type == "cpu" and tensor.is_pinned()
    return tensor.to(device, non_blocking=asynchronous)


def _move_outside(module: nn.Module, keep: set[int], device: torch.device | str) -> None:
    """Move everything under ``module`` to ``device`` except the subtrees whose id is in ``keep``."""
    for child in module.children():
        if id(child) in keep:
            continue
        if any(id(sub) in keep for sub in child.modules()):
            _move_outside(child, keep, device)
        else:
            child.to(device)
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU when it has none)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@contextmanager
def non_block_modules_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> Iterator[None]:
    """Temporarily place every module outside the decoder blocks (embeddings, vision tower,
    rotary tables, ...) on ``device``; the blocks stay where they are."""
    in_blocks = {id(p) for p in blocks.parameters()}
    original = next((p.device for p in model.parameters() if id(p) not in in_blocks), torch.device("cpu"))
    keep = {id(block) for block in blocks}
    _move_outside(model, keep, device)
    try:
        yield
    finally:
        _move_outside(model, keep, original)


class _BlockRecorder:
    """Stand-in forward for every block during capture."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.first_input: torch.Tensor | None = None
        self.args: list[tuple[Any, ...]] = [()] * n_blocks
        self.kwargs: list[dict[str, Any]] = [{}] * n_blocks
        self.deltas: dict[int, torch.Tensor] = {}

    def stand_in(self, index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                self.first_input = hidden
            elif torch.count_nonzero(hidden):
                self.deltas[index - 1] = hidden
            self.args[index] = rest
            self.kwargs[index] = kwargs
            return torch.zeros_like(hidden)

        return forward


@contextmanager
def _recording(blocks: nn.ModuleList) -> Iterator[_BlockRecorder]:
    recorder = _BlockRecorder(len(blocks))
    own = [block.__dict__.get("forward") for block in blocks]  # e.g. an accelerate hook's wrapper
    for index, block in enumerate(blocks):
        block.forward = recorder.stand_in(index)
    try:
        yield recorder
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def prepare_forward_inputs(
    layout: ModelLayout, inputs: Mapping[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
) -> dict[str, Any]:
    """Processor outputs -> forward kwargs on ``device``; floating inputs in the model dtype."""
    prepared = layout.prepare_inputs(inputs)
    moved = {}
    for key, value in prepared.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved


@torch.no_grad()
def capture_sample(
    model: nn.Module,
    layout: ModelLayout,
    inputs: Mapping[str, torch.Tensor],
    source: str,
    compute_device: torch.device | str,
    offload_device: torch.device | str,
    store: ActivationStore | None = None,
) -> CapturedSample:
    """Record block 0's input and every block's arguments for one sample (non-block modules
    must already be on ``compute_device``); the hidden states go to ``store`` (default: plainly on
    ``offload_device``)."""
    blocks = layout.blocks(model)
    dtype = next(blocks.parameters()).dtype
    forward_inputs = prepare_forward_inputs(layout, inputs, compute_device, dtype)
    with _recording(blocks) as recorder:
        layout.base_model(model)(**forward_inputs, use_cache=False)
    if recorder.first_input is None:
        raise RuntimeError("the model's forward never called its first decoder block")
    hidden = recorder.first_input
    if not torch.isfinite(hidden).all():
        raise NumericalError(f"non-finite embeddings for calibration sample {source}: check the model weights")
    memo: dict[int, Any] = {}
    return CapturedSample(
        source=source,
        visual=layout.visual_mask(forward_inputs["input_ids"][0]).to(offload_device),
        state=hidden.to(offload_device) if store is None else store.keep(hidden),
        block_args=[to_device(a, offload_device, memo) for a in recorder.args],
        block_kwargs=[to_device(k, offload_device, memo) for k in recorder.kwargs],
        deltas={i: _sparse_rows(d, offload_device) for i, d in recorder.deltas.items()},
    )


def _sparse_rows(delta: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero token rows of a (1, seq, d) delta: their positions and values."""
    rows = delta[0].ne(0).any(dim=-1).nonzero().squeeze(1)
    return rows.to(device), delta[0, rows].to(device)


def run_block(block: nn.Module, sample: CapturedSample, index: int, hidden: torch.Tensor) -> torch.Tensor:
    """Run decoder block ``index`` on ``hidden`` (already on the block's device) with the
    sample's captured arguments; returns the block output (without the between-block delta)."""
    device = hidden.device
    memo: dict[int, Any] = {}
    args = to_device(sample.block_args[index], device, memo)
    kwargs = to_device(sample.block_kwargs[index], device, memo)
    with visual_mask_context(sample.visual.to(device).unsqueeze(0)):
        output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


def next_input(sample: CapturedSample, index: int, block_output: torch.Tensor) -> torch.Tensor:
    """The input of block ``index + 1``: block ``index``'s output plus what the model adds between blocks."""
    delta = sample.deltas.get(index)
    if delta is None:
        return block_output
    rows, values = (t.to(block_output.device) for t in delta)
    updated = block_output.clone()
    updated[0, rows] = updated[0, rows] + values
    return updated

"""The one block walk: each decoder block on the compute device in turn, its inputs advanced after.

The pruning engine (statistics, masks) and the diagnostics (activations at chosen blocks) both
need block l's inputs with blocks < l already processed; :func:`walk_blocks` yields each block on
the compute device and, once the caller is done with it, runs every sample through it (as it is
then: pruned, for the engine) to give the next block its inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import NumericalError
from .capture import CapturedSample, module_device, next_input, run_block


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse non-finite weights or activations with one line."""
    if not torch.isfinite(tensor).all():
        raise NumericalError(f"non-finite {what}: the model overflows or is corrupt; try --dtype float32")


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``block`` moved to ``device`` for the enclosed code, then back where it was."""
    home = module_device(block)
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


@torch.no_grad()
def propagate(block: nn.Module, index: int, samples: list[CapturedSample], device: torch.device,
              tick: Callable[[], None] | None = None) -> None:
    """Replace every sample's hidden states by block ``index``'s output (plus what the model adds
    between blocks), computed on ``device`` and stored back where the states live."""
    for sample in samples:
        hidden = sample.hidden.to(device)
        output = next_input(sample, index, run_block(block, sample, index, hidden))
        check_finite(output, f"activations after block {index} for sample {sample.source}")
        sample.hidden = output.to(sample.hidden.device)
        if tick is not None:
            tick()


def walk_blocks(blocks: nn.ModuleList, samples: list[CapturedSample], device: torch.device, *,
                last: int | None = None, seconds: dict[str, float] | None = None,
                tick: Callable[[], None] | None = None) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(index, block)`` for blocks ``0 .. last`` (default: all), each on ``device``; after
    the caller's work on a block, ``samples`` advance through it (not after ``last``). Propagation
    time is added to ``seconds["propagation"]``; ``tick`` is called once per sample propagated."""
    last = len(blocks) - 1 if last is None else last
    for index in range(last + 1):
        with on_device(blocks[index], device) as block:
            yield index, block
            if index < last and samples:
                start = time.perf_counter()
                propagate(block, index, samples, device, tick)
                if seconds is not None:
                    seconds["propagation"] = seconds.get("propagation", 0.0) + time.perf_counter() - start

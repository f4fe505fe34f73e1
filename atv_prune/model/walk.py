"""The one block walk: each decoder block on the compute device in turn, its inputs advanced after.

The pruning engine (statistics, masks) and the diagnostics (activations at chosen blocks) both
need block l's inputs with blocks < l already processed; :func:`walk_blocks` yields each block on
the compute device and, once the caller is done with it, runs every sample through it (as it is
then: pruned, for the engine) to give the next block its inputs.

Where a block's weights live between turns is a :class:`BlockHome`: :class:`ResidentBlocks`
keeps the whole model in memory and moves each block to the compute device and back; the
streamed home (:mod:`.streaming`) reads each block from the checkpoint when its turn comes and
writes it out and frees it after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

from ..errors import NumericalError
from .capture import CapturedSample, module_device, next_input, run_block, to_compute


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse non-finite weights or activations with one line. (A finite sum means every element
    is finite, and takes one pass without a mask; only when it is not is every element looked at,
    as a sum can overflow.)"""
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise NumericalError(f"non-finite {what}: the model overflows or is corrupt; try --dtype float32")


class BlockHome(Protocol):
    """Where the decoder blocks' weights live between their turns in the walk."""

    #: wall time of the home's own work (moving, reading, writing weights) per phase name
    seconds: dict[str, float]

    def enter(self, index: int, block: nn.Module, device: torch.device) -> None:
        """Make block ``index``'s weights real on ``device`` for its turn."""

    def leave(self, index: int, block: nn.Module, finished: bool) -> None:
        """Block ``index``'s turn is over: put its weights back home. ``finished`` is False when the
        turn ended early (an error, or a walk stopped before the block's outputs were computed)."""


def _settled(device: torch.device | str) -> float:
    """The time once ``device`` has finished the work queued on it (so a timed copy does not
    count earlier kernels)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ResidentBlocks:
    """Every block stays in memory: moved to the compute device for its turn and back after it
    (the time these copies take is ``seconds["move_blocks"]``; next to nothing on the CPU)."""

    def __init__(self) -> None:
        self._homes: dict[int, torch.device] = {}
        self.seconds = {"move_blocks": 0.0}

    def enter(self, index: int, block: nn.Module, device: torch.device) -> None:
        self._homes[index] = module_device(block)
        start = _settled(device)
        block.to(device)
        self.seconds["move_blocks"] += time.perf_counter() - start

    def leave(self, index: int, block: nn.Module, finished: bool) -> None:
        start = _settled(module_device(block))
        block.to(self._homes.pop(index))
        self.seconds["move_blocks"] += time.perf_counter() - start


@contextmanager
def turn(home: BlockHome, index: int, block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Block ``index`` on ``device`` for the enclosed code, then back home (also on an error)."""
    home.enter(index, block, device)
    try:
        yield block
    except BaseException:
        home.leave(index, block, finished=False)
        raise
    home.leave(index, block, finished=True)


@torch.no_grad()
def propagate(block: nn.Module, index: int, samples: list[CapturedSample], device: torch.device,
              tick: Callable[[], None] | None = None) -> None:
    """Replace every sample's hidden states by block ``index``'s output (plus what the model adds
    between blocks), computed on ``device`` and stored back where the states live."""
    for sample in samples:
        hidden = to_compute(sample.hidden, device)
        output = next_input(sample, index, run_block(block, sample, index, hidden))
        check_finite(output, f"activations after block {index} for sample {sample.source}")
        sample.hidden = output
        if tick is not None:
            tick()


def walk_blocks(blocks: nn.ModuleList, samples: list[CapturedSample], device: torch.device, *,
                last: int | None = None, seconds: dict[str, float] | None = None,
                tick: Callable[[], None] | None = None, home: BlockHome | None = None
                ) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(index, block)`` for blocks ``0 .. last`` (default: all), each on ``device``; after
    the caller's work on a block, ``samples`` advance through it (not after ``last``), then the
    block goes back to ``home`` (default: :class:`ResidentBlocks`). Propagation time is added to
    ``seconds["propagation"]``; ``tick`` is called once per sample propagated."""
    last = len(blocks) - 1 if last is None else last
    home = ResidentBlocks() if home is None else home
    for index in range(last + 1):
        with turn(home, index, blocks[index], device) as block:
            yield index, block
            if index < last and samples:
                start = time.perf_counter()
                propagate(block, index, samples, device, tick)
                if seconds is not None:
                    seconds["propagation"] = seconds.get("propagation", 0.0) + time.perf_counter() - start

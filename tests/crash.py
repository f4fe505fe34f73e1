"""Stop a command line at a named moment in a separate process, to kill it there (SIGKILL) or let
it go on: the crash-safety tests' only tool. Test code only: the package has no pause hooks.

The command runs in a child made by ``fork`` (the parent's imports are reused, so a child costs
a fraction of a second instead of a fresh interpreter's torch import), with the function that
marks the moment wrapped: on reaching it the child tells the parent through a pipe and waits, for
ever or until a release file appears. Its output goes to a file the parent reads afterwards.
"""

from __future__ import annotations

import functools
import importlib
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click


def _module(name: str) -> Callable[[], Any]:
    return lambda: importlib.import_module(name)


def _engine() -> Any:
    from atv_prune.model.engine import LayerwisePruner

    return LayerwisePruner


def _pretrained() -> Any:
    from transformers import PreTrainedModel

    return PreTrainedModel


@dataclass(frozen=True)
class Moment:
    """Where a command stops: the call of ``owner().attribute`` for which ``pauses(call number,
    args)`` holds, before the call (or, with ``after``, once it returned)."""

    owner: Callable[[], Any]
    attribute: str
    pauses: Callable[[int, tuple], bool]
    after: bool = False


MOMENTS: dict[str, Moment] = {
    # capturing the second calibration sample (the first is captured already)
    "calibration": Moment(_module("atv_prune.runs.api"), "capture_sample", lambda number, args: number == 2),
    # pruning the second decoder block (the first is pruned in place already)
    "blocks": Moment(_engine, "_prune_calibrated", lambda number, args: args[2] == 1),
    # the model's weights are in the staging folder, its processor and report are not
    "saving": Moment(_pretrained, "save_pretrained", lambda number, args: True, after=True),
    # the output is complete in the staging folder, about to be renamed to --out
    "publishing": Moment(_module("atv_prune.runs.export"), "_publish", lambda number, args: True),
    # a study's second cell starts pruning (the dense evaluation and the first cell are stored)
    "second cell": Moment(_module("atv_prune.runs.cells"), "prune", lambda number, args: number == 2),
}


def _pause_at(name: str, signal_fd: int, release: Path | None) -> None:
    moment = MOMENTS[name]
    owner = moment.owner()
    original = getattr(owner, moment.attribute)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if not moment.pauses(calls[0], args):
            return original(*args, **kwargs)
        result = original(*args, **kwargs) if moment.after else None
        os.write(signal_fd, b"x")
        while release is None or not release.exists():
            time.sleep(0.02)
        return result if moment.after else original(*args, **kwargs)

    setattr(owner, moment.attribute, wrapper)


@dataclass
class Child:
    """A command running in a forked process, stopped (or finished) at its moment."""

    pid: int
    log: Path

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    def wait(self, timeout: float = 120) -> tuple[int, list[str]]:
        """The exit status and non-empty output lines of a child let go on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                lines = [line for line in self.log.read_text().splitlines() if line.strip()]
                return os.waitstatus_to_exitcode(status), lines
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise TimeoutError(f"the command did not finish in {timeout}s: {self.log.read_text()}")


def _child(main: click.Command, args: list[Any], log: Path, prepare: Callable[[], None]) -> int:
    """Fork; in the child, send the output to ``log``, call ``prepare`` and run ``main args``
    (the child never returns into the test runner). Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 70
    try:
        output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(output, 1)
        os.dup2(output, 2)
        sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
        prepare()
        main.main(args=[str(a) for a in args], prog_name=main.name, standalone_mode=True)
        status = 0
    except SystemExit as end:
        status = end.code if isinstance(end.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything to the log, then leave
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run(main: click.Command, args: list[Any], log: Path, prepare: Callable[[], None]) -> tuple[int, list[str]]:
    """Run ``main args`` to its end in a child process set up by ``prepare`` (e.g. a file-size
    limit); its exit status and non-empty output lines."""
    return Child(_child(main, args, log, prepare), log).wait()


def start(main: click.Command, args: list[Any], moment: str, log: Path, release: Path | None = None,
          timeout: float = 120) -> Child:
    """Run ``main args`` in a child process until it reaches ``moment`` (see :data:`MOMENTS`)."""
    read_fd, write_fd = os.pipe()

    def prepare() -> None:
        os.close(read_fd)
        _pause_at(moment, write_fd, release)

    pid = _child(main, args, log, prepare)
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([read_fd], [], [], 0.05)[0] and os.read(read_fd, 1) == b"x":
                return Child(pid, log)
            if os.waitpid(pid, os.WNOHANG)[0]:
                raise AssertionError(f"the command ended before reaching '{moment}': {log.read_text()}")
    finally:
        os.close(read_fd)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"the command did not reach '{moment}' in {timeout}s: {log.read_text()}")

"""User-facing errors: every problem with the user's input or environment ends in one of these.

The CLI prints ``error: <message>`` on one line and exits with the error's ``exit_status``: 2 for
a problem with the input (the command, its options, its files: fixed by changing them), 1 for an
environment failure (the machine failed the run: a full disk, an exceeded quota, a read-only file
system, a file-size limit, a denied write, a lost cluster worker). The Python API raises them
unchanged. Messages name the problem and what to do about it.
"""

import errno
import os
import re
import stat
from pathlib import Path


class AtvPruneError(Exception):
    """A problem with the user's input, explained in one line (exit status 2)."""

    #: The command line's exit status for this error.
    exit_status = 2


class ConfigError(AtvPruneError):
    """An invalid pruning configuration (sparsity, pattern, pool, method, seed, device)."""


class CalibrationError(AtvPruneError):
    """A calibration file, record or image that cannot be used."""


class ImageError(AtvPruneError):
    """An image that cannot be decoded or used (damaged, too small, too large to decode safely)."""


class CheckpointError(AtvPruneError):
    """A checkpoint whose weight files are damaged or do not fill the model its config declares."""


class UnsupportedModelError(AtvPruneError):
    """A model whose decoder blocks or image-token ids cannot be located."""


class NumericalError(AtvPruneError):
    """Non-finite weights or activations met while pruning."""


class EnvironmentFailure(AtvPruneError):
    """The machine, not the input, failed the run: a full disk, an exceeded quota, a read-only file
    system, a file-size limit, a denied write, a cluster that cannot be reached or a lost worker
    (exit status 1)."""

    exit_status = 1


#: OSError numbers that mean the environment failed (a full or read-only disk, a quota, a size limit,
#: a denied write, an I/O error), not that the user's input is wrong.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES,
                                errno.EPERM})

_WHAT_TO_DO = {
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some of your quota or choose a folder on another disk",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another file system",
    errno.EIO: "check the disk",
    errno.EACCES: "check the folder's permissions",
    errno.EPERM: "check the folder's permissions",
}

# How the safetensors library reports an OSError it met while writing: "... (os error 28)".
_SAFETENSORS_OS_ERROR = re.compile(r"os error (\d+)")


def environment_failure(error: BaseException, doing: str) -> EnvironmentFailure | None:
    """The :class:`EnvironmentFailure` that ``error`` (an ``OSError``, or a library's error that
    quotes one, such as safetensors' ``... (os error 28)``) amounts to while ``doing`` something
    (e.g. ``"saving to out/"``); ``None`` when it is not an environment failure."""
    number = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if number is None:
        found = _SAFETENSORS_OS_ERROR.search(str(error))
        number = int(found.group(1)) if found else None
    if number not in ENVIRONMENT_ERRNOS:
        return None
    return EnvironmentFailure(f"{doing} failed: {os.strerror(number)}: {_WHAT_TO_DO[number]}, then run the "
                              "command again")


def not_a_file(path: object) -> str:
    """How a path that should name a regular file fails: ``is a folder, not a file``, ``is not a
    regular file (...)`` for a pipe or device (process substitution's ``/dev/fd/N``), or ``not found``."""
    path = Path(str(path))
    if path.is_dir():
        return "is a folder, not a file"
    try:
        mode = path.stat().st_mode
    except OSError:
        return "not found"
    if stat.S_ISREG(mode):
        return "is a file"
    kind = "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"is {kind}, not a regular file (as <(...) gives; it can be read only once, so save it to a file)"


def one_line(error: BaseException, limit: int = 300, with_type: bool = False) -> str:
    """An exception's message on one line, truncated, for quoting inside an error message."""
    text = str(error)
    if with_type or not text.strip():
        text = f"{type(error).__name__}: {text}" if text.strip() else type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

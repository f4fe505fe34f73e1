"""User-facing errors: every problem with the user's input ends in one of these.

The CLI prints ``error: <message>`` on one line and exits with the error's ``exit_code`` (2 for a
problem with the input; 1 for a failure of the environment, such as a lost cluster worker); the
Python API raises them unchanged. Messages name the problem and what to do about it.
"""

from pathlib import Path


class AtvPruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    #: The command line's exit status for this error.
    exit_code: int = 2


class EnvironmentFailure(AtvPruneError):
    """A failure of the machines, not of the input: a cluster that cannot be reached."""

    exit_code = 1


class ConfigError(AtvPruneError):
    """An invalid pruning configuration (sparsity, pattern, pool, method)."""


class CalibrationError(AtvPruneError):
    """A calibration file, record or image that cannot be used."""


class UnsupportedModelError(AtvPruneError):
    """A model whose decoder blocks or image-token ids cannot be located."""


class NumericalError(AtvPruneError):
    """Non-finite weights or activations met while pruning."""


def not_a_file(path: object) -> str:
    """How a path that should name a file fails: ``is a folder, not a file`` or ``not found``."""
    return "is a folder, not a file" if Path(str(path)).is_dir() else "not found"


def one_line(error: BaseException, limit: int = 300, with_type: bool = False) -> str:
    """An exception's message on one line, truncated, for quoting inside an error message."""
    text = str(error)
    if with_type or not text.strip():
        text = f"{type(error).__name__}: {text}" if text.strip() else type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

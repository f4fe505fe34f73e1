"""Prune functions for the Ray tests, importable by the cluster's workers (the test module puts
this folder on their PYTHONPATH).

Each worker announces itself in the folder named by ``ATV_TEST_HANDSHAKE`` (set before the
cluster starts, so every worker inherits it) with a file ``<attempt>-<pid>.pid``, so that a test
can find the process running a cell and kill it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from atv_prune.errors import NumericalError
from atv_prune.runs.cells import default_prune

HANDSHAKE = "ATV_TEST_HANDSHAKE"


def _announce() -> int:
    """Write this attempt's pid file; the number of earlier attempts."""
    folder = Path(os.environ[HANDSHAKE])
    attempt = len(list(folder.glob("*.pid")))
    (folder / f"{attempt}-{os.getpid()}.pid").write_text(str(os.getpid()))
    return attempt


def prune_after_first_attempt(model, processor, calibration, config, settings, extra: dict[str, Any]):
    """The first attempt waits, with its model and calibration loaded, until it is killed; the
    next one prunes as usual."""
    if _announce() == 0:
        time.sleep(600)
        raise AssertionError("the first attempt was not killed")
    return default_prune(model, processor, calibration, config, settings, extra)


def prune_or_die(model, processor, calibration, config, settings, extra: dict[str, Any]):
    """Magnitude cells kill their own worker on every attempt, ATV cells raise an input error;
    the others prune as usual."""
    if config.method == "magnitude":
        _announce()
        os.kill(os.getpid(), signal.SIGKILL)
    if config.method == "atv":
        raise NumericalError("non-finite activations in block 0")
    return default_prune(model, processor, calibration, config, settings, extra)

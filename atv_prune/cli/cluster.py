"""Where the command lines' work runs: the study cells' executor (``--ray`` and its resources) and
the evaluated model's placement over devices (``--device-map``, ``--max-memory``,
``--offload-folder``). Read from a command's parsed options; nothing here imports torch or Ray
until a command runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..model.loading import Placement
    from ..runs.executors import CellExecutor

#: The --ray resource options, which mean nothing without it.
_RAY_ONLY = ("cpus_per_cell", "gpus_per_cell", "retries")


def _given(name: str) -> bool:
    """Whether the running command's option ``name`` was given on the command line."""
    context = click.get_current_context(silent=True)
    return context is not None and context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def cell_executor(kw: dict[str, Any]) -> CellExecutor | None:
    """A Ray executor for ``--ray [ADDRESS]``; None (the cells run here, one after another) without."""
    if kw["ray_address"] is None:
        given = [name for name in _RAY_ONLY if _given(name)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} places cells on a Ray cluster: add --ray "
                              "(a local cluster) or --ray ADDRESS")
        return None
    from ..runs.executors import RayExecutor

    address = None if kw["ray_address"] == "local" else kw["ray_address"]
    return RayExecutor(address, cpus_per_cell=kw["cpus_per_cell"], gpus_per_cell=kw["gpus_per_cell"],
                       retries=kw["retries"], device=kw["device"])


def placement(kw: dict[str, Any]) -> Placement | None:
    """The evaluated model's placement for ``--device-map`` (with ``--max-memory`` and
    ``--offload-folder``); None without it."""
    if kw["device_map"] is None:
        for name in ("max_memory", "offload_folder"):
            if kw[name] is not None:
                raise ConfigError(f"--{name.replace('_', '-')} limits how --device-map spreads a model: add "
                                  "--device-map auto")
        return None
    from ..model.loading import Placement, parse_max_memory

    limits = parse_max_memory(kw["max_memory"]) if kw["max_memory"] is not None else None
    return Placement(kw["device_map"], limits, kw["offload_folder"])

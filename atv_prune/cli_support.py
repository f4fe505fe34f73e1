"""Shared pieces of the command lines: one-line errors and list-valued options."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from .errors import AtvPruneError


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an :class:`AtvPruneError` into ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AtvPruneError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


class ListOptionsCommand(click.Command):
    """A command whose ``multiple=True`` options also take space-separated lists:
    ``--sparsity 0.5 0.6`` is read as ``--sparsity 0.5 --sparsity 0.6``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        lists = {name for param in self.params if isinstance(param, click.Option) and param.multiple
                 for name in param.opts}
        rewritten, current = [], None
        for arg in args:
            if arg.startswith("--"):
                current = arg if arg in lists else None
                rewritten.append(arg)
            elif current is not None and rewritten[-1] != current:
                rewritten += [current, arg]
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)

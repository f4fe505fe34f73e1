"""Shared pieces of the command lines: one-line errors (ours and click's usage errors) and
list-valued options."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from ..errors import AtvPruneError, environment_failure, one_line


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    click.echo(f"warning: {message}", err=True)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an :class:`AtvPruneError`, or an unforeseen file-system ``OSError``, into one
    ``error: ...`` line on stderr and the exit status its kind calls for: 2 for a problem with the
    input, 1 for an environment failure (:class:`EnvironmentFailure`; an ``OSError`` for a full or
    read-only disk, a quota, a file-size limit, a denied write or an I/O error); show warnings as
    one ``warning: ...`` line."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
                return command(*args, **kwargs)
        except AtvPruneError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_status)
        except OSError as error:  # a file system problem no check foresaw (disk full, a path changed)
            where = f" {error.filename}" if error.filename else " a file"
            failure = environment_failure(error, f"accessing{where}")
            if failure is not None:
                click.echo(f"error: {failure}", err=True)
                sys.exit(failure.exit_status)
            click.echo(f"error: cannot access{where}: {error.strerror or one_line(error)}: check the path and "
                       "that nothing else changes it during the run", err=True)
            sys.exit(2)

    return wrapper


class OneLineUsageError(click.ClickException):
    """A command-line usage error (unknown option or choice, bad value, missing option) shown as
    one ``error: ...`` line with a pointer to ``--help``, instead of click's usage block."""

    exit_code = 2

    def __init__(self, message: str, command_path: str) -> None:
        super().__init__(message)
        self.command_path = command_path

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message} (see '{self.command_path} --help')", err=True)


#: click >= 8.2 raises this for a group called without arguments (8.1 prints the help itself).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(error: click.UsageError, fallback: str) -> click.UsageError:
    """The one-line form of ``error``; a bare command without arguments keeps click's help."""
    if isinstance(error, _NO_ARGS_IS_HELP):
        return error
    return OneLineUsageError(error.format_message(), error.ctx.command_path if error.ctx else fallback)


def _path(info_name: str | None, parent: click.Context | None) -> str:
    return " ".join(part for part in (parent.command_path if parent else "", info_name or "") if part)


class _OneLineUsageErrors:
    """Mixin for click commands and groups: usage errors in their own arguments are one line."""

    name: str | None

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except click.UsageError as error:
            raise _one_line(error, _path(info_name or self.name, parent)) from None


class Command(_OneLineUsageErrors, click.Command):
    """A click command whose usage errors are one line."""


class Group(_OneLineUsageErrors, click.Group):
    """A click group whose usage errors (its own and its commands') are one line."""

    command_class = Command

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[Any, ...]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            raise _one_line(error, ctx.command_path) from None


class ListOptionsCommand(Command):
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

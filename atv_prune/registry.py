"""Open registries of named entries (families, pools, methods), readable without torch.

A :class:`Registry` maps names to frozen spec records. Built-in specs name their functions by
reference (``"atv_prune.algorithms.pools:drift_pool"``), so listing or validating names — the
command line's choices, a config's check — imports nothing heavy; :func:`resolve_ref` imports a
function the first time it is called. Specs registered from outside the package may hold the
callable itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import ConfigError

#: A callable, or the ``"module:attribute"`` path of one.
Ref = Callable[..., Any] | str

T = TypeVar("T")


def resolve_ref(ref: Ref) -> Callable[..., Any]:
    """The callable ``ref`` names (imported on first use), or ``ref`` itself."""
    if callable(ref):
        return ref
    module, _, attribute = ref.partition(":")
    if not module or not attribute:
        raise ValueError(f"'{ref}' is not a 'module:attribute' reference")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Named specs of one kind, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, spec: T, *, replace: bool = False) -> T:
        """Add ``spec`` under ``name``; an existing name is refused unless ``replace``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty name")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} '{name}' is registered already (pass replace=True to override it)")
        self._entries[name] = spec
        return spec

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for extensions that register temporarily, e.g. in tests)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}': choose one of {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def values(self) -> list[T]:
        return list(self._entries.values())

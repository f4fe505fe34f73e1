"""One validation layer for the data at the project's edges (pydantic v2).

Configs, recipes, reports, study manifests and calibration records are :class:`Record` models:
fields and constraints are declared once, JSON is read and written by the same model, and every
validation failure becomes one :class:`~atv_prune.errors.AtvPruneError` line naming the field and
the fix, never a multi-line pydantic dump. Why pydantic rather than dataclasses with checks: nested
records (a conversation's turns, a report's blocks) get field paths in their errors for free, and
JSON in and out is one call; it is already a dependency of the evaluation stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import AtvPruneError, not_a_file

R = TypeVar("R", bound="Record")


def field_path(location: tuple[int | str, ...]) -> str:
    """``("conversations", 1, "from")`` -> ``conversations[1].from``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe(error: ValidationError) -> str:
    """The first problem of a validation error, on one line: our own message for a failed check
    (it names the field already), else ``field: what pydantic says``."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "value_error":
        message = str(first["ctx"]["error"])
    else:
        location = field_path(tuple(first.get("loc", ())))
        message = f"{location}: {first['msg']}" if location else first["msg"]
    return " ".join(message.split())


class Record(BaseModel):
    """A validated record: construction failures raise :attr:`error_class` with one line."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    error_class: ClassVar[type[AtvPruneError]] = AtvPruneError

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise self.error_class(describe(error)) from None

    @classmethod
    def _validate(cls: type[R], data: Any) -> R:
        """``model_validate``, with every failure as the record's one-line error (pydantic may run a
        subclass's ``__init__``, which converts already)."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise cls.error_class(describe(error)) from None

    @classmethod
    def parse(cls: type[R], data: Any, where: str = "") -> R:
        """Validate ``data`` (e.g. parsed JSON); failures are one line prefixed by ``where``."""
        try:
            return cls._validate(data)
        except AtvPruneError as error:
            raise cls.error_class(f"{where}: {error}" if where else str(error)) from None

    @classmethod
    def read(cls: type[R], path: str | Path, what: str, fix: str) -> R:
        """The record in JSON file ``path`` (``what`` it should be, ``fix`` for the error line)."""
        path = Path(path)
        if not path.is_file():
            raise cls.error_class(f"{what} {path} {not_a_file(path)}: {fix}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise cls.error_class(f"{path} is not a readable JSON {what} ({type(error).__name__}): {fix}") from None
        if not isinstance(data, dict):
            raise cls.error_class(f"{path} holds a JSON {type(data).__name__}, not a {what}: {fix}")
        try:
            return cls._validate(data)
        except AtvPruneError as error:
            raise cls.error_class(f"{path} is not a valid {what}: {error}; {fix}") from None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data."""
        return self.model_dump(mode="json")

"""``recipe.json``: the calibration a pathway-sensitivity study supports, for ``atv-prune prune --recipe``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..validation import Record
from .config import PruneConfig

RECIPE_FORMAT = "atv-prune-recipe/1"
_FIX = "pass the recipe.json 'motprobe sensitivity' wrote, or give --method, --pool and --alpha yourself"


class Recipe(Record):
    """A method, pool and ATV budget scale, with why (``rationale``) and the study's figures
    (``evidence``). Its settings must form a valid :class:`PruneConfig`."""

    format: str = RECIPE_FORMAT
    method: str
    pool: str | None
    alpha: float
    rationale: str = ""
    evidence: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.format.startswith("atv-prune-recipe/"):
            raise ValueError(f"format '{self.format}' is not an atv-prune recipe")
        try:
            PruneConfig(method=self.method, pool=self.pool, alpha=self.alpha)
        except ConfigError as error:
            raise ValueError(f"it holds an invalid setting ({error})") from None
        return self

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """The recipe in ``path``, or one error line saying what is wrong with it."""
        return cls.read(path, "recipe", _FIX)

    def settings(self) -> dict[str, Any]:
        """``method``, ``pool`` and ``alpha`` for a :class:`PruneConfig`."""
        return {"method": self.method, "pool": self.pool, "alpha": self.alpha}

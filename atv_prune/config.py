"""The pruning configuration: one validated dataclass that every entry point shares."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError
from .allocation import ALLOCATIONS
from .methods import METHODS, Method
from .pools import POOLS

#: Pools that only select by modality, usable with any activation-aware method.
PLAIN_POOLS = tuple(name for name, pool in POOLS.items() if pool.budget == "none")


def parse_pattern(text: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (N weights pruned in every M consecutive inputs) into ``(N, M)``."""
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise ConfigError(f"pattern '{text}' is not of the form N:M (e.g. 2:4 or 4:8)") from None
    return n, m


def single_target(sparsity: float | None, pattern: str | None, default: float = 0.5) -> dict[str, Any]:
    """``sparsity``/``pattern`` keyword arguments for one target given as ``--sparsity`` or
    ``--pattern`` (not both), ``default`` sparsity when neither is given."""
    if sparsity is not None and pattern is not None:
        raise ConfigError("give one target: --sparsity P or --pattern N:M, not both")
    if pattern is not None:
        return {"sparsity": None, "pattern": parse_pattern(pattern)}
    return {"sparsity": default if sparsity is None else sparsity, "pattern": None}


def target_list(sparsities: tuple[float, ...], patterns: tuple[str, ...]) -> list[dict[str, Any]]:
    """``sparsity``/``pattern`` keyword arguments for each of a study's targets (at least one)."""
    if not sparsities and not patterns:
        raise ConfigError("give at least one target: --sparsity 0.5 0.6 and/or --pattern 2:4 4:8")
    return [{"sparsity": s, "pattern": None} for s in sparsities] + [
        {"sparsity": None, "pattern": parse_pattern(p)} for p in patterns]


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the masks.

    Exactly one of ``sparsity`` (unstructured, row-wise) or ``pattern`` (N:M: N of every M
    consecutive input weights pruned, so 2:4 and 4:8 give 50%) must be set.
    """

    method: str = "atv"
    sparsity: float | None = 0.5
    pattern: tuple[int, int] | None = None
    pool: str | None = None
    alpha: float = 1.0
    visual_ratio: float = 0.1
    allocation: str | None = None
    samples: int = 128
    seed: int = 0
    device: str | None = None
    offload_device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise ConfigError("give exactly one of --sparsity P (0 < P < 1) or --pattern N:M")
        if self.sparsity is not None and not (
            isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity) and 0 < self.sparsity < 1
        ):
            raise ConfigError(f"sparsity {self.sparsity} is outside (0, 1): pass e.g. --sparsity 0.5 for 50%")
        if self.pattern is not None:
            n, m = self.pattern
            if not (0 < n < m):
                raise ConfigError(f"pattern {n}:{m} is invalid: need 0 < N < M (e.g. 2:4 or 4:8)")
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError(f"unknown pool '{self.pool}': choose one of {', '.join(POOLS)}")
        method = METHODS[self.method]
        if method.default_pool is None and self.pool is not None:
            raise ConfigError(f"{self.method} pruning uses no calibration data: drop --pool")
        if not method.plain_pools and self.pool in PLAIN_POOLS:
            raise ConfigError(f"--method {self.method} builds its own pool; for the '{self.pool}' pool use --method wanda")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation '{self.allocation}': choose one of {', '.join(ALLOCATIONS)}")
        if self.resolved_allocation == "das" and (self.pattern is not None or not self.needs_calibration):
            raise ConfigError("DAS allocation needs unstructured --sparsity and a calibrated method; "
                              "use --allocation uniform with N:M patterns")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"alpha {self.alpha} must be a finite number >= 0: pass --alpha 0 or more (default 1)")
        if not (0 < self.visual_ratio <= 1):
            raise ConfigError(f"visual ratio {self.visual_ratio} is outside (0, 1]: pass --visual-ratio R with 0 < R <= 1")
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}: pass --samples N with N >= 1")

    @property
    def method_spec(self) -> Method:
        """The registered method: its statistic and weight-pruning function."""
        return METHODS[self.method]

    @property
    def resolved_pool(self) -> str | None:
        """The calibration pool actually used (None for data-free methods)."""
        return self.pool or METHODS[self.method].default_pool

    @property
    def resolved_allocation(self) -> str:
        """How sparsity is spread over a block's matrices: 'uniform' or 'das'."""
        return self.allocation or METHODS[self.method].allocation

    @property
    def needs_calibration(self) -> bool:
        return self.resolved_pool is not None

    @property
    def target_label(self) -> str:
        """Human-readable target, e.g. '50%' or '2:4'."""
        if self.pattern is not None:
            return f"{self.pattern[0]}:{self.pattern[1]}"
        return f"{self.sparsity:.0%}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pattern"] = None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
        data["pool"] = self.resolved_pool
        data["allocation"] = self.resolved_allocation
        del data["progress"]
        return data

"""What defines a pruning result (:class:`PruneConfig`) and how a run is carried out (:class:`RunSettings`).

The two are kept apart so that a result's identity (a study cell's key, a report's config) never
depends on the device it was computed on. Both are validated records: a bad value is one
:class:`~atv_prune.errors.ConfigError` line. Method, pool and allocation names are checked against
the registries at run time, so a pool registered from outside is accepted like a built-in one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from pydantic import PrivateAttr, model_validator

from ..algorithms.budget import Budget
from ..algorithms.specs import ALLOCATIONS, MAX_SEED, METHODS, POOLS, STRUCTURES, Method, plain_pools
from ..errors import ConfigError
from ..model.memory import parse_size
from ..validation import Record

#: How a run holds the model: whole in memory, its blocks streamed from the checkpoint, or chosen by size.
Load = Literal["auto", "memory", "stream"]
LOADS: tuple[str, ...] = Load.__args__

#: Why a structured config refuses ``load="stream"`` (the one message every entry point gives).
STRUCTURED_CANNOT_STREAM = ("structured pruning changes the blocks' shapes, so their weights cannot be streamed from "
                            "the checkpoint: load the model whole (--load memory, or auto)")

#: PruneConfig keywords that moved to RunSettings (accepted with a DeprecationWarning).
RUN_SETTING_FIELDS = ("device", "offload_device", "progress")


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


def target_list(sparsities: tuple[float, ...], patterns: tuple[str, ...], structures: tuple[str, ...] = (),
                ratios: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """``sparsity``/``pattern`` (or ``structure``/``ratio``) keyword arguments for each of a study's
    targets (at least one): every sparsity, every pattern, and every structure at every ratio."""
    if bool(structures) != bool(ratios):
        raise ConfigError("structured targets need both --structure (channels, heads, both) and --ratio R")
    if not sparsities and not patterns and not ratios:
        raise ConfigError("give at least one target: --sparsity 0.5 0.6, --pattern 2:4 4:8 and/or "
                          "--structure both --ratio 0.2")
    return [{"sparsity": s, "pattern": None} for s in sparsities] + [
        {"sparsity": None, "pattern": parse_pattern(p)} for p in patterns] + [
        {"sparsity": None, "structure": structure, "ratio": ratio} for structure in structures for ratio in ratios]


def is_structured(target: dict[str, Any]) -> bool:
    """Whether a :func:`target_list` entry is a structured (``structure``/``ratio``) target."""
    return target.get("structure") is not None


class RunSettings(Record):
    """How a run is carried out, not what it computes: the compute device (None: CUDA when
    present, else the CPU), where calibration activations wait, and progress bars; for a
    checkpoint pruned into a folder (:func:`~atv_prune.runs.checkpoint.prune_checkpoint`) also
    whether the model is loaded whole or its blocks streamed (``load``: auto, memory, stream)
    and the output's shard size. ``activation_memory``: the bytes of calibration activations
    kept in memory ("8GB"; None: half the memory available when the capture starts), the rest
    spilled to files in ``spill_dir`` (default: the output folder, else the system's temporary
    folder)."""

    error_class = ConfigError

    device: str | None = None
    offload_device: str = "cpu"
    progress: bool = True
    load: Load = "auto"
    max_shard_size: str | None = None
    activation_memory: str | None = None
    spill_dir: str | None = None

    @model_validator(mode="after")
    def _check_sizes(self) -> RunSettings:
        for name in ("max_shard_size", "activation_memory"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_size(value, f"--{name.replace('_', '-')}")
                except ConfigError as error:
                    raise ValueError(str(error)) from None
        return self


class PruneConfig(Record):
    """Everything that decides the masks.

    Exactly one target: ``sparsity`` (unstructured, row-wise), ``pattern`` (N:M: N of every M
    consecutive input weights pruned, so 2:4 and 4:8 give 50%), or, for a structured method
    (``wanda-sp``, ``flap``), ``structure`` (``channels``, ``heads`` or ``both``) with ``ratio``:
    that fraction of each block's MLP channels and/or key/value head groups is removed (floor per
    block; 0 keeps the model as it is). Giving ``structure`` drops the default ``sparsity``.
    ``bias_compensation`` (FLAP) adds the removed inputs' mean contribution to the output bias.
    ``device``, ``offload_device`` and ``progress`` are run settings (:class:`RunSettings`); given
    here they still work, with a DeprecationWarning.
    """

    error_class = ConfigError

    method: str = "atv"
    sparsity: float | None = 0.5
    pattern: tuple[int, int] | None = None
    pool: str | None = None
    alpha: float = 1.0
    visual_ratio: float = 0.1
    allocation: str | None = None
    samples: int = 128
    seed: int = 0
    structure: str | None = None
    ratio: float | None = None
    bias_compensation: bool = True
    _legacy_settings: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        legacy = {name: data.pop(name) for name in RUN_SETTING_FIELDS if name in data}
        if legacy:
            given = "=..., ".join(legacy) + "=..."
            warnings.warn(f"PruneConfig({given}) is deprecated: pass prune(..., settings=RunSettings({given})) "
                          "instead", DeprecationWarning, stacklevel=2)
        if (data.get("structure") is not None or data.get("ratio") is not None) and "sparsity" not in data:
            data["sparsity"] = None  # a structured target replaces the default sparsity
        super().__init__(**data)
        self._legacy_settings = legacy

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        self._check_structured()
        if self.structure is None and (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of --sparsity P (0 < P < 1) or --pattern N:M")
        if self.sparsity is not None and not (math.isfinite(self.sparsity) and 0 < self.sparsity < 1):
            raise ValueError(f"sparsity {self.sparsity} is outside (0, 1): pass e.g. --sparsity 0.5 for 50%")
        if self.pattern is not None:
            n, m = self.pattern
            if not (0 < n < m):
                raise ValueError(f"pattern {n}:{m} is invalid: need 0 < N < M (e.g. 2:4 or 4:8)")
        if self.pool is not None and self.pool not in POOLS:
            raise ValueError(f"unknown pool '{self.pool}': choose one of {', '.join(POOLS)}")
        method = METHODS[self.method]
        if not method.needs_calibration and self.pool is not None:
            raise ValueError(f"{self.method} pruning uses no calibration data: drop --pool")
        if not method.plain_pools and self.pool in plain_pools():
            raise ValueError(f"--method {self.method} builds its own pool; for the '{self.pool}' pool use "
                             "--method wanda")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation '{self.allocation}': choose one of {', '.join(ALLOCATIONS)}")
        if self.resolved_allocation == "das" and (self.pattern is not None or not self.needs_calibration):
            raise ValueError("DAS allocation needs unstructured --sparsity and a calibrated method; "
                             "use --allocation uniform with N:M patterns")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha {self.alpha} must be a finite number >= 0: pass --alpha 0 or more (default 1)")
        if not (0 < self.visual_ratio <= 1):
            raise ValueError(f"visual ratio {self.visual_ratio} is outside (0, 1]: pass --visual-ratio R with "
                             "0 < R <= 1")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}: pass --samples N with N >= 1")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed {self.seed} is outside 0..{MAX_SEED}: pass --seed N with 0 <= N <= {MAX_SEED}")
        return self

    def _check_structured(self) -> None:
        """A structured method takes exactly a structure and a ratio; an unstructured one neither."""
        method = METHODS[self.method]
        structured = self.structure is not None or self.ratio is not None
        if structured and (self.sparsity is not None or self.pattern is not None):
            raise ValueError("give one target: --sparsity/--pattern (weights) or --structure with --ratio "
                             "(heads and channels), not both")
        if self.structure is not None and self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure '{self.structure}': choose one of {', '.join(STRUCTURES)}")
        if structured and (self.structure is None or self.ratio is None):
            raise ValueError("a structured target needs both --structure (channels, heads, both) and --ratio R")
        if structured and not method.structured:
            structured_methods = [name for name, m in METHODS.items() if m.structured]
            raise ValueError(f"--method {self.method} prunes single weights; for --structure use one of "
                             f"{', '.join(structured_methods)}")
        if method.structured and not structured:
            raise ValueError(f"--method {self.method} removes heads and channels: give --structure "
                             "channels|heads|both and --ratio R instead of --sparsity/--pattern")
        if self.ratio is not None and not (math.isfinite(self.ratio) and 0 <= self.ratio < 1):
            raise ValueError(f"ratio {self.ratio} is outside [0, 1): pass e.g. --ratio 0.2 to remove 20% of "
                             "each block's heads and/or channels")
        if structured and self.allocation == "das":
            raise ValueError("DAS allocation spreads unstructured sparsity: drop --allocation with --structure")

    @property
    def structured(self) -> bool:
        """Whether this config removes heads and channels (``structure``/``ratio``)."""
        return self.structure is not None

    @property
    def resolved_bias_compensation(self) -> bool:
        """Whether removed structures are compensated in the output bias (a method with a bias term,
        asked for)."""
        return self.structured and self.bias_compensation and METHODS[self.method].bias_shift is not None

    @property
    def method_spec(self) -> Method:
        """The registered method: its accumulator and weight-pruning function."""
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
    def budget(self) -> Budget:
        """The visual budget rule of the resolved pool, with this config's alpha and ratio."""
        rule = POOLS[self.resolved_pool].budget if self.needs_calibration else "none"
        return Budget(rule, self.alpha, self.visual_ratio)

    @property
    def target_label(self) -> str:
        """Human-readable target, e.g. '50%' or '2:4'."""
        if self.pattern is not None:
            return f"{self.pattern[0]}:{self.pattern[1]}"
        if self.structure is not None:
            return f"{self.structure}-{self.ratio * 100:g}%"
        return f"{self.sparsity:.0%}"

    @property
    def legacy_settings(self) -> RunSettings | None:
        """Run settings given to this config the deprecated way, if any."""
        return RunSettings(**self._legacy_settings) if self._legacy_settings else None

    def to_dict(self) -> dict[str, Any]:
        """What defines the result, with the resolved pool and allocation (a report's ``config``)."""
        data = self.model_dump()
        data["pattern"] = None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"
        data["pool"] = self.resolved_pool
        data["allocation"] = self.resolved_allocation
        if self.structured:
            data["bias_compensation"] = self.resolved_bias_compensation
        else:  # an unstructured config's record (and a study cell's key) is what it was before structures
            for name in ("structure", "ratio", "bias_compensation"):
                del data[name]
        return data

"""Strict checks of a checkpoint's weight files: no weight of a loaded model comes from random
initialisation.

transformers fills a weight the checkpoint lacks (or holds in another shape, when asked to ignore
sizes) with random values and only logs a warning; a model pruned from it would be silently,
partly random. Every load refuses that instead, in one line naming the first keys.

The check is a plain comparison, :func:`weight_problems`, of two name -> shape tables: what the
model needs (:func:`expected_weights`, from a meta-device skeleton: no memory, no weights) and
what the files hold (:func:`read_headers`: the safetensors headers, validated by the safetensors
library, with the checkpoint's names mapped to the model's by transformers' own conversion rules in
:func:`stored_weights`). It reads no tensor data, so it runs before the weights are loaded, and a
loader that reads a checkpoint block by block can run the same check on the same two tables.
:func:`loading_problems` turns the loading info of ``from_pretrained`` into the same record, as the
final guarantee for what the header check cannot model (a converter that splits or merges tensors).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError

#: The files a safetensors checkpoint is made of: one file, or shards listed by an index.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: How many keys an error message names (the rest are counted).
KEYS_NAMED = 3

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    shape: Shape
    dtype: str
    file: str


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the index's shards, or ``model.safetensors``),
    each checked to exist; a malformed or dangling index is a one-line :class:`CheckpointError`."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _weight_map(index)
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard {absent[0]}, which is not in {folder}"
                                  f"{_more(absent)}: download the missing shards again")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}: pass a checkpoint saved as safetensors "
                          "(save_pretrained writes one)")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{index} is not a readable safetensors index ({type(error).__name__}): download "
                              "it again") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index} has no "weight_map" of tensor names to shard files: download it again')
    return weight_map


def read_headers(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor the checkpoint's safetensors files hold, by its name in the files, from the
    headers alone. A file that is empty, truncated or has a malformed header, and a tensor the index
    places in a shard that lacks it, are a one-line :class:`CheckpointError` naming the file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = weight_files(folder)
    stored: dict[str, StoredTensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    part = handle.get_slice(name)
                    stored[name] = StoredTensor(tuple(part.get_shape()), str(part.get_dtype()), file.name)
        except SafetensorError as error:
            raise CheckpointError(f"weight file {file} is damaged ({_damage(error, file)}): download or save the "
                                  "checkpoint again") from None
        except OSError as error:
            raise CheckpointError(f"cannot read weight file {file}: {error.strerror or error}: check the file "
                                  "and its permissions") from None
    index = folder / INDEX_FILE
    if index.is_file():
        lost = sorted(name for name, shard in _weight_map(index).items() if name not in stored
                      or stored[name].file != shard)
        if lost:
            raise CheckpointError(f"{index} places {lost[0]} in shard {_weight_map(index)[lost[0]]}, which does not "
                                  f"hold it{_more(lost)}: download the checkpoint again")
    return stored


def _damage(error: Exception, file: Path) -> str:
    """What the safetensors library found wrong, in plain words."""
    size = file.stat().st_size
    if size == 0:
        return "the file is empty"
    reason = str(error).split("deserializing header:", 1)[-1].strip()
    if "not fully covered" in reason or "incomplete" in reason:
        return f"truncated: {size} bytes, fewer than its header declares"
    return f"{reason}; {size} bytes"


@dataclass
class WeightProblems:
    """What keeps a checkpoint from filling its model exactly (names are the model's)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # (name, stored, expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def message(self, folder: Path) -> str:
        """One line naming the first few keys of each kind and what to do."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} weights the model needs are missing ({_named(self.missing)})")
        if self.mismatched:
            shapes = [f"{name} {list(stored)} where the config needs {list(expected)}"
                      for name, stored, expected in self.mismatched]
            parts.append(f"{len(self.mismatched)} have the wrong shape ({_named(shapes)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} stored weights belong to no part of the model "
                         f"({_named(self.unexpected)})")
        return (f"the checkpoint in {folder} does not match its config.json: {'; '.join(parts)}; loading it would "
                "fill the gaps with random values: use a complete checkpoint whose config.json matches its weights")

    def raise_if_any(self, folder: Path) -> None:
        if self:
            raise CheckpointError(self.message(folder))


def _named(items: list[str]) -> str:
    return ", ".join(items[:KEYS_NAMED]) + (f" and {len(items) - KEYS_NAMED} more" if len(items) > KEYS_NAMED else "")


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _ignored(patterns: Iterable[str]) -> re.Pattern[str] | None:
    patterns = list(patterns)
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


@dataclass(frozen=True)
class ExpectedWeights:
    """What a model needs from its checkpoint: every state-dict entry's shape, the tied pairs (either
    side may be stored) and transformers' patterns of keys a checkpoint may lack or hold in excess."""

    shapes: dict[str, Shape]
    tied: dict[str, str]  # target -> source
    ignore_missing: tuple[str, ...] = ()
    ignore_unexpected: tuple[str, ...] = ()


def expected_weights(skeleton: nn.Module) -> ExpectedWeights:
    """The weights ``skeleton`` (a model built on the meta device) needs, with the exceptions its
    class declares; as transformers applies them on load (old per-layer ``rotary_emb.inv_freq`` and
    ``position_ids`` buffers are tolerated when the model has such buffers)."""
    shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    unexpected = set(getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in skeleton.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        unexpected.add(r"(^|\.)position_ids$")
    return ExpectedWeights(shapes, dict(getattr(skeleton, "all_tied_weights_keys", None) or {}),
                           tuple(sorted(getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or ())),
                           tuple(sorted(unexpected)))


def stored_weights(skeleton: nn.Module, stored: Mapping[str, StoredTensor]) -> dict[str, Shape] | None:
    """The stored tensors under the model's names (transformers' renaming rules for the model, e.g.
    ``language_model.model.layers.0...`` -> ``model.language_model.layers.0...``, and its
    base-model prefix handling). ``None`` when a stored tensor goes through a converter that splits or
    merges tensors (fused projections, stacked experts): names and shapes then differ by design,
    and only the load itself can tell what is missing."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None)
    renamed: dict[str, Shape] = {}
    for name in sorted(stored):
        target, converter = rename_source_key(name, renamings, converters, prefix, meta)
        if converter is not None:
            return None
        if target not in meta and name in meta:  # as transformers does: a key already in the model's form
            target, _ = rename_source_key(name, [], [], prefix, meta)
        renamed[target] = stored[name].shape
    return renamed


def weight_problems(expected: ExpectedWeights, stored: Mapping[str, Shape]) -> WeightProblems:
    """Compare what the model needs with what is stored (both under the model's names): the
    missing weights (a tied pair counts as present when either side is stored), the stored ones no
    part of the model takes, and those of another shape."""
    ignore_missing, ignore_unexpected = _ignored(expected.ignore_missing), _ignored(expected.ignore_unexpected)
    partner = {**expected.tied, **{source: target for target, source in expected.tied.items()}}
    missing = [name for name in expected.shapes if name not in stored
               and partner.get(name) not in stored
               and not (ignore_missing and ignore_missing.search(name))]
    unexpected = [name for name in stored if name not in expected.shapes
                  and not (ignore_unexpected and ignore_unexpected.search(name))]
    mismatched = [(name, tuple(shape), expected.shapes[name]) for name, shape in stored.items()
                  if name in expected.shapes and tuple(shape) != expected.shapes[name]]
    return WeightProblems(sorted(missing), sorted(unexpected), sorted(mismatched))


def check_checkpoint(folder: Path, skeleton: nn.Module | None) -> None:
    """Refuse a checkpoint whose weight files are damaged or do not fill ``skeleton`` exactly,
    from the headers alone (no tensor is read). With no skeleton (a model the meta device cannot
    build) only the files are checked."""
    stored = read_headers(folder)
    if skeleton is None:
        return
    renamed = stored_weights(skeleton, stored)
    if renamed is not None:
        weight_problems(expected_weights(skeleton), renamed).raise_if_any(Path(folder))


def loading_problems(info: Mapping[str, Any]) -> WeightProblems:
    """The same record from ``from_pretrained(..., output_loading_info=True)``'s info (loaded with
    ``ignore_mismatched_sizes=True``, so that shape mismatches are listed instead of raised)."""
    mismatched = [(name, tuple(stored), tuple(expected)) for name, stored, expected in info.get("mismatched_keys", ())]
    return WeightProblems(sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ())),
                          sorted(mismatched))

"""A family resolved against one loaded model: its blocks, token ids, linear roles and inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .families import FAMILIES, GENERIC, Family, family_for, supported_families


def get_path(root: nn.Module, path: str) -> Any:
    """``root.a.b.c`` for ``path`` "a.b.c", or None where an attribute is missing."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _config_ids(config: Any, fields: tuple[str, ...]) -> list[int]:
    for name in fields:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            return [value]
    return []


@dataclass(frozen=True)
class ModelLayout:
    """A family resolved against one loaded model."""

    family: Family
    block_path: str
    image_token_ids: tuple[int, ...]
    video_token_ids: tuple[int, ...]

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return self.image_token_ids + self.video_token_ids

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.block_path)

    def base_model(self, model: nn.Module) -> nn.Module:
        """The model without its LM head (the family's ``base_model_path``; the model itself when absent)."""
        base = get_path(model, self.family.base_model_path)
        return base if isinstance(base, nn.Module) else model

    def block_linears(self, block: nn.Module, roles: tuple[str, ...]) -> dict[str, nn.Linear]:
        """The linears of ``block`` carrying any of ``roles``, by their name inside the block."""
        leaves = set(self.family.leaves_with(roles))
        return {name: module for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and name.rpartition(".")[2] in leaves}

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of visual (image or video placeholder) tokens, same shape as ``input_ids``."""
        ids = torch.tensor(self.visual_token_ids, device=input_ids.device, dtype=input_ids.dtype)
        return torch.isin(input_ids, ids)

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token types as the family's forward reads them: 0 text, 1 image, 2 video."""
        types = torch.zeros_like(input_ids)
        if self.image_token_ids:
            types[torch.isin(input_ids, torch.tensor(self.image_token_ids, device=input_ids.device))] = 1
        if self.video_token_ids:
            types[torch.isin(input_ids, torch.tensor(self.video_token_ids, device=input_ids.device))] = 2
        return types

    def prepare_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the inputs the family's forward needs but a processor may omit."""
        prepared = dict(inputs)
        key = self.family.token_type_input
        if key and key not in prepared and "input_ids" in prepared:
            prepared[key] = self.token_types(prepared["input_ids"])
        return prepared


def context_length(config: Any) -> int | None:
    """The positions the language model was trained on (its text config's
    ``max_position_embeddings``), or None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def no_video_reason(config: Any) -> str | None:
    """Why a model with this ``config`` cannot take video calibration (its family takes no video,
    or its config declares no video token id), or None when it can."""
    model_type = getattr(config, "model_type", None)
    family = family_for(str(model_type))
    if family is None or not family.takes_video:
        video_families = ", ".join(f.name for f in FAMILIES.values() if f.takes_video)
        return f"model type '{model_type}' takes no video (video families: {video_families})"
    if not _config_ids(config, family.video_token_fields):
        return (f"the config of this {model_type} model declares no video token id "
                f"({' or '.join(family.video_token_fields)})")
    return None


def resolve(model: nn.Module) -> ModelLayout:
    """Resolve the family of a loaded model, or raise :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    family = family_for(model_type) or GENERIC
    block_path = next((p for p in family.block_paths if isinstance(get_path(model, p), nn.ModuleList)), None)
    image_ids = _config_ids(config, family.image_token_fields)
    if block_path is None or not image_ids:
        missing = "decoder blocks" if block_path is None else "an image token id in its config"
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported (found no {missing}); "
            f"supported families: {supported_families()}"
        )
    video_ids = [i for i in _config_ids(config, family.video_token_fields) if i not in image_ids]
    return ModelLayout(family, block_path, tuple(image_ids), tuple(video_ids))

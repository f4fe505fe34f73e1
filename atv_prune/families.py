"""The one place that knows each vision-language model family.

A :class:`Family` is a declarative record: where the language-model decoder blocks live,
which config fields hold the image/video placeholder token ids, where the vision tower and
projector are, and which extra input the forward needs. Adding a family is one entry in
``FAMILIES``. Models of an unregistered family that follow the common transformers layout
are handled by :data:`GENERIC`; anything else is refused with one line naming the
supported families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .errors import UnsupportedModelError

#: Attribute paths, relative to the top-level model, tried for unregistered families.
COMMON_BLOCK_PATHS: tuple[str, ...] = (
    "model.language_model.layers",
    "model.text_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
)
COMMON_VISION_PATHS: tuple[str, ...] = (
    "model.vision_tower",
    "model.visual",
    "model.vision_model",
    "model.multi_modal_projector",
    "model.connector",
    "vision_tower",
    "multi_modal_projector",
)


@dataclass(frozen=True)
class Family:
    """Where one VLM family keeps its parts and how its tokens are marked."""

    name: str
    model_types: tuple[str, ...]
    block_paths: tuple[str, ...] = ("model.language_model.layers",)
    vision_paths: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector")
    image_token_fields: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_fields: tuple[str, ...] = ("video_token_id", "video_token_index")
    #: Name of a per-token type input (0 text, 1 image, 2 video) the forward requires but
    #: some processors do not return; built from the input ids when absent.
    token_type_input: str | None = None
    notes: str = ""


FAMILIES: tuple[Family, ...] = (
    Family("llava", ("llava",), notes="CLIP/SigLIP tower + MLP projector; <image> x patches"),
    Family(
        "llava_next",
        ("llava_next",),
        vision_paths=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
        notes="anyres tiling: the image-token count depends on image_sizes",
    ),
    Family(
        "llava_onevision",
        ("llava_onevision",),
        vision_paths=("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
        notes="SigLIP + Qwen2 decoder; image and video tokens",
    ),
    Family("qwen2_vl", ("qwen2_vl",), vision_paths=("model.visual",), token_type_input="mm_token_type_ids",
           notes="3-D M-RoPE; image_grid_thw"),
    Family("qwen2_5_vl", ("qwen2_5_vl",), vision_paths=("model.visual",), token_type_input="mm_token_type_ids",
           notes="3-D M-RoPE; windowed vision attention"),
    Family("qwen3_vl", ("qwen3_vl",), vision_paths=("model.visual",), token_type_input="mm_token_type_ids",
           notes="deepstack: visual features added after the first blocks"),
    Family("gemma3", ("gemma3",), notes="sliding/full attention alternate; bidirectional image attention"),
    Family(
        "idefics3",
        ("idefics3", "smolvlm"),
        block_paths=("model.text_model.layers",),
        vision_paths=("model.vision_model", "model.connector"),
        notes="Idefics3 and SmolVLM: image split into tiles plus a global image",
    ),
)

GENERIC = Family("generic", (), block_paths=COMMON_BLOCK_PATHS, vision_paths=COMMON_VISION_PATHS,
                 notes="unregistered family following the common transformers layout")


def supported_families() -> str:
    """Comma-separated model_type values the registry knows, for error messages."""
    return ", ".join(t for fam in FAMILIES for t in fam.model_types)


def _get_path(root: nn.Module, path: str) -> Any:
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
        return _get_path(model, self.block_path)

    def vision_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The vision tower / projector modules present in this model, by path."""
        found = {}
        for path in self.family.vision_paths:
            module = _get_path(model, path)
            if isinstance(module, (nn.Module, nn.Parameter)):
                found[path] = module
        return found

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of visual (image or video placeholder) tokens, same shape as ``input_ids``."""
        ids = torch.tensor(self.visual_token_ids, device=input_ids.device, dtype=input_ids.dtype)
        return torch.isin(input_ids, ids)

    def prepare_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the inputs the family's forward needs but a processor may omit."""
        prepared = dict(inputs)
        key = self.family.token_type_input
        if key and key not in prepared and "input_ids" in prepared:
            ids = prepared["input_ids"]
            types = torch.zeros_like(ids)
            if self.image_token_ids:
                types[torch.isin(ids, torch.tensor(self.image_token_ids, device=ids.device))] = 1
            if self.video_token_ids:
                types[torch.isin(ids, torch.tensor(self.video_token_ids, device=ids.device))] = 2
            prepared[key] = types
        return prepared


def family_for(model_type: str) -> Family | None:
    """The registered family for a config ``model_type``, or None."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


def resolve(model: nn.Module) -> ModelLayout:
    """Resolve the family of a loaded model, or raise :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    family = family_for(model_type) or GENERIC
    block_path = next(
        (p for p in family.block_paths if isinstance(_get_path(model, p), nn.ModuleList)), None
    )
    image_ids = _config_ids(config, family.image_token_fields)
    if block_path is None or not image_ids:
        missing = "decoder blocks" if block_path is None else "an image token id in its config"
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported (found no {missing}); "
            f"supported families: {supported_families()}"
        )
    video_ids = [i for i in _config_ids(config, family.video_token_fields) if i not in image_ids]
    return ModelLayout(family, block_path, tuple(image_ids), tuple(video_ids))

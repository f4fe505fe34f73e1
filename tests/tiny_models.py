"""Tiny, randomly initialised vision-language models of every supported family, and inputs for them.

Each model is the real ``*ForConditionalGeneration`` class of its family, built from a small config
(2-4 decoder blocks, hidden size 32, vocabulary 256, a 2-layer vision tower of width 32), so a forward
takes a few milliseconds on one CPU thread. :func:`make_inputs` builds, without any processor, the
token sequence and pixel inputs each family's forward expects.

Token-id layout shared by every family (vocabulary of 256):

* 0, 1, 2: pad, bos and eos;
* ``[3, 200)``: ordinary text tokens, the only ids :func:`make_inputs` draws at random;
* ``[200, 256)``: structural ids (image/video placeholders, vision start/end, Idefics3 row/column and
  wrapper tokens, newline), never drawn as text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

from atv_prune.model.capture import CapturedSample, capture_sample, next_input, non_block_modules_on, run_block
from atv_prune.model.layout import resolve

FAMILY_NAMES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "idefics3",
    "smolvlm",
)

VOCAB_SIZE = 256
TEXT_ID_RANGE = (3, 200)
HIDDEN = 32
IMAGE_ID = 250
VIDEO_ID = 251
START_ID = 252  # Qwen vision_start, Gemma3 begin-of-image, Idefics3 <fake_token_around_image>
END_ID = 253  # Qwen vision_end, Gemma3 end-of-image, Idefics3 <global-img>
NEWLINE_ID = 254  # Idefics3 "\n" between tile rows
ROW_COL_BASE = 200  # Idefics3 <row_{r}_col_{c}> is ROW_COL_BASE + 6 * (r - 1) + (c - 1)

TILE = 24  # LLaVA-NeXT / OneVision / Idefics3 tile side in pixels
QWEN_GRID_THW = (1, 8, 12)  # Qwen image grid in patches: 96 patches -> 24 tokens after the 2x2 merge

_TEXT_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_VISION_COMMON: dict[str, Any] = dict(
    hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)


def _llava_config() -> transformers.LlavaConfig:
    return transformers.LlavaConfig(
        text_config=dict(model_type="llama", num_hidden_layers=2, **_TEXT_COMMON),
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, projection_dim=32,
                           **_VISION_COMMON),
        image_token_index=IMAGE_ID,
        image_seq_length=16,
    )


def _llava_next_config() -> transformers.LlavaNextConfig:
    return transformers.LlavaNextConfig(
        text_config=dict(model_type="llama", num_hidden_layers=2, **_TEXT_COMMON),
        vision_config=dict(model_type="clip_vision_model", image_size=TILE, patch_size=8, projection_dim=32,
                           **_VISION_COMMON),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=[[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]],
        image_seq_length=9,
    )


def _llava_onevision_config() -> transformers.LlavaOnevisionConfig:
    return transformers.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", num_hidden_layers=2, **_TEXT_COMMON),
        vision_config=dict(model_type="siglip_vision_model", image_size=TILE, patch_size=8,
                           vision_use_head=False, **_VISION_COMMON),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]],
    )


def _qwen_text(num_layers: int, mrope_section: list[int], **extra: Any) -> dict[str, Any]:
    head_dim = HIDDEN // _TEXT_COMMON["num_attention_heads"]
    assert sum(mrope_section) * 2 == head_dim
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section, **extra)
    return dict(num_hidden_layers=num_layers, rope_parameters=rope, **_TEXT_COMMON)


_QWEN_IDS: dict[str, int] = dict(
    image_token_id=IMAGE_ID,
    video_token_id=VIDEO_ID,
    vision_start_token_id=START_ID,
    vision_end_token_id=END_ID,
)
_QWEN_VISION: dict[str, Any] = dict(
    num_heads=2, depth=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3
)


def _qwen2_vl_config() -> transformers.Qwen2VLConfig:
    return transformers.Qwen2VLConfig(
        text_config=_qwen_text(2, [2, 3, 3]),
        vision_config=dict(embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, **_QWEN_VISION),
        **_QWEN_IDS,
    )


def _qwen2_5_vl_config() -> transformers.Qwen2_5_VLConfig:
    return transformers.Qwen2_5_VLConfig(
        text_config=_qwen_text(2, [2, 3, 3]),
        # window of 16 px = 2x2 merged tokens; block 0 windowed, block 1 full attention
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=64, out_hidden_size=HIDDEN, window_size=16,
                           fullatt_block_indexes=[1], **_QWEN_VISION),
        **_QWEN_IDS,
    )


def _qwen3_vl_config() -> transformers.Qwen3VLConfig:
    return transformers.Qwen3VLConfig(
        text_config=_qwen_text(3, [4, 2, 2], mrope_interleaved=True),
        # deepstack: features of vision blocks 0 and 1 are added after decoder blocks 0 and 1
        vision_config=dict(hidden_size=HIDDEN, intermediate_size=64, out_hidden_size=HIDDEN,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **_QWEN_VISION),
        **_QWEN_IDS,
    )


def _gemma3_config() -> transformers.Gemma3Config:
    text = {**_TEXT_COMMON, "bos_token_id": 2, "eos_token_id": 1}  # Gemma's own convention
    return transformers.Gemma3Config(
        text_config=dict(
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
            **text,
        ),
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=4,
                           vision_use_head=False, **_VISION_COMMON),
        mm_tokens_per_image=16,
        boi_token_index=START_ID,
        eoi_token_index=END_ID,
        image_token_index=IMAGE_ID,
    )


def _idefics3_like_config(config_cls: type[transformers.PreTrainedConfig]) -> transformers.PreTrainedConfig:
    return config_cls(
        text_config=dict(model_type="llama", num_hidden_layers=2, **_TEXT_COMMON),
        vision_config=dict(image_size=TILE, patch_size=4, **_VISION_COMMON),
        image_token_id=IMAGE_ID,
        scale_factor=2,
    )


_ConfigFactory = Callable[[], transformers.PreTrainedConfig]
_BUILDERS: dict[str, tuple[_ConfigFactory, type[transformers.PreTrainedModel]]] = {
    "llava": (_llava_config, transformers.LlavaForConditionalGeneration),
    "llava_next": (_llava_next_config, transformers.LlavaNextForConditionalGeneration),
    "llava_onevision": (_llava_onevision_config, transformers.LlavaOnevisionForConditionalGeneration),
    "qwen2_vl": (_qwen2_vl_config, transformers.Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (_qwen2_5_vl_config, transformers.Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (_qwen3_vl_config, transformers.Qwen3VLForConditionalGeneration),
    "gemma3": (_gemma3_config, transformers.Gemma3ForConditionalGeneration),
    "idefics3": (lambda: _idefics3_like_config(transformers.Idefics3Config),
                 transformers.Idefics3ForConditionalGeneration),
    "smolvlm": (lambda: _idefics3_like_config(transformers.SmolVLMConfig),
                transformers.SmolVLMForConditionalGeneration),
}


def build_tiny_model(name: str, seed: int = 0, text_overrides: dict[str, Any] | None = None
                     ) -> transformers.PreTrainedModel:
    """The family's ``*ForConditionalGeneration`` with seeded random weights, fp32, sdpa, in eval mode.

    ``text_overrides``: decoder-config values to change first (e.g. more key/value heads)."""
    make_config, model_cls = _BUILDERS[name]
    config = make_config()
    for key, value in (text_overrides or {}).items():
        setattr(config.get_text_config(decoder=True), key, value)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if name == "gemma3":
        # Gemma3 initialises its projector to zeros, which would make every image token identical.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        nn.init.normal_(projection, std=config.initializer_range)
    return model.eval()


def visual_token_ids(model: transformers.PreTrainedModel) -> tuple[int, ...]:
    """The image (and, where the family has one, video) placeholder ids from ``model.config``."""
    ids = (getattr(model.config, field, None) for field in ("image_token_id", "video_token_id"))
    return tuple(i for i in ids if isinstance(i, int))


_ImageInputs = tuple[list[int], dict[str, torch.Tensor]]


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _ids(*parts: int | list[int]) -> list[int]:
    out: list[int] = []
    for part in parts:
        out.extend(part if isinstance(part, list) else [part])
    return out


def _llava_image(config: Any, gen: torch.Generator) -> _ImageInputs:
    """``<image>`` x patches (CLS dropped by the "default" feature strategy)."""
    vision = config.vision_config
    n_tokens = (vision.image_size // vision.patch_size) ** 2
    return [IMAGE_ID] * n_tokens, {"pixel_values": _pixels(gen, 1, 3, vision.image_size, vision.image_size)}


def _anyres_image(config: Any, gen: torch.Generator) -> _ImageInputs:
    """LLaVA-NeXT / OneVision anyres: a base tile plus a grid of tiles, one newline per grid row.

    The image size is the first grid pinpoint exactly, so nothing is unpadded and (OneVision) the
    grid is far below ``anyres_max_9``, so nothing is interpolated either.
    """
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    height, width = config.image_grid_pinpoints[0]
    rows, cols = height // tile, width // tile
    n_tokens = side * side + rows * side * (cols * side + 1)
    return [IMAGE_ID] * n_tokens, {
        "pixel_values": _pixels(gen, 1, 1 + rows * cols, 3, tile, tile),
        "image_sizes": torch.tensor([[height, width]]),
    }


def _qwen_image(config: Any, gen: torch.Generator) -> _ImageInputs:
    """``<vision_start> <image_pad> x (t*h*w / merge^2) <vision_end>`` with flattened patches."""
    vision = config.vision_config
    t, h, w = QWEN_GRID_THW
    n_tokens = t * h * w // vision.spatial_merge_size**2
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return _ids(START_ID, [IMAGE_ID] * n_tokens, END_ID), {
        "pixel_values": _pixels(gen, t * h * w, patch_dim),
        "image_grid_thw": torch.tensor([QWEN_GRID_THW]),
    }


def _gemma3_image(config: Any, gen: torch.Generator) -> _ImageInputs:
    """``<start_of_image> <image_soft_token> x mm_tokens_per_image <end_of_image>``."""
    size = config.vision_config.image_size
    return _ids(START_ID, [IMAGE_ID] * config.mm_tokens_per_image, END_ID), {
        "pixel_values": _pixels(gen, 1, 3, size, size)
    }


def _idefics3_image(config: Any, gen: torch.Generator) -> _ImageInputs:
    """A 1x2 grid of tiles plus the global image, laid out as the Idefics3/SmolVLM processor does."""
    tile = config.vision_config.image_size
    seq_len = (tile // config.vision_config.patch_size) ** 2 // config.scale_factor**2
    rows, cols = 1, 2
    ids: list[int] = []
    for r in range(rows):
        for c in range(cols):
            ids += _ids(START_ID, ROW_COL_BASE + 6 * r + c, [IMAGE_ID] * seq_len)
        ids.append(NEWLINE_ID)
    ids += _ids(NEWLINE_ID, START_ID, END_ID, [IMAGE_ID] * seq_len, START_ID)
    n_tiles = rows * cols + 1
    return ids, {
        "pixel_values": _pixels(gen, 1, n_tiles, 3, tile, tile),
        "pixel_attention_mask": torch.ones(1, n_tiles, tile, tile, dtype=torch.bool),
    }


_IMAGE_INPUTS: dict[str, Callable[[Any, torch.Generator], _ImageInputs]] = {
    "llava": _llava_image,
    "llava_next": _anyres_image,
    "llava_onevision": _anyres_image,
    "qwen2_vl": _qwen_image,
    "qwen2_5_vl": _qwen_image,
    "qwen3_vl": _qwen_image,
    "gemma3": _gemma3_image,
    "idefics3": _idefics3_image,
    "smolvlm": _idefics3_image,
}

def token_type_input(model: transformers.PreTrainedModel) -> str | None:
    """The per-token type input the model's family record says its forward reads (None: none)."""
    return resolve(model).family.token_type_input


def make_inputs(
    model: transformers.PreTrainedModel, name: str, seed: int = 0, n_text: int = 12, with_image: bool = True
) -> dict[str, torch.Tensor]:
    """Forward-ready batch-1 inputs: seeded random text ids, and when ``with_image`` one image.

    The image block is inserted after the first quarter of the text tokens. Every input the family's
    forward needs is included (``image_sizes``, ``image_grid_thw``, token types, pixel attention mask).
    """
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(*TEXT_ID_RANGE, (n_text,), generator=gen).tolist()
    extras: dict[str, torch.Tensor] = {}
    if with_image:
        image_ids, extras = _IMAGE_INPUTS[name](model.config, gen)
        split = n_text // 4
        text = text[:split] + image_ids + text[split:]
    input_ids = torch.tensor([text])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    layout = resolve(model)
    if layout.family.token_type_input:  # 1 on image placeholders, 0 elsewhere (no video is ever built)
        inputs[layout.family.token_type_input] = layout.token_types(input_ids)
    return {**inputs, **extras}


@torch.no_grad()
def assert_replay_matches_forward(
    model: transformers.PreTrainedModel, inputs: dict[str, torch.Tensor], label: str, tolerance: float = 1e-5
) -> CapturedSample:
    """Capture ``inputs`` once, replay every block from it, and check each block's output against the
    model's own forward (hooked on every block) to within ``tolerance``; returns the captured sample."""
    blocks = resolve(model).blocks(model)
    recorded: list[Any] = []
    hooks = [block.register_forward_hook(lambda m, a, k, out, sink=recorded: sink.append(out), with_kwargs=True)
             for block in blocks]
    try:
        model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    with non_block_modules_on(model, blocks, "cpu"):
        sample = capture_sample(model, resolve(model), inputs, "s", "cpu", "cpu")
    hidden = sample.hidden
    for index, block in enumerate(blocks):
        output = run_block(block, sample, index, hidden)
        expected = recorded[index][0] if isinstance(recorded[index], tuple) else recorded[index]
        assert (output - expected).abs().max().item() <= tolerance, f"{label} block {index}"
        hidden = next_input(sample, index, output)
    return sample

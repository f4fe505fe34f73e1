"""Tiny, random-initialised VLM checkpoints and calibration files, built locally for tests.

Each checkpoint folder is what a user would download: ``config.json`` + weights of the real
model class, and the real processor class (a locally trained byte-level BPE tokenizer, a PIL
image processor with tiny images, a chat template). No hub access and no torchvision needed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Families :func:`make_checkpoint` can build.
FAMILIES = ("llava", "llava_next", "qwen2_vl", "idefics3", "llava_onevision", "qwen2_5_vl", "qwen3_vl",
            "llava_next_video")
#: The families among them that take video (their processor gets the torch-only video processor).
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video")

_CORPUS = (
    "What is shown in this image? Describe the picture in detail.",
    "The image shows a red square and a blue circle on a white background.",
    "There is a green triangle next to a yellow line. The shapes are simple.",
    "Is there a circle? Yes, there is one circle in the middle of the picture.",
    "Count the objects. There are three objects: a square, a circle and a line.",
    "USER: ASSISTANT: user assistant system You are a helpful assistant.",
)

# Minimal chat templates in each family's style: the user turn holds the image marker.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tokenizer(special: list[str], chat_template: str, **roles: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a fixed corpus (deterministic, covers any text, no unknowns)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, **roles)


def _llama_text_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}


def _llava_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        _LLAVA_TEMPLATE,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _save_llava(dest: Path) -> None:
    """LLaVA-1.5 layout: CLIP 32 px / patch 8 (16 patches, CLS dropped) -> 16 ``<image>`` tokens."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _llava_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=dict(_CLIP_VISION),
        text_config=_llama_text_config(len(tokenizer), ids("<pad>"), ids("<s>"), ids("</s>")),
        image_token_index=ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(dest)
    processor.save_pretrained(dest)


def _save_llava_next(dest: Path) -> None:
    """LLaVA-NeXT anyres: base 32 px tile plus 32x64 / 64x32 / 64x64 grids and image_newline."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = _llava_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=dict(_CLIP_VISION),
        text_config=_llama_text_config(len(tokenizer), ids("<pad>"), ids("<s>"), ids("</s>")),
        image_token_index=ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    LlavaNextForConditionalGeneration(config).save_pretrained(dest)
    processor.save_pretrained(dest)


def _save_llava_next_video(dest: Path) -> None:
    """LLaVA-NeXT-Video: the LLaVA-NeXT layout above for images; video frames CLIP-preprocessed to
    32x32 (shorter side, centre crop), 16 patches pooled 2x2 -> 4 ``<video>`` tokens per frame."""
    from transformers import (
        LlavaNextImageProcessorPil,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
    )

    from atv_prune.model.processors import without_video
    from atv_prune.model.video_processors import ClipVideoProcessor

    tokenizer = _tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"],
        _LLAVA_TEMPLATE,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = without_video(LlavaNextVideoProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE,
    )
    processor.video_processor = ClipVideoProcessor({"size": {"shortest_edge": 32},
                                                    "crop_size": {"height": 32, "width": 32}})
    config = LlavaNextVideoConfig(
        vision_config=dict(_CLIP_VISION),
        text_config=_llama_text_config(len(tokenizer), ids("<pad>"), ids("<s>"), ids("</s>")),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
        video_seq_length=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        spatial_pool_stride=2,
        spatial_pool_mode="average",
    )
    LlavaNextVideoForConditionalGeneration(config).save_pretrained(dest)
    processor.save_pretrained(dest)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    return _tokenizer(
        special,
        _QWEN_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _save_qwen(dest: Path, family: str) -> None:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: patch 4, merge 2, 256..1024 pixels -> at most 16 visual tokens
    per image or frame pair; the torch-only video processor with the image processor's settings."""
    import transformers

    from atv_prune.model.processors import without_video
    from atv_prune.model.video_processors import VIDEO_PROCESSORS

    names = {"qwen2_vl": ("Qwen2VL", "qwen2_vl"), "qwen2_5_vl": ("Qwen2_5_VL", "qwen2_vl"),
             "qwen3_vl": ("Qwen3VL", "qwen3_vl")}
    prefix, video_kind = names[family]
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    processor = without_video(getattr(transformers, f"{prefix}Processor"))(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE
    )
    processor.video_processor = VIDEO_PROCESSORS[video_kind](
        {**image_processor.to_dict(), "size": {"shortest_edge": 16 * 16, "longest_edge": 32 * 32 * 2}})
    # head_dim 16: the three M-RoPE sections cover head_dim / 2 frequencies.
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2] if family == "qwen3_vl" else [2, 3, 3]}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3 if family == "qwen3_vl" else 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 1024, "rope_parameters": rope,
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>")}
    vision = {"depth": 2, "num_heads": 2, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "hidden_size": 32, "in_channels": 3}
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
    else:  # deepstack: features of vision blocks 0 and 1 are added after decoder blocks 0 and 1
        vision.update(intermediate_size=64, out_hidden_size=32, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    getattr(transformers, f"{prefix}ForConditionalGeneration")(config).save_pretrained(dest)
    processor.save_pretrained(dest)


def _save_llava_onevision(dest: Path) -> None:
    """LLaVA-OneVision: SigLIP 32 px / patch 8 (16 patches, all kept), anyres up to 64x64, Qwen2
    decoder; video frames 32x32, pooled 2x2 -> 4 ``<video>`` tokens per frame plus one newline."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    from atv_prune.model.processors import without_video
    from atv_prune.model.video_processors import OnevisionVideoProcessor

    tokenizer = _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        _LLAVA_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                      image_grid_pinpoints=pinpoints)
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        vision_feature_select_strategy="full", chat_template=_LLAVA_TEMPLATE,
    )
    processor.video_processor = OnevisionVideoProcessor({"size": {"height": 32, "width": 32}})
    text = _llama_text_config(len(tokenizer), ids("<|endoftext|>"), ids("<|endoftext|>"), ids("<|im_end|>"))
    config = LlavaOnevisionConfig(
        text_config={**text, "model_type": "qwen2"},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "vision_use_head": False},
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(dest)
    processor.save_pretrained(dest)


def _save_idefics3(dest: Path) -> None:
    """Idefics3: 32 px tiles, patch 8, pixel shuffle 2 -> 4 ``<image>`` per tile; <= 2x2 tiles + global."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tags = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>", *tags]
    tokenizer = _tokenizer(
        special,
        _IDEFICS3_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
    )
    ids = tokenizer.convert_tokens_to_ids
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config=_llama_text_config(len(tokenizer), ids("<|endoftext|>"), ids("<|im_start|>"),
                                       ids("<end_of_utterance>")),
        image_token_id=ids("<image>"),
        scale_factor=2,
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(dest)
    processor.save_pretrained(dest)


_BUILDERS = {
    "llava": _save_llava,
    "llava_next": _save_llava_next,
    "qwen2_vl": lambda dest: _save_qwen(dest, "qwen2_vl"),
    "qwen2_5_vl": lambda dest: _save_qwen(dest, "qwen2_5_vl"),
    "qwen3_vl": lambda dest: _save_qwen(dest, "qwen3_vl"),
    "llava_onevision": _save_llava_onevision,
    "llava_next_video": _save_llava_next_video,
    "idefics3": _save_idefics3,
}


def make_checkpoint(dest: Path, family: str) -> Path:
    """Write a complete tiny checkpoint of ``family`` into ``dest`` and return the folder."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _BUILDERS[family](dest)
    return dest


_QUESTIONS = ("What is shown in this image?", "Describe the picture.", "Count the objects.")
_ANSWERS = ("A red square and a blue circle.", "There is a green triangle next to a line.", "Three objects.")


def _draw_image(rng: random.Random) -> Image.Image:
    """A small RGB image (40-64 px a side) with a few random shapes."""
    size = (rng.randint(40, 64), rng.randint(40, 64))
    image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
        box = (x0, y0, x0 + rng.randint(5, size[0] // 2), y0 + rng.randint(5, size[1] // 2))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def make_calibration_files(dest: Path, n_images: int = 6, seed: int = 0) -> dict:
    """Write PNGs under ``dest/images`` plus a conversation JSON and a JSONL referencing them.

    Returns ``{"root", "images", "json", "jsonl"}``; image paths in the files are relative to
    ``dest``. The JSON has one multi-turn record and one record whose marker is not first.
    """
    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images = []
    for i in range(n_images):
        path = dest / "images" / f"img{i}.png"
        _draw_image(rng).save(path)
        images.append(path)
    rel = [f"images/{p.name}" for p in images]

    records = []
    for i, image in enumerate(rel):
        q, a = _QUESTIONS[i % len(_QUESTIONS)], _ANSWERS[i % len(_ANSWERS)]
        turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if i == 1:
            turns.append({"from": "human", "value": "And the colours?"})
            turns.append({"from": "gpt", "value": "Red and blue."})
        if i == 2:
            turns[0]["value"] = f"{q}\n<image>"
        records.append({"id": f"rec{i}", "image": image, "conversations": turns})
    json_path = dest / "calib.json"
    json_path.write_text(json.dumps(records, indent=1))

    jsonl_path = dest / "calib.jsonl"
    with jsonl_path.open("w") as f:
        for i, image in enumerate(rel):
            row = {"image": image, "text": _ANSWERS[i % len(_ANSWERS)]}
            if i % 2 == 0:
                row["prompt"] = _QUESTIONS[i % len(_QUESTIONS)]
            f.write(json.dumps(row) + "\n")
    return {"root": dest, "images": images, "json": json_path, "jsonl": jsonl_path}


def make_llava_workspace(root: Path) -> dict[str, Path]:
    """A tiny LLaVA checkpoint and a conversation-JSON calibration file under ``root``."""
    calib = make_calibration_files(root / "calib")["json"]
    return {"root": root, "model": make_checkpoint(root / "llava", "llava"), "calib": calib}


def write_clip(folder: Path, n_frames: int = 6, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """A folder of ``n_frames`` PNG frames of one square moving left to right over a plain background."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    background = tuple(rng.randint(0, 255) for _ in range(3))
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    side = min(size) // 3
    for i in range(n_frames):
        frame = Image.new("RGB", size, background)
        x = (size[0] - side) * i // max(1, n_frames - 1)
        ImageDraw.Draw(frame).rectangle((x, size[1] // 3, x + side, size[1] // 3 + side), fill=colour)
        frame.save(folder / f"frame_{i + 1}.png")
    return folder


def make_video_calibration_files(dest: Path, n_clips: int = 3, seed: int = 0) -> dict:
    """Image records plus video records (frame folders under ``dest/videos``) in one conversation
    JSON (``mixed``), and a video-only JSONL (``videos_jsonl``). Returns their paths and ``clips``."""
    dest = Path(dest)
    files = make_calibration_files(dest, n_images=3, seed=seed)
    clips = [write_clip(dest / "videos" / f"clip{i}", n_frames=4 + i, seed=seed + i) for i in range(n_clips)]
    records = json.loads(files["json"].read_text())
    for i, clip in enumerate(clips):
        question = ("What moves in this video?", "Where does the square go?", "<video>\nHow many squares?")[i % 3]
        value = question if "<video>" in question else f"{question}\n<video>"
        records.append({"id": f"clip{i}", "video": f"videos/{clip.name}", "fps": 2,
                        "conversations": [{"from": "human", "value": value},
                                          {"from": "gpt", "value": "A square moves to the right."}]})
    mixed = dest / "mixed.json"
    mixed.write_text(json.dumps(records, indent=1))
    videos_jsonl = dest / "videos.jsonl"
    videos_jsonl.write_text("".join(json.dumps({"video": f"videos/{clip.name}", "prompt": "What moves?",
                                                "text": "A square."}) + "\n" for clip in clips))
    return {**files, "mixed": mixed, "videos_jsonl": videos_jsonl, "clips": clips}


def write_mjpeg_avi(path: Path, frames: list[Image.Image], fps: int = 4) -> Path:
    """A minimal Motion-JPEG AVI of ``frames`` (what a camera writes; decoders read it, and Pillow
    encodes its JPEG frames, so tests need no video encoder)."""
    import io
    import struct

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def riff_list(kind: bytes, fourcc: bytes, data: bytes) -> bytes:
        return kind + struct.pack("<I", len(data) + 4) + fourcc + data

    width, height = frames[0].size
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.convert("RGB").save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    avih = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, len(frames), 0, 1, max(map(len, jpegs)), width, height,
                       0, 0, 0, 0)
    strh = struct.pack("<4s4sIHHIIIIIIiI4H", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, len(frames),
                       max(map(len, jpegs)), -1, 0, 0, 0, width, height)
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    header = riff_list(b"LIST", b"hdrl", chunk(b"avih", avih)
                       + riff_list(b"LIST", b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    movi, index, offset = b"", b"", 4
    for jpeg in jpegs:
        data = chunk(b"00dc", jpeg)
        index += struct.pack("<4sIII", b"00dc", 0x10, offset, len(jpeg))
        movi += data
        offset += len(data)
    body = header + riff_list(b"LIST", b"movi", movi) + chunk(b"idx1", index)
    Path(path).write_bytes(riff_list(b"RIFF", b"AVI ", body))
    return Path(path)

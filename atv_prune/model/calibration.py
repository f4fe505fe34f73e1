"""Calibration data: conversation JSON or image-text JSONL -> model inputs.

Each sample is one whole conversation (user turn with its image or video clip, then the
assistant's answer),
rendered by the model's own chat template without a generation prompt and processed by the
model's own processor, as in the paper's protocol. Records are drawn at random with a seed;
every problem with the file, a record, an image or a clip is a one-line :class:`CalibrationError`
raised before any sample is returned. A record's ``"video"`` (a folder of frames, an animated
image or a video file: :mod:`.videos`) is sampled by a :class:`~atv_prune.model.videos.VideoSampling`
and goes where its ``<video>`` marker stands; image and video records mix freely in one file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from ..errors import CalibrationError, ConfigError, ImageError, not_a_file, one_line
from .chat import IMAGE_MARKER, VIDEO_MARKER, user_content
from .images import open_image
from .videos import MIN_FRAMES, Clip, VideoSampling, read_clip, video_kind

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_CONVERSATION_HINT = (
    'each record needs "conversations": [{"from": "human", "value": "<image>\\n..."}, '
    '{"from": "gpt", "value": "..."}]'
)


@dataclass
class CalibrationSample:
    """One processed image-text pair, ready for the model's forward (batch dimension 1)."""

    inputs: dict[str, torch.Tensor]
    source: str  # where it came from, e.g. "calib.json:17" (record number) for messages
    image: str | None = None  # the image file used, None for a text-only sample
    video: str | None = None  # the clip used (folder or file), None for a sample without video


@dataclass
class CalibrationSet:
    """The samples drawn from a calibration file, with bookkeeping for the report.

    ``max_length``: the longest sample the user allows (tokens), applied by :func:`fit_context`
    once the model's context is known (None: the model's context). ``video``: how the samples'
    clips were drawn (None when no sample has one)."""

    samples: list[CalibrationSample]
    path: str
    records_in_file: int
    seed: int
    warnings: list[str] = field(default_factory=list)
    max_length: int | None = None
    video: VideoSampling | None = None


@dataclass(frozen=True)
class ContextFit:
    """What :func:`fit_context` did: the length limit, and how many samples it truncated (and by
    how many tokens in all) or skipped because their image's tokens end beyond the limit."""

    max_length: int
    truncated: int
    tokens_dropped: int
    skipped: int

    def summary(self) -> dict[str, int]:
        return {"max_length": self.max_length, "truncated_too_long": self.truncated,
                "tokens_truncated": self.tokens_dropped, "skipped_too_long": self.skipped}


@dataclass
class _Record:
    """A parsed record: chat messages (image/video positions marked by items), its image and clip."""

    number: int  # record number (JSON, 1-based) or line number (JSONL)
    where: str  # "record N of FILE" / "line N of FILE", for messages
    messages: list[dict[str, Any]]
    image: str | None
    video: str | None = None
    fps: float | None = None  # frame rate of a frame folder


@dataclass
class _Drawn:
    """A drawn record with its image and clip resolved to paths."""

    record: _Record
    image: Path | None
    video: Path | None


def _fail(message: str) -> CalibrationError:
    """A CalibrationError whose message is one line, whatever the quoted exceptions contain."""
    return CalibrationError(" ".join(message.split()))


def _text_item(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


class _Turn(BaseModel):
    """One turn of a LLaVA/ShareGPT4V conversation (``from``/``value``, or ``role``/``content``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: str = Field(validation_alias=AliasChoices("from", "role"))
    value: str = Field(validation_alias=AliasChoices("value", "content"))

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role: Any) -> str:
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise ValueError("unknown role")
        return _ROLES[role.lower()]


def _one_image(value: Any) -> Any:
    """A record's image (or video): one path, also given as a one-element list."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


_Path = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True)]


class _ConversationRecord(BaseModel):
    """A conversation record: turns, at most one image and at most one video (a clip, with the
    frame rate of a frame folder in ``fps``); extra keys such as ``id`` are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    conversations: list[_Turn] = Field(min_length=1)
    image: _Path | None = None
    video: _Path | None = None
    fps: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    _image = field_validator("image", "video", mode="before")(_one_image)


class _PairRecord(BaseModel):
    """An image-text JSONL row: the text (the answer), an optional prompt, an optional image."""

    model_config = ConfigDict(extra="allow", frozen=True)

    text: str
    prompt: str | None = None
    image: _Path | None = None
    video: _Path | None = None
    fps: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    _image = field_validator("image", "video", mode="before")(_one_image)


def _record_error(error: ValidationError, where: str) -> CalibrationError:
    """What is wrong with a record, in the words of its format, from the validation's first error."""
    location = error.errors(include_url=False)[0]["loc"]
    if location[:1] == ("image",):
        return _fail(f'{where} has an invalid "image" (expected one image path as a string): use one image per record')
    if location[:1] == ("video",):
        return _fail(f'{where} has an invalid "video" (expected one path, of a folder of frames or a video file, '
                     "as a string): use one video per record")
    if location[:1] == ("fps",):
        return _fail(f'{where} has an invalid "fps" (expected the positive frame rate of its frame folder)')
    if location[:1] == ("conversations",) and len(location) > 1:
        return _fail(f'{where}, turn {int(location[1]) + 1}: expected {{"from": "human"|"gpt", "value": "..."}} '
                     f"(roles human/user, gpt/assistant, system): {_CONVERSATION_HINT}")
    if location[:1] == ("conversations",):
        return _fail(f'{where} has no "conversations" list: {_CONVERSATION_HINT}')
    return _fail(f'{where}: expected {{"image": "...", "text": "...", "prompt": "..." (optional)}}: '
                 'add a "text" string to every line')


def _conversation_record(raw: dict, number: int, where: str) -> _Record:
    """A LLaVA/ShareGPT4V record -> chat messages; the image goes to the first user turn with a marker."""
    try:
        record = _ConversationRecord.model_validate(raw)
    except ValidationError as error:
        raise _record_error(error, where) from None
    parsed = [(turn.role, turn.value) for turn in record.conversations]
    users = [i for i, (role, _) in enumerate(parsed) if role == "user"]
    if not users:
        raise _fail(f'{where} has no user turn ("from": "human"): {_CONVERSATION_HINT}')
    image_turn = next((i for i in users if IMAGE_MARKER in parsed[i][1]), users[0])
    video_turn = next((i for i in users if VIDEO_MARKER in parsed[i][1]), users[0])
    messages = []
    for i, (role, text) in enumerate(parsed):
        if role == "user":
            content = user_content(text, [None] if record.image is not None and i == image_turn else [],
                                   [None] if record.video is not None and i == video_turn else [])
        else:
            content = [_text_item(text.replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, "").strip())]
        messages.append({"role": role, "content": content})
    return _Record(number, where, messages, record.image, record.video, record.fps)


def _pair_record(raw: dict, number: int, where: str) -> _Record:
    """An image-text JSONL row -> a user turn (image, optional prompt) and an assistant turn (text)."""
    try:
        record = _PairRecord.model_validate(raw)
    except ValidationError as error:
        raise _record_error(error, where) from None
    user = user_content(record.prompt or "", [None] if record.image is not None else [],
                        [None] if record.video is not None else [])
    answer = [_text_item(record.text.strip())]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return _Record(number, where, messages, record.image, record.video, record.fps)


def _parse_json(text: str, name: str) -> list[_Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"malformed JSON in {name} at line {exc.lineno}, column {exc.colno}: {exc.msg}: "
                    "fix the file (a JSON list of conversation records)") from None
    if not isinstance(data, list):
        raise _fail(f"{name} holds a JSON {type(data).__name__}, not a list of conversation records: "
                    "wrap the records in [...] or write one JSON object per line (JSONL)")
    records = []
    for number, raw in enumerate(data, 1):
        where = f"record {number} of {name}"
        if not isinstance(raw, dict):
            raise _fail(f"{where} is not a JSON object: {_CONVERSATION_HINT}")
        records.append(_conversation_record(raw, number, where))
    return records


def _parse_jsonl(text: str, name: str) -> list[_Record]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = "write one JSON object per line"
            if number == 1 and _whole_json(text) is not None:
                hint = "the file is one JSON document: give a list of conversation records or JSONL"
            raise _fail(f"malformed JSONL in {name} at line {number}, column {exc.colno}: {exc.msg}: "
                        f"{hint}") from None
        where = f"line {number} of {name}"
        if not isinstance(raw, dict):
            raise _fail(f'{where} is not a JSON object: write {{"image": "...", "text": "..."}} per line')
        parse = _conversation_record if "conversations" in raw else _pair_record
        records.append(parse(raw, number, where))
    return records


def _whole_json(text: str) -> Any:
    """The file's content as one JSON document, or None when it is not one (JSONL, malformed)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _one_object(raw: dict, file: Path) -> _Record:
    """A file holding one JSON object: a single record (conversation or image-text pair), or,
    when the object is not a record, a one-line error saying so."""
    where = f"the record in {file.name}"
    if "conversations" in raw:
        return _conversation_record(raw, 1, where)
    if "text" in raw:
        return _pair_record(raw, 1, where)
    keys = ", ".join(f'"{key}"' for key in list(raw)[:4]) + (", ..." if len(raw) > 4 else "")
    raise _fail(f"{file} holds a JSON object ({{{keys}}}), not a list of records: give a JSON list [...] of "
                'conversation records, or JSONL with one {"image", "text"} or {"image", "conversations"} '
                "record per line")


def _read_records(file: Path) -> list[_Record]:
    """Parse the whole file (format from suffix / first character) and check every record's shape."""
    if not file.is_file():
        raise _fail(f"calibration file {file} {not_a_file(file)}: pass an existing .json (conversations) "
                    "or .jsonl (image-text pairs) file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read calibration file {file}: {exc}: pass a UTF-8 JSON or JSONL file") from None
    stripped = text.lstrip()
    if not stripped:
        raise _fail(f"calibration file {file} is empty: give it at least one record")
    if stripped.startswith("{") and isinstance(whole := _whole_json(text), dict):
        records = [_one_object(whole, file)]
    elif file.suffix.lower() == ".jsonl" or not stripped.startswith("["):
        records = _parse_jsonl(text, file.name)
    else:
        records = _parse_json(text, file.name)
    if not records:
        raise _fail(f"calibration file {file} holds no records: give it at least one record")
    return records


def _resolve_video(video: str, root: Path, where: str) -> Path:
    path = Path(video).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise _fail(f"video not found for {where}: {path} (image root {root}): pass --image-root with the folder "
                    "the video paths are relative to")
    return path


def _resolve_image(image: str, root: Path, where: str) -> Path:
    path = Path(image).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        if path.is_dir():
            raise _fail(f"the image of {where} is a folder, not a file: {path}: point the record at an image file")
        raise _fail(f"image not found for {where}: {path} (image root {root}): "
                    "pass --image-root with the folder the image paths are relative to")
    return path


def _open_image(path: Path, max_pixels: int | None) -> Image.Image:
    """Decode an image as 8-bit RGB (:func:`~atv_prune.model.images.open_image`: high bit depths
    scaled, transparency on white), downscaled (aspect kept, LANCZOS) so width*height <= max_pixels."""
    try:
        image = open_image(path)
    except ImageError as error:
        raise _fail(str(error)) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@contextlib.contextmanager
def _pixel_cap(image_processor: Any, max_pixels: int | None) -> Iterator[None]:
    """Temporarily lower a Qwen-style (pixel-count) image processor's maximum to ``max_pixels``.

    Qwen-style processors round sizes to their patch grid, which can overshoot a downscaled image;
    their own maximum is a hard bound. Older versions keep it in ``max_pixels``, newer in
    ``size["longest_edge"]`` (next to ``shortest_edge`` = minimum pixels).
    """
    saved: dict[str, Any] = {}
    qwen_style = hasattr(image_processor, "merge_size") and hasattr(image_processor, "temporal_patch_size")
    if max_pixels is not None and qwen_style:
        old_max = getattr(image_processor, "max_pixels", None)
        if isinstance(old_max, int):
            floor = getattr(image_processor, "min_pixels", None) or 0
            saved["max_pixels"] = old_max
            image_processor.max_pixels = max(floor, min(old_max, max_pixels))
        size = getattr(image_processor, "size", None)
        longest, shortest = _get(size, "longest_edge"), _get(size, "shortest_edge")
        if isinstance(longest, int) and isinstance(shortest, int):
            capped = copy.copy(size)
            value = max(shortest, min(longest, max_pixels))
            if isinstance(capped, dict):
                capped["longest_edge"] = value
            else:
                capped.longest_edge = value
            saved["size"] = size
            image_processor.size = capped
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(image_processor, name, value)


def _has_chat_template(processor: Any) -> bool:
    tokenizer = getattr(processor, "tokenizer", None)
    return bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))


def _plain_text(messages: list[dict[str, Any]], tokens: dict[str, str | None]) -> str:
    """Fallback rendering 'USER: <image>\\n... ASSISTANT: ...' for processors without a chat template
    (``tokens``: the processor's image and video placeholder tokens)."""
    turns = []
    for message in messages:
        parts = [tokens[item["type"]] or "" if item["type"] in tokens else item["text"] for item in message["content"]]
        turns.append(f"{message['role'].upper()}: " + "\n".join(parts))
    return "\n".join(turns)


def _image_token(processor: Any) -> str:
    token = getattr(processor, "image_token", None) or getattr(
        getattr(processor, "tokenizer", None), "image_token", None)
    if not isinstance(token, str):
        raise _fail(f"the {type(processor).__name__} has neither a chat template nor an image token: "
                    "save the model's chat template (chat_template.jinja) with its processor")
    return token


def _draw(path: str | Path, image_root: str | Path | None, samples: int, seed: int, max_pixels: int | None
          ) -> tuple[Path, int, list[_Drawn], list[str]]:
    """Read and check the file, draw ``samples`` records (``random.Random(seed)``) and resolve and
    decode each drawn record's image, and check each drawn clip (every frame of a folder: same
    size, readable header; a file decoded): every problem that does not need the processor."""
    if samples < 1:
        raise _fail(f"samples must be at least 1, got {samples}: pass --samples N with N >= 1")
    if max_pixels is not None and max_pixels < 1:
        raise _fail(f"max_pixels must be positive, got {max_pixels}: pass --max-pixels N with N >= 1")
    file = Path(path)
    records = _read_records(file)
    root = Path(image_root).expanduser() if image_root is not None else file.parent
    if image_root is not None and not root.is_dir():
        raise _fail(f"image root {root} is not a folder: pass --image-root with the images' folder")
    warnings: list[str] = []
    if samples > len(records):
        warnings.append(f"{file.name} holds {len(records)} records, fewer than the {samples} samples "
                        f"asked: using all {len(records)}")
    drawn = []
    for record in random.Random(seed).sample(records, min(samples, len(records))):
        image_path = _resolve_image(record.image, root, record.where) if record.image else None
        if image_path is not None:
            _open_image(image_path, None).close()
        video_path = _resolve_video(record.video, root, record.where) if record.video else None
        if video_path is not None:
            _read_clip(video_path, VideoSampling(max_frames=MIN_FRAMES), record, None)
        drawn.append(_Drawn(record, image_path, video_path))
    return file, len(records), drawn, warnings


def _read_clip(path: Path, sampling: VideoSampling, record: _Record, max_pixels: int | None) -> Clip:
    """The record's clip, sampled, every frame downscaled as :func:`_open_image` downscales images."""
    if record.fps is not None and video_kind(path) != "folder":
        raise _fail(f'{record.where} gives an "fps" for the video file {path}: only a folder of frames takes one '
                    "(a video file carries its own frame rate)")
    try:
        clip = read_clip(path, sampling, record.fps)
    except ImageError as error:
        raise _fail(f"{record.where}: {error}") from None
    width, height = clip.size
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        frames = [Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS) for frame in clip.frames]
        clip = replace(clip, frames=np.stack([np.asarray(frame) for frame in frames]))
    return clip


def _token_aligned(name: str, value: torch.Tensor, length: int) -> bool:
    """Whether an input runs along the token sequence (ids, masks, token types): a (1, seq) tensor
    that is not an image or video input."""
    return (value.ndim == 2 and tuple(value.shape) == (1, length)
            and not name.startswith(("pixel", "image", "video", "second_per_grid")))


def fit_context(calibration: CalibrationSet, context: int | None, visual_ids: Sequence[int]
                ) -> tuple[CalibrationSet, ContextFit | None]:
    """Fit every sample into ``calibration.max_length`` tokens, or the model's ``context``
    (``max_position_embeddings``) when the user set none, so that no statistic comes from
    positions beyond what the model was trained on.

    A longer sample is truncated on the text side: its last tokens are dropped (the end of the
    assistant's answer first, then earlier text), which keeps the image and the start of the user
    turn, the tokens every pool needs. A sample whose image (or video) tokens end beyond the limit cannot be
    cut without splitting the image (its features would no longer match its placeholders) and is
    skipped. Both are counted in the returned :class:`ContextFit` and in a warning. A
    ``max_length`` above ``context`` is a :class:`ConfigError`. Returns the set unchanged, with
    ``None``, when there is no limit at all."""
    check_max_length(calibration.max_length, context)
    limit = calibration.max_length or context
    if limit is None:
        return calibration, None
    kept: list[CalibrationSample] = []
    truncated = dropped = skipped = 0
    ids = torch.tensor(list(visual_ids), dtype=torch.long)
    for sample in calibration.samples:
        input_ids = sample.inputs["input_ids"]
        length = input_ids.shape[-1]
        if length <= limit:
            kept.append(sample)
            continue
        visual = torch.isin(input_ids[0], ids.to(input_ids.dtype)).nonzero()
        if len(visual) and int(visual[-1]) >= limit:
            skipped += 1
            continue
        inputs = {name: value[:, :limit] if _token_aligned(name, value, length) else value
                  for name, value in sample.inputs.items()}
        kept.append(CalibrationSample(inputs, sample.source, sample.image, sample.video))
        truncated += 1
        dropped += length - limit
    where = "--max-length" if calibration.max_length is not None else "the model's context"
    if skipped and not kept:
        raise CalibrationError(f"the image/video tokens of all {skipped} calibration samples end beyond {where} "
                               f"({limit} tokens): raise --max-length (up to the model's context), or lower "
                               "--max-pixels (or --max-frames) so that images (and clips) take fewer tokens")
    warnings = list(calibration.warnings)
    if truncated:
        warnings.append(f"truncated {truncated} calibration samples longer than {where} ({limit} tokens) by "
                        f"{dropped} text tokens in all, from their end")
    if skipped:
        warnings.append(f"skipped {skipped} calibration samples whose image/video tokens end beyond {where} "
                        f"({limit} tokens)")
    fitted = replace(calibration, samples=kept, warnings=warnings)
    return fitted, ContextFit(limit, truncated, dropped, skipped)


def check_max_length(max_length: int | None, context: int | None) -> None:
    """Refuse a ``max_length`` below 1 or beyond the model's ``context`` (a :class:`ConfigError`)."""
    if max_length is not None and max_length < 1:
        raise ConfigError(f"--max-length must be at least 1, got {max_length}")
    if max_length is not None and context is not None and max_length > context:
        raise ConfigError(f"--max-length {max_length} is beyond the model's context ({context} positions, its "
                          f"max_position_embeddings): pass --max-length {context} or less")


def check_calibration_file(path: str | Path, *, image_root: str | Path | None = None, samples: int = 128,
                           seed: int = 0, max_pixels: int | None = None, video_model: str | None = None) -> None:
    """Check, before any model is loaded, what :func:`load_calibration` would read: the file, the
    drawn records, their images and clips; that at least one drawn record has an image or a video
    (the engine needs visual tokens); and, when ``video_model`` says why the model takes no video
    (e.g. "model type 'llava' takes no video"), that no drawn record has one. Raises
    :class:`CalibrationError`."""
    file, _, drawn, _ = _draw(path, image_root, samples, seed, max_pixels)
    if not any(item.image or item.video for item in drawn):
        raise _fail(f"none of the {len(drawn)} records drawn from {file} has an image or a video: the calibration "
                    'needs visual tokens; give records with an "image" or a "video"')
    with_video = next((item for item in drawn if item.video), None)
    if video_model is not None and with_video is not None:
        raise _fail(f"{with_video.record.where} has a video, but {video_model}: remove the video records, "
                    "or calibrate a video model")


def _video_support(processor: Any) -> str | None:
    """Why ``processor`` cannot process clips, or None when it can."""
    name = type(processor).__name__
    if getattr(processor, "video_processor", None) is None:
        return f"the {name} takes no video (it has no video processor)"
    if not isinstance(getattr(processor, "video_token", None), str):
        return f"the {name} has no video token"
    return None


def load_calibration(
    path: str | Path,
    processor: Any,
    *,
    image_root: str | Path | None = None,
    samples: int = 128,
    seed: int = 0,
    max_pixels: int | None = None,
    max_length: int | None = None,
    video: VideoSampling | None = None,
) -> CalibrationSet:
    """Draw ``samples`` records at random (``random.Random(seed)``) and process them for the model.

    ``path``: a LLaVA/ShareGPT4V conversation JSON list, or JSONL with one
    ``{"image", "text", "prompt"?}`` per line; a record may carry a ``"video"`` (a folder of
    frames, with its frame rate in ``"fps"``, or a video file) instead of, or besides, its image.
    Image and video paths are relative to ``image_root`` (default: the file's folder).
    ``max_pixels`` downscales images and video frames before processing, a cap on visual tokens
    for every family. ``video`` draws each clip's frames (default :class:`VideoSampling`: at most
    8, uniformly). Only the drawn records' images and clips are opened. ``max_length`` caps a
    sample's tokens (kept in the set; :func:`fit_context` applies it, with the model's context,
    before the samples are used).
    """
    check_max_length(max_length, None)
    sampling = video or VideoSampling()
    file, records_in_file, drawn, warnings = _draw(path, image_root, samples, seed, max_pixels)
    with_video = next((item for item in drawn if item.video), None)
    if with_video is not None and (why := _video_support(processor)) is not None:
        raise _fail(f"{with_video.record.where} has a video, but {why}: remove the video records, or calibrate "
                    "a video model (atv-prune families lists those that take video)")
    tokens = None if _has_chat_template(processor) else {
        "image": _image_token(processor), "video": getattr(processor, "video_token", None)}
    if tokens is not None:
        warnings.append(f"the {type(processor).__name__} has no chat template: samples rendered as plain "
                        "'USER: ... ASSISTANT: ...' text")
    # Render every drawn record first, so that all errors come before any processing.
    prepared: list[tuple[_Drawn, str]] = []
    for item in drawn:
        if tokens is not None:
            text = _plain_text(item.record.messages, tokens)
        else:
            try:
                text = processor.apply_chat_template(
                    item.record.messages, tokenize=False, add_generation_prompt=False
                )
            except Exception as exc:
                raise _fail(f"the chat template failed on {item.record.where}: {one_line(exc, 200)}: check the "
                            "record's roles and turn order against the model's chat template") from None
        prepared.append((item, text))

    out: list[CalibrationSample] = []
    # Frames are downscaled to max_pixels before processing; the video processor's own budget is left
    # as it is (Qwen3-VL's bounds the whole clip, not one frame).
    with _pixel_cap(getattr(processor, "image_processor", None), max_pixels):
        for item, text in prepared:
            source = f"{file.name}:{item.record.number}"
            kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
            bos = getattr(getattr(processor, "tokenizer", None), "bos_token", None)
            if bos and text.startswith(bos):  # the template wrote BOS already (Llama-3, Gemma): no second one
                kwargs["add_special_tokens"] = False
            if item.image is not None:
                kwargs["images"] = [_open_image(item.image, max_pixels)]
            if item.video is not None:
                clip = _read_clip(item.video, sampling, item.record, max_pixels)
                kwargs.update(videos=[clip.frames], videos_kwargs={
                    "video_metadata": [clip.metadata()], "do_sample_frames": False})
            try:
                encoded = processor(**kwargs)
            except Exception as exc:
                raise _fail(f"the processor failed on {source}: {type(exc).__name__}: {one_line(exc, 200)}: "
                            "check the record and that the processor belongs to the model") from None
            inputs = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
            out.append(CalibrationSample(inputs, source, str(item.image) if item.image else None,
                                         str(item.video) if item.video else None))
    return CalibrationSet(out, str(file), records_in_file, seed, warnings, max_length,
                          sampling if with_video is not None else None)

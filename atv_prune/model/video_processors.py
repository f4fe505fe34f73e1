"""Torch-only video processors, for processors that lose theirs where torchvision is missing.

transformers' video processors (``Qwen2VLVideoProcessor``, ``Qwen3VLVideoProcessor``,
``LlavaOnevisionVideoProcessor``, ``LlavaNextVideoVideoProcessor``) need torchvision, which CPU
installs lack. Each class here
computes the same ``pixel_values_videos`` (and ``video_grid_thw``) from the same settings with
plain torch: the resize is torchvision's own tensor resize (``interpolate`` with antialiasing, on
uint8 frames on the CPU), the rescale and normalisation are fused as transformers fuses them, and
the Qwen patch layout is the same reshape. The multimodal processor keeps its own token
bookkeeping (how many ``<video>`` placeholders a clip takes, Qwen3-VL's frame timestamps): these
classes only stand in for its ``video_processor``. Frames arrive already sampled
(:mod:`.videos`), so none of them samples frames. ``tests/test_video.py`` checks them against
transformers' own classes where torchvision is installed, and against a plain computation always.

A family's record names its kind (:attr:`~atv_prune.model.families.Family.video_processor`);
:data:`VIDEO_PROCESSORS` maps kinds to classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional
from transformers.feature_extraction_utils import BatchFeature

from ..errors import ImageError

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]
#: PIL resample codes -> interpolate modes (transformers maps LANCZOS to bicubic for tensors).
_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic"}


class TorchVideoProcessor:
    """Common part: settings (the checkpoint's, over the class defaults), frames to uint8
    (frames, channels, height, width) tensors, resize, fused rescale and normalisation."""

    #: The transformers class this one stands in for (saved as ``video_processor_type``).
    stands_for: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    model_input_names: ClassVar[list[str]] = ["pixel_values_videos"]

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        given = dict(settings or {})
        size = dict(given.get("size") or self.defaults.get("size") or {})
        for legacy, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if isinstance(given.get(legacy), int) and "shortest_edge" in self.defaults.get("size", {}):
                size[key] = given[legacy]
        for key, value in {**self.defaults, **{k: v for k, v in given.items() if k in self.defaults}}.items():
            setattr(self, key, value)
        self.size = size

    @property
    def settings(self) -> dict[str, Any]:
        """The current settings (attributes, so that a caller may lower ``size`` for a while)."""
        return {key: getattr(self, key) for key in self.defaults}

    def to_dict(self) -> dict[str, Any]:
        """The settings as the stood-in class saves them, so that a loader with torchvision builds it."""
        return {**self.settings, "video_processor_type": self.stands_for}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"

    @staticmethod
    def frames(video: Any) -> torch.Tensor:
        """A clip's frames as a uint8 (frames, 3, height, width) tensor, from (frames, height, width, 3)
        arrays or tensors, or a list of PIL images."""
        if isinstance(video, (list, tuple)):
            video = np.stack([np.asarray(frame.convert("RGB"), dtype=np.uint8) for frame in video])
        tensor = torch.from_numpy(np.ascontiguousarray(video)) if isinstance(video, np.ndarray) else video
        if tensor.ndim != 4 or tensor.shape[-1] != 3 or tensor.dtype != torch.uint8:
            raise ImageError(f"a video must be uint8 frames of shape (frames, height, width, 3), got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        return tensor.permute(0, 3, 1, 2).contiguous()

    def resize(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """torchvision's tensor resize: uint8 in, uint8 out, antialiased; native uint8 kernels on the CPU."""
        if tuple(frames.shape[-2:]) == (height, width):
            return frames
        mode = _MODES.get(int(self.settings.get("resample", 3)), "bicubic")
        antialias = mode != "nearest"
        align = False if mode != "nearest" else None
        if frames.device.type == "cpu" or mode == "nearest":
            return functional.interpolate(frames, size=[height, width], mode=mode, align_corners=align,
                                          antialias=antialias)
        resized = functional.interpolate(frames.float(), size=[height, width], mode=mode, align_corners=align,
                                         antialias=antialias)
        return resized.clamp_(0, 255).round_().to(torch.uint8)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """Rescale (1/255) and normalise with the settings' mean and std, fused as transformers does."""
        s = self.settings
        if s["do_rescale"] and s["do_normalize"]:
            mean = torch.tensor(s["image_mean"]) * (1.0 / s["rescale_factor"])
            std = torch.tensor(s["image_std"]) * (1.0 / s["rescale_factor"])
            return frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        if s["do_normalize"]:
            mean, std = torch.tensor(s["image_mean"]), torch.tensor(s["image_std"])
            return frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        if s["do_rescale"]:
            return frames.to(torch.float32) * s["rescale_factor"]
        return frames.to(torch.float32)

    def process(self, frames: torch.Tensor) -> dict[str, Any]:
        """One clip's model inputs (per-class)."""
        raise NotImplementedError

    def __call__(self, videos: Any, *, video_metadata: Any = None, return_metadata: bool | None = None,
                 return_tensors: Any = None, **_ignored: Any) -> BatchFeature:
        """Process ``videos`` (a clip, or a list of clips) as the stood-in class does with
        ``do_sample_frames=False``; ``video_metadata`` is passed through when ``return_metadata``."""
        clips = [videos] if _is_one_clip(videos) else list(videos)
        outputs = [self.process(self.frames(clip)) for clip in clips]
        data = {key: self.collate(key, [out[key] for out in outputs]) for key in outputs[0]}
        if return_metadata:
            data["video_metadata"] = _metadata(video_metadata, clips)
        return BatchFeature(data=data, tensor_type=None)

    @staticmethod
    def collate(key: str, values: list[Any]) -> torch.Tensor:
        return torch.cat(values) if key == "pixel_values_videos" else torch.tensor(values)


def _is_one_clip(videos: Any) -> bool:
    return isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4


def _metadata(given: Any, clips: Sequence[Any]) -> list[Any]:
    """transformers ``VideoMetadata`` for each clip (from dicts, or the frame count alone)."""
    from transformers.video_utils import VideoMetadata

    given = given if isinstance(given, (list, tuple)) else [given] * len(clips)
    out = []
    for meta, clip in zip(given, clips):
        if isinstance(meta, Mapping):
            meta = VideoMetadata(**meta)
        out.append(meta if meta is not None else VideoMetadata(total_num_frames=len(clip)))
    return out


def _qwen2_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's frame size: sides multiples of ``factor``, area within [min, max] pixels, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"a video's frames are {width}x{height}: Qwen-VL needs an aspect ratio below 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenVideoProcessor(TorchVideoProcessor):
    """Qwen2-VL and Qwen2.5-VL: frames resized to a patch-grid multiple, padded in time to a
    multiple of ``temporal_patch_size`` by repeating the last frame, and cut into flat patches
    ordered as the vision tower's 2x2 merge expects."""

    stands_for = "Qwen2VLVideoProcessor"
    defaults: ClassVar[dict[str, Any]] = {
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "resample": 3,
        "do_resize": True, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255,
        "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "cap_pixels_per_frame": False, "max_video_tokens": 128000,
    }
    model_input_names: ClassVar[list[str]] = ["pixel_values_videos", "video_grid_thw"]

    def target_size(self, frames: torch.Tensor) -> tuple[int, int]:
        s, factor = self.settings, self.settings["patch_size"] * self.settings["merge_size"]
        max_pixels, min_pixels = s["size"]["longest_edge"], s["size"]["shortest_edge"]
        if s.get("cap_pixels_per_frame"):
            total = int(s["max_video_tokens"] * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * s["temporal_patch_size"] // len(frames)), int(min_pixels * 1.05))
        return _qwen2_smart_resize(*frames.shape[-2:], factor, min_pixels, max_pixels)

    def process(self, frames: torch.Tensor) -> dict[str, Any]:
        s = self.settings
        if s["do_resize"]:
            frames = self.resize(frames, *self.target_size(frames))
        pixels = self.normalize(frames)
        patch, merge, temporal = s["patch_size"], s["merge_size"], s["temporal_patch_size"]
        if pad := -len(pixels) % temporal:
            pixels = torch.cat((pixels, pixels[-1:].expand(pad, -1, -1, -1)))
        count, channels, height, width = pixels.shape
        grid_t, grid_h, grid_w = count // temporal, height // patch, width // patch
        patches = pixels.view(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
        return {"pixel_values_videos": flat, "video_grid_thw": [grid_t, grid_h, grid_w]}


class Qwen3VideoProcessor(QwenVideoProcessor):
    """Qwen3-VL: as Qwen2-VL, but the pixel budget covers the whole clip (frames x area)."""

    stands_for = "Qwen3VLVideoProcessor"
    defaults: ClassVar[dict[str, Any]] = {
        **QwenVideoProcessor.defaults, "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
        "image_mean": _HALF, "image_std": _HALF, "patch_size": 16, "max_video_tokens": 768,
    }

    def target_size(self, frames: torch.Tensor) -> tuple[int, int]:
        s, factor, temporal = self.settings, self.settings["patch_size"] * self.settings["merge_size"], \
            self.settings["temporal_patch_size"]
        count, (height, width) = len(frames), frames.shape[-2:]
        max_pixels, min_pixels = s["size"]["longest_edge"], s["size"]["shortest_edge"]
        if s.get("cap_pixels_per_frame"):
            per_frame = max(min(s["max_video_tokens"] * factor * factor, max_pixels // count), int(min_pixels * 1.05))
            max_pixels = per_frame * count
        if count < temporal:
            raise ImageError(f"a Qwen3-VL video needs at least {temporal} frames, got {count}")
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        if max(height, width) / min(height, width) > 200:
            raise ImageError(f"a video's frames are {width}x{height}: Qwen-VL needs an aspect ratio below 200")
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        t_bar = round(count / temporal) * temporal
        if t_bar * h_bar * w_bar > max_pixels:
            beta = math.sqrt((count * height * width) / max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif t_bar * h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (count * height * width))
            h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return h_bar, w_bar


class OnevisionVideoProcessor(TorchVideoProcessor):
    """LLaVA-OneVision: every frame resized to the fixed ``size`` (384x384 by default), normalised."""

    stands_for = "LlavaOnevisionVideoProcessor"
    defaults: ClassVar[dict[str, Any]] = {
        "size": {"height": 384, "width": 384}, "resample": 3, "do_resize": True, "do_rescale": True,
        "do_normalize": True, "rescale_factor": 1 / 255, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
    }

    def process(self, frames: torch.Tensor) -> dict[str, Any]:
        size = self.settings["size"]
        if self.settings["do_resize"]:
            frames = self.resize(frames, size["height"], size["width"])
        return {"pixel_values_videos": self.normalize(frames).unsqueeze(0)}


class ClipVideoProcessor(TorchVideoProcessor):
    """LLaVA-NeXT-Video: CLIP preprocessing per frame: the shorter side resized to
    ``size["shortest_edge"]`` (aspect kept), a centre crop of ``crop_size`` (zero-padded when the
    frame is smaller), normalised."""

    stands_for = "LlavaNextVideoVideoProcessor"
    defaults: ClassVar[dict[str, Any]] = {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
        "rescale_factor": 1 / 255, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
    }

    def process(self, frames: torch.Tensor) -> dict[str, Any]:
        s = self.settings
        if s["do_resize"]:
            height, width = frames.shape[-2:]
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = s["size"]["shortest_edge"], int(s["size"]["shortest_edge"] * long / short)
            frames = self.resize(frames, *((new_long, new_short) if width <= height else (new_short, new_long)))
        if s["do_center_crop"]:
            frames = self.center_crop(frames, s["crop_size"]["height"], s["crop_size"]["width"])
        return {"pixel_values_videos": self.normalize(frames).unsqueeze(0)}

    @staticmethod
    def center_crop(frames: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
        """transformers' tensor centre crop: zero padding to the crop size first where needed."""
        height, width = frames.shape[-2:]
        if crop_width > width or crop_height > height:
            left, top = max(0, (crop_width - width) // 2), max(0, (crop_height - height) // 2)
            right, bottom = max(0, (crop_width - width + 1) // 2), max(0, (crop_height - height + 1) // 2)
            frames = functional.pad(frames, [left, right, top, bottom], value=0)
            height, width = frames.shape[-2:]
        top, left = int((height - crop_height) / 2.0), int((width - crop_width) / 2.0)
        return frames[..., top:top + crop_height, left:left + crop_width]


#: Video processor kinds named by family records -> their torch-only class.
VIDEO_PROCESSORS: dict[str, type[TorchVideoProcessor]] = {
    "qwen2_vl": QwenVideoProcessor,
    "qwen3_vl": Qwen3VideoProcessor,
    "llava_onevision": OnevisionVideoProcessor,
    "llava_next_video": ClipVideoProcessor,
}

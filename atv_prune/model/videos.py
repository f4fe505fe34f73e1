"""Video clips as users have them, read into sampled 8-bit RGB frames (no torch, no torchvision).

A clip is a **folder of frames** (image files, in natural name order: ``frame2`` before
``frame10``), an **animated image** (GIF, APNG, animated WebP: decoded by Pillow, already a
dependency), or a **video file** (MP4, AVI, MKV, MOV, WebM: decoded by ``decord``, the CPU-wheel
decoder lmms-eval's video models and transformers' ``load_video`` already use; ``pip install
decord``). Frames are drawn uniformly over the clip (:class:`VideoSampling`: at most
``max_frames``, or ``fps`` frames per second of the clip), each opened through
:func:`~atv_prune.model.images.open_image` (high bit depths scaled, transparency on white). Every
problem is one :class:`~atv_prune.errors.ImageError` line: an unreadable clip, frames of mixed
sizes, a clip of fewer than :data:`MIN_FRAMES` frames.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from ..errors import ConfigError, ImageError, one_line
from .images import open_image, to_rgb

#: Files in a frame folder that are frames.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Animated images Pillow decodes.
ANIMATED_SUFFIXES = (".gif", ".apng", ".png", ".webp")
#: Video files decoded with decord.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
#: A clip needs two frames at least (one frame is an image; Qwen-VL pairs frames in time).
MIN_FRAMES = 2
#: Frame rate assumed for a frame folder whose record gives none.
FOLDER_FPS = 1.0
#: The most frames an animated image may stand for on its uniform timeline.
MAX_TIMELINE = 100_000


@dataclass(frozen=True)
class VideoSampling:
    """How frames are drawn from a clip: uniformly over its whole length, ``fps`` frames per
    second of the clip when given, never more than ``max_frames`` (nor fewer than two)."""

    max_frames: int = 8
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.max_frames < MIN_FRAMES:
            raise ConfigError(f"--max-frames must be at least {MIN_FRAMES}, got {self.max_frames}: a clip of one "
                             "frame is an image")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ConfigError(f"--fps must be a positive number of frames per second, got {self.fps}")

    def indices(self, total: int, source_fps: float) -> list[int]:
        """The frame numbers to keep of a clip of ``total`` frames at ``source_fps``: evenly spaced
        from the first frame to the last, rounded to the nearest frame."""
        wanted = self.max_frames
        if self.fps is not None:
            wanted = min(wanted, max(MIN_FRAMES, math.floor(total / source_fps * self.fps)))
        count = min(wanted, total)
        return np.linspace(0, total - 1, count).round().astype(int).tolist()


@dataclass
class Clip:
    """The sampled frames of one clip, with what the processors' frame timestamps need."""

    frames: np.ndarray  # (frames, height, width, 3) uint8
    fps: float  # frames per second of the source clip
    indices: list[int]  # frame numbers of ``frames`` in the source clip
    total_frames: int
    path: Path

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def metadata(self) -> dict[str, object]:
        """The clip as transformers' ``VideoMetadata`` fields (frame timestamps, Qwen2.5-VL's
        seconds per temporal patch)."""
        return {"total_num_frames": self.total_frames, "fps": self.fps, "frames_indices": list(self.indices),
                "duration": self.total_frames / self.fps, "width": self.size[0], "height": self.size[1]}


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """The frames of a frame folder in natural name order (hidden files skipped)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")
                   and p.is_file()), key=_natural_key)


def _too_short(path: Path, count: int) -> ImageError:
    return ImageError(f"video {path} has {count} frame{'s' if count != 1 else ''}: a clip needs at least "
                      f"{MIN_FRAMES} (give one frame as an \"image\")")


def _stack(frames: list[Image.Image], names: list[str], path: Path) -> np.ndarray:
    """Frames as one (T, H, W, 3) array; frames of different sizes are refused, naming two."""
    first = frames[0].size
    for frame, name in zip(frames, names):
        if frame.size != first:
            raise ImageError(f"the frames of video {path} differ in size: {names[0]} is {first[0]}x{first[1]}, "
                             f"{name} is {frame.size[0]}x{frame.size[1]}: resize every frame to one size")
    return np.stack([np.asarray(frame, dtype=np.uint8) for frame in frames])


def _read_folder(folder: Path, sampling: VideoSampling, fps: float) -> Clip:
    files = frame_files(folder)
    if len(files) < MIN_FRAMES:
        if not files:
            raise ImageError(f"video folder {folder} holds no frames ({', '.join(FRAME_SUFFIXES)} files): put the "
                             "clip's frames in it, named in order (frame_001.png, ...)")
        raise _too_short(folder, len(files))
    sizes = {}
    for file in files:  # every frame's size from its header, so mixed sizes are found before decoding
        try:
            with Image.open(file) as opened:
                sizes[file] = opened.size
        except Exception as error:  # noqa: BLE001 - whatever Pillow raises for a damaged file
            raise ImageError(f"cannot read frame {file} of video {folder} ({type(error).__name__}: "
                             f"{one_line(error, 200)}): replace or remove the damaged frame") from None
    first = sizes[files[0]]
    for file in files:
        if sizes[file] != first:
            raise ImageError(f"the frames of video {folder} differ in size: {files[0].name} is {first[0]}x{first[1]}, "
                             f"{file.name} is {sizes[file][0]}x{sizes[file][1]}: resize every frame to one size")
    indices = sampling.indices(len(files), fps)
    frames = [open_image(files[i]) for i in indices]
    return Clip(_stack(frames, [files[i].name for i in indices], folder), fps, indices, len(files), folder)


def _timeline(durations: list[float]) -> tuple[list[int], float]:
    """Frame numbers of an animation on a uniform timeline at its shortest frame duration, and
    that timeline's frame rate. Encoders merge identical consecutive frames into one longer frame
    (Pillow's GIF and APNG writers do): a frame shown k times as long is k frames of the clip."""
    if not all(d > 0 for d in durations):
        return list(range(len(durations))), FOLDER_FPS
    base = min(durations)
    timeline = [number for number, d in enumerate(durations) for _ in range(max(1, round(d / base)))]
    if len(timeline) > MAX_TIMELINE:
        raise ImageError(f"an animation of {len(durations)} frames lasting {sum(durations) / 1000:.0f} s with "
                         f"{base:g} ms frames is too long a clip: shorten it, or give a folder of its frames")
    return timeline, 1000.0 / base


def _read_animated(path: Path, sampling: VideoSampling) -> Clip:
    try:
        with Image.open(path) as opened:
            durations = [float(frame.info.get("duration") or 0) for frame in ImageSequence.Iterator(opened)]
            timeline, fps = _timeline(durations)
            if len(timeline) < MIN_FRAMES:
                raise _too_short(path, len(timeline))
            indices = sampling.indices(len(timeline), fps)
            frames = []
            for index in indices:
                opened.seek(timeline[index])
                frames.append(to_rgb(opened.copy()))
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever Pillow raises for a damaged file
        raise ImageError(f"cannot read video {path} ({type(error).__name__}: {one_line(error, 200)}): replace the "
                         "damaged file, or give the clip as a folder of frames") from None
    return Clip(_stack(frames, [f"frame {i}" for i in indices], path), fps, indices, len(timeline), path)


def _read_video_file(path: Path, sampling: VideoSampling) -> Clip:
    try:
        import decord
    except ImportError:
        raise ImageError(f"reading video {path} needs decord, which is not installed: pip install decord, or give "
                         "the clip as a folder of frames") from None
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total = len(reader)
        if total < MIN_FRAMES:
            raise _too_short(path, total)
        fps = float(reader.get_avg_fps()) or FOLDER_FPS
        indices = sampling.indices(total, fps)
        frames = reader.get_batch(indices).asnumpy()
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - decord raises its own errors for damaged files
        raise ImageError(f"cannot read video {path} ({type(error).__name__}: {one_line(error, 200)}): replace the "
                         "damaged file, or give the clip as a folder of frames") from None
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ImageError(f"video {path} decoded to frames of shape {tuple(frames.shape)}, not RGB: re-encode it")
    return Clip(np.ascontiguousarray(frames, dtype=np.uint8), fps, indices, total, path)


def video_kind(path: Path) -> str:
    """``folder``, ``animated`` or ``file``: how :func:`read_clip` reads ``path``."""
    if path.is_dir():
        return "folder"
    return "file" if path.suffix.lower() in VIDEO_SUFFIXES else "animated"


def read_clip(path: Path, sampling: VideoSampling, fps: float | None = None) -> Clip:
    """The frames of the clip at ``path`` drawn by ``sampling``. ``fps``: the frame rate of a
    frame folder (default :data:`FOLDER_FPS`); files carry their own."""
    if not path.exists():
        raise ImageError(f"video not found: {path}")
    kind = video_kind(path)
    if kind == "folder":
        return _read_folder(path, sampling, fps or FOLDER_FPS)
    if kind == "file":
        return _read_video_file(path, sampling)
    if path.suffix.lower() not in ANIMATED_SUFFIXES:
        raise ImageError(f"video {path} is neither a folder of frames nor a video file ({', '.join(VIDEO_SUFFIXES)}) "
                         "nor an animated GIF/PNG/WebP: convert it, or give a folder of its frames")
    return _read_animated(path, sampling)

"""Deterministic short clips for video tasks: shapes that move, appear or change colour over time.

A clip is :data:`FRAMES` frames of the built-in benchmark's 96 x 96 grey scenes (the same shapes,
colours and sizes as :mod:`.scenes`' first generation), written as one lossless animated PNG (Pillow reads it back
frame for frame; :func:`atv_prune.model.videos.read_clip` takes it as a video). Each question is
generated from the clip's tracks, so answers are exact. Task families (answers are one word):

- ``motion``: which way one shape moves (left, right, up, down), beside static shapes;
- ``order``: which of two shapes appears first (temporal order);
- ``appear``: how many shapes appear after the first frame (counting over time);
- ``change``: which colour a shape turns into.

No frame alone answers any of them: they need the frames in order. ``calib.json`` holds captioned
clips (what appears, moves and changes, frame by frame) in LLaVA conversation format with a
``"video"`` per record, for calibrating a video model. The shipped model is an image model
(LLaVA) and cannot take these clips: they are for users' own video models, and the tests run
the whole path (generation, lmms-eval tasks, calibration, studies) on tiny video models.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .scenes import CANVASES, COLORS, GRID, SHAPES, SIZES, draw_shape

#: The clips are drawn on the first generation's canvas: 96 px, flat grey, 32 px cells.
CANVAS = CANVASES[1]
IMAGE_SIZE, CELL = CANVAS.image_size, CANVAS.cell
FRAMES = 6
#: Frames per second the clips are written at (each frame shows for 500 ms).
CLIP_FPS = 2.0
VIDEO_TASKS = ("motion", "order", "appear", "change")
DIRECTIONS = ("left", "right", "up", "down")
CAPTION_PROMPT = "Describe what happens in the video."
#: Where a moving shape starts and ends, in pixels from the frame's edge.
_MARGIN = 14

Clip = dict[str, Any]
Item = dict[str, Any]


def _centre(cell: tuple[int, int]) -> list[int]:
    row, col = cell
    return [col * CELL + CELL // 2, row * CELL + CELL // 2]


def _track(rng: random.Random, shape: str, color: str, positions: list[list[int] | None],
           colors: list[str] | None = None) -> dict[str, Any]:
    """One object's track: its shape and size, and per frame its position (None: absent) and colour."""
    return {"shape": shape, "size": rng.choice(list(SIZES)), "frames": [
        None if pos is None else {"x": pos[0], "y": pos[1], "color": (colors or [color] * FRAMES)[i]}
        for i, pos in enumerate(positions)]}


def _static(rng: random.Random, cell: tuple[int, int], avoid: set[tuple[str, str]]) -> dict[str, Any]:
    """A shape sitting in ``cell`` for the whole clip, of a (colour, shape) not in ``avoid``."""
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in avoid:
            avoid.add((color, shape))
            return _track(rng, shape, color, [_centre(cell)] * FRAMES)


def _cells(rng: random.Random) -> list[tuple[int, int]]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    return cells


def _motion(rng: random.Random) -> tuple[Clip, Item]:
    direction = rng.choice(DIRECTIONS)
    lane = rng.randrange(GRID)  # the row (horizontal motion) or column (vertical) it moves along
    steps = [_MARGIN + (IMAGE_SIZE - 2 * _MARGIN) * i // (FRAMES - 1) for i in range(FRAMES)]
    if direction in ("left", "up"):
        steps.reverse()
    across = lane * CELL + CELL // 2
    positions = [[step, across] if direction in ("left", "right") else [across, step] for step in steps]
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    tracks = [_track(rng, shape, color, positions)]
    horizontal = direction in ("left", "right")
    free = [cell for cell in _cells(rng) if (cell[0] if horizontal else cell[1]) != lane]
    taken = {(color, shape)}
    tracks += [_static(rng, cell, taken) for cell in free[:rng.randint(0, 2)]]
    question = f"In which direction does the {color} {shape} move? Answer left, right, up or down."
    return {"tracks": tracks}, {"question": question, "answer": direction, "chance": 0.25}


def _order(rng: random.Random) -> tuple[Clip, Item]:
    first_shape, second_shape = rng.sample(SHAPES, 2)
    first = rng.randint(0, 1)
    second = rng.randint(first + 2, FRAMES - 2)
    cells = _cells(rng)
    tracks = []
    for shape, start, cell in ((first_shape, first, cells[0]), (second_shape, second, cells[1])):
        tracks.append(_track(rng, shape, rng.choice(list(COLORS)), [None] * start + [_centre(cell)] * (FRAMES - start)))
    rng.shuffle(tracks)
    asked = rng.sample([first_shape, second_shape], 2)
    question = f"Which shape appears first, the {asked[0]} or the {asked[1]}?"
    return {"tracks": tracks}, {"question": question, "answer": first_shape, "chance": 0.5}


def _appear(rng: random.Random) -> tuple[Clip, Item]:
    new = rng.randint(1, 3)
    starts = [0, *sorted(rng.sample(range(1, FRAMES), new))]
    cells, taken, tracks = _cells(rng), set(), []
    for start, cell in zip(starts, cells):
        track = _static(rng, cell, taken)
        track["frames"][:start] = [None] * start
        tracks.append(track)
    question = "How many shapes appear after the first frame?"
    return {"tracks": tracks}, {"question": question, "answer": str(new), "chance": 1 / 3}


def _change(rng: random.Random) -> tuple[Clip, Item]:
    shape = rng.choice(SHAPES)
    old, new = rng.sample(list(COLORS), 2)
    at = rng.randint(2, FRAMES - 2)
    cells = _cells(rng)
    tracks = [_track(rng, shape, old, [_centre(cells[0])] * FRAMES, [old] * at + [new] * (FRAMES - at))]
    if rng.random() < 0.5:
        other = rng.choice([s for s in SHAPES if s != shape])
        tracks.append(_track(rng, other, rng.choice(list(COLORS)), [_centre(cells[1])] * FRAMES))
    question = f"What colour does the {shape} turn into?"
    return {"tracks": tracks}, {"question": question, "answer": new, "chance": 1 / (len(COLORS) - 1)}


_TASKS = {"motion": _motion, "order": _order, "appear": _appear, "change": _change}


def make_clip(task: str, rng: random.Random) -> tuple[Clip, Item]:
    """A clip for ``task`` and its question (``question``, ``answer``, ``chance``)."""
    clip, item = _TASKS[task](rng)
    clip["background"] = rng.randint(100, 160)
    return clip, item


def clip_hash(clip: Clip) -> str:
    """Content hash of a clip (its canonical JSON): its file name."""
    return hashlib.sha1(json.dumps(clip, sort_keys=True).encode()).hexdigest()[:16]


def render_clip(clip: Clip) -> list[Image.Image]:
    """The clip's frames (deterministic: same clip, same pixels)."""
    g = clip["background"]
    frames = []
    for index in range(FRAMES):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (g, g, g))
        draw = ImageDraw.Draw(image)
        for track in clip["tracks"]:
            state = track["frames"][index]
            if state is not None:
                draw_shape(draw, track["shape"], state["x"], state["y"], CANVAS.half_extent[track["size"]],
                           COLORS[state["color"]])
        frames.append(image)
    return frames


def save_clip(clip: Clip, path: Path) -> None:
    """Write the clip as a lossless animated PNG at :data:`CLIP_FPS`, one PNG frame per frame (the
    blend mode alternates between source and over, which is the same for opaque frames, so that
    Pillow does not merge identical consecutive frames into one longer one)."""
    frames = render_clip(clip)
    frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:],
                   duration=int(1000 / CLIP_FPS), loop=0, disposal=0, blend=[i % 2 for i in range(FRAMES)])


def caption(clip: Clip) -> str:
    """What happens in the clip, shape by shape: when it appears, where it moves, how it changes."""
    sentences = []
    for track in clip["tracks"]:
        present = [(i, state) for i, state in enumerate(track["frames"]) if state is not None]
        start, first = present[0]
        _, last = present[-1]
        name = f"{track['size']} {first['color']} {track['shape']}"
        when = "is there from the start" if start == 0 else f"appears in frame {start + 1}"
        sentence = f"A {name} {when}"
        dx, dy = last["x"] - first["x"], last["y"] - first["y"]
        if dx or dy:
            way = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
            sentence += f" and moves {way}"
        if last["color"] != first["color"]:
            turn = next(i for i, state in present if state["color"] != first["color"])
            sentence += f" and turns {last['color']} in frame {turn + 1}"
        sentences.append(sentence + ".")
    return " ".join(sentences)


def generate_video_benchmark(out_dir: str | Path, seed: int = 0, n_test: int = 40, n_calib: int = 32
                             ) -> dict[str, Any]:
    """Write the video benchmark under ``out_dir`` deterministically from ``seed``; returns its manifest.

    Layout: ``videos/<clip hash>.png`` (animated PNGs); ``test/<task>.jsonl`` with ``n_test``
    items per task (``{"id", "task", "video", "question", "answer", "chance", "clip"}``, the
    video before the question); ``calib.json`` (``n_calib`` captioned clips of every task's kind,
    LLaVA conversation format, ``"video"`` per record); ``manifest.json``. Test and calibration
    clips are disjoint (asserted).
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()

    def fresh(task: str, rng: random.Random) -> tuple[Clip, Item, str]:
        while True:
            clip, item = make_clip(task, rng)
            key = clip_hash(clip)
            if key not in used:
                used.add(key)
                save_clip(clip, out / "videos" / f"{key}.png")
                return clip, item, f"videos/{key}.png"

    for task in VIDEO_TASKS:
        rng = random.Random(f"{seed}-test-{task}")
        lines = []
        for index in range(n_test):
            clip, item, video = fresh(task, rng)
            record = {"id": f"test-{task}-{index:05d}", "task": task, "video": video, **item, "clip": clip}
            lines.append(json.dumps(record, sort_keys=True))
        (out / "test" / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    test_clips = set(used)
    rng = random.Random(f"{seed}-calib")
    calib = []
    for index in range(n_calib):
        clip, _, video = fresh(VIDEO_TASKS[index % len(VIDEO_TASKS)], rng)
        calib.append({"id": f"calib-{index:05d}", "video": video, "conversations": [
            {"from": "human", "value": f"<video>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": caption(clip)}]})
    assert len(used) == len(test_clips) + n_calib, "test and calibration share clips"
    (out / "calib.json").write_text(json.dumps(calib, indent=1))
    manifest = {"seed": seed, "n_test": n_test, "n_calib": n_calib, "tasks": list(VIDEO_TASKS), "frames": FRAMES,
                "fps": CLIP_FPS, "test_hashes": hashlib.sha1("".join(sorted(test_clips)).encode()).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest

"""Deterministic rendered-scene benchmark whose question families mirror the paper's benchmarks.

A scene is a 3 x 3 grid of cells; some cells hold a shape (colour, shape, size), at most one holds
a white plate with a printed word. Every question is generated from the scene's metadata, so
answers are exact. Two generations draw the same objects and questions on different canvases
(``CANVASES``): generation 1 on a flat grey 96 px image, generation 2 on a 144 px image whose
objects are small and placed anywhere in their cell, over a varied, uninformative background
(a muted tone, a low-contrast texture and thin clutter marks) -- as in natural images, the objects
a question needs cover a minority of the image. Task families (evaluation answers are one short token):

- ``exist``: "is there a red circle?" with random, popular and adversarial negatives (POPE);
- ``attribute``: colour / shape / size of an object (MME perception);
- ``count``: how many shapes of a kind (MME counting);
- ``spatial``: relation between two objects, yes/no (GQA);
- ``reading``: the printed word (TextVQA);
- ``mcq``: four-option multiple choice, answer a letter (MMBench);
- ``rule``: a text context states a rule the image must be checked against (ScienceQA-IMG);
- ``textonly``: arithmetic without an image;
- detailed captions form the calibration pool (ShareGPT4V), in LLaVA conversation JSON.

``generate_benchmark`` writes images, per-task val/test JSONL, the training records and
``calib.json``; splits are disjoint by scene hash (asserted).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..eval.tasks import IMAGE_POSITIONS

GRID = 3
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 215, 30),
    "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("big", "small")
WORDS = ("cat", "dog", "sun", "car", "hat", "cup", "pen", "key", "map", "bus", "egg", "fox")
# Frequency priors of the scene generator; POPE's "popular" negatives are the most frequent absent objects.
SHAPE_PRIOR = {"circle": 0.4, "square": 0.3, "triangle": 0.2, "diamond": 0.1}
COLOR_PRIOR = {"red": 0.3, "blue": 0.25, "green": 0.2, "yellow": 0.15, "purple": 0.1}
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}  # (axis, sign)
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
RULE_ADJECTIVES = ("safe", "valid", "lucky", "good")
MAX_SHAPES = 5
LETTERS = ("A", "B", "C", "D")
TASKS = ("exist", "attribute", "count", "spatial", "reading", "mcq", "rule", "textonly")
NEGATIVES = ("random", "popular", "adversarial")
CAPTION_PROMPT = "Describe the image in detail."
#: Where the image goes in a question's prompt: after the question (the visual tokens can attend to
#: what is asked; the shipped model's layout) or before it (LLaVA's layout: the question's tokens
#: can attend to the image; learned slower here, pilot P21 in docs/builtin.md).
DEFAULT_IMAGE_POSITION = "after"

Scene = dict[str, Any]
Item = dict[str, Any]


@dataclass(frozen=True)
class Canvas:
    """How one generation of the benchmark draws a scene: the image, the objects and the word plate."""

    image_size: int
    half_extent: dict[str, int]  # of each size's shapes, in pixels
    plate: tuple[int, int]  # width and height of the word plate
    textured: bool  # a varied background (tone, texture, clutter marks) instead of flat grey
    placed: bool  # objects and the plate anywhere in their cell instead of near its centre

    @property
    def cell(self) -> int:
        return self.image_size // GRID

    def jitter(self, half_width: int, half_height: int) -> tuple[int, int]:
        """The largest offsets from the cell centre that keep a thing of that extent 2 px inside its cell
        (generation 1: 2 px, near the centre)."""
        if not self.placed:
            return 2, 2
        return self.cell // 2 - half_width - 2, self.cell // 2 - half_height - 2


#: The canvas of each generation. Generation 2 keeps the objects, words and questions of the first and
#: raises the visual token count (144 px: a patch-12 tower sees 12 x 12 = 144 tokens, 4 x 4 per cell)
#: while the objects stay small (12 or 22 px), so most patches show only background.
CANVASES = {
    1: Canvas(image_size=96, half_extent={"big": 13, "small": 7}, plate=(30, 20), textured=False, placed=False),
    2: Canvas(image_size=144, half_extent={"big": 11, "small": 6}, plate=(36, 20), textured=True, placed=True),
}
GENERATIONS = tuple(CANVASES)
TEXTURES = ("plain", "noise", "stripes", "checks", "gradient", "blotches")
MARKS = ("dot", "dash", "cross", "zigzag", "star")


def check_generation(generation: int) -> int:
    """``generation`` if it is one of ``GENERATIONS``; a ValueError naming them otherwise."""
    if generation not in CANVASES:
        raise ValueError(f"benchmark generation must be one of {', '.join(map(str, GENERATIONS))}, got {generation!r}")
    return generation


def scene_generation(scene: Scene) -> int:
    """The generation a scene was drawn for (scenes of generation 1 do not record it)."""
    return scene.get("generation", 1)


def image_size(generation: int) -> int:
    """Side in pixels of the images of ``generation``."""
    return CANVASES[check_generation(generation)].image_size


# ----------------------------------------------------------------------------- scenes and images


def sample_scene(rng: random.Random, generation: int = 1) -> Scene:
    """A random scene: 1-5 shapes with distinct (colour, shape) in distinct cells, a word half the time.

    Generation 2 draws the objects and the word the same way, each placed anywhere in its cell, then
    the background; its scenes record their generation.
    """
    canvas = CANVASES[check_generation(generation)]
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(cells)
    n = rng.randint(1, MAX_SHAPES)
    objects, combos = [], set()
    while len(objects) < n:
        color = rng.choices(list(COLOR_PRIOR), weights=list(COLOR_PRIOR.values()))[0]
        shape = rng.choices(list(SHAPE_PRIOR), weights=list(SHAPE_PRIOR.values()))[0]
        if (color, shape) in combos:
            continue
        combos.add((color, shape))
        row, col = cells[len(objects)]
        size = rng.choice(SIZES)
        jx, jy = canvas.jitter(canvas.half_extent[size], canvas.half_extent[size])
        objects.append({"color": color, "shape": shape, "size": size,
                        "row": row, "col": col, "dx": rng.randint(-jx, jx), "dy": rng.randint(-jy, jy)})
    word = None
    if rng.random() < 0.5:
        row, col = cells[n]
        word = {"text": rng.choice(WORDS), "row": row, "col": col}
        if canvas.placed:
            jx, jy = canvas.jitter(canvas.plate[0] // 2, canvas.plate[1] // 2)
            word.update(dx=rng.randint(-jx, jx), dy=rng.randint(-jy, jy))
    if generation == 1:
        return {"background": rng.randint(70, 110), "objects": objects, "word": word}
    return {"generation": generation, "background": _sample_background(rng), "objects": objects, "word": word}


def _sample_background(rng: random.Random) -> dict[str, Any]:
    """A muted tone (a grey with a small tint), a low-contrast texture and a number of clutter marks;
    ``seed`` draws the texture's and the marks' details when the scene is rendered."""
    grey = rng.randint(70, 140)
    tone = [grey + rng.randint(-12, 12) for _ in range(3)]
    return {"tone": tone, "texture": rng.choice(TEXTURES), "marks": rng.randint(4, 24), "seed": rng.randrange(2 ** 31)}


def scene_hash(scene: Scene) -> str:
    """Content hash of a scene (its canonical JSON): the key of split disjointness and image names."""
    return hashlib.sha1(json.dumps(scene, sort_keys=True).encode()).hexdigest()[:16]


_FONT: ImageFont.FreeTypeFont | None = None


def _font() -> ImageFont.FreeTypeFont:
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=16)  # Pillow's embedded font: identical on every machine
    return _FONT


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, h: int,
               fill: tuple[int, int, int] | int) -> None:
    """Draw one shape of half-extent ``h`` centred at (cx, cy) (scenes and the video clips share it)."""
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image of its generation's size (deterministic: same scene, same pixels)."""
    canvas = CANVASES[scene_generation(scene)]
    if canvas.textured:
        image = _background(scene["background"], canvas.image_size)
    else:
        g = scene["background"]
        image = Image.new("RGB", (canvas.image_size, canvas.image_size), (g, g, g))
    _draw_foreground(ImageDraw.Draw(image), scene, canvas, mask=False)
    return image


def foreground_mask(scene: Scene) -> Image.Image:
    """The pixels of a scene's objects and word plate (255) against its background (0), as an "L" image."""
    canvas = CANVASES[scene_generation(scene)]
    image = Image.new("L", (canvas.image_size, canvas.image_size), 0)
    _draw_foreground(ImageDraw.Draw(image), scene, canvas, mask=True)
    return image


def foreground_patches(scene: Scene, patch_size: int) -> np.ndarray:
    """Whether each patch of a ``patch_size`` grid over the image (side x side, row-major) shows any
    pixel of an object or the word plate."""
    mask = np.asarray(foreground_mask(scene)) > 0
    side = mask.shape[0] // patch_size
    return mask[: side * patch_size, : side * patch_size].reshape(side, patch_size, side, patch_size).any((1, 3))


def _draw_foreground(draw: ImageDraw.ImageDraw, scene: Scene, canvas: Canvas, mask: bool) -> None:
    """Draw the objects and the word plate (in white when ``mask``), each placed in its cell."""
    cell = canvas.cell
    for obj in scene["objects"]:
        cx = obj["col"] * cell + cell // 2 + obj["dx"]
        cy = obj["row"] * cell + cell // 2 + obj["dy"]
        fill = 255 if mask else COLORS[obj["color"]]
        draw_shape(draw, obj["shape"], cx, cy, canvas.half_extent[obj["size"]], fill)
    word = scene["word"]
    if word is not None:
        width, height = canvas.plate
        x0 = word["col"] * cell + (cell - width) // 2 + word.get("dx", 0)
        y0 = word["row"] * cell + (cell - height) // 2 + word.get("dy", 0)
        draw.rectangle((x0, y0, x0 + width, y0 + height), fill=255 if mask else (255, 255, 255))
        if not mask:
            draw.text((x0 + width // 2, y0 + height // 2), word["text"], fill=(0, 0, 0), font=_font(), anchor="mm")


def _shade(tone: list[int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, t + delta)) for t in tone)  # type: ignore[return-value]


def _background(background: dict[str, Any], size: int) -> Image.Image:
    """A generation-2 background: the tone, its texture (contrast at most about 20 grey levels) and the
    clutter marks -- thin, muted, at most 10 px, so that none can pass for a shape or a word."""
    rng = random.Random(background["seed"])
    tone, texture = background["tone"], background["texture"]
    image = Image.new("RGB", (size, size), tuple(tone))
    draw = ImageDraw.Draw(image)
    delta = rng.choice((-1, 1)) * rng.randint(8, 20)
    if texture == "noise":  # blocks of 2 x 2 px; numpy's legacy generator keeps its stream across versions
        noise = np.random.RandomState(background["seed"]).randint(-abs(delta), abs(delta) + 1, (size // 2, size // 2))
        pixels = np.asarray(image, dtype=np.int16) + noise.repeat(2, 0).repeat(2, 1)[..., None]
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
    elif texture == "gradient":
        ramp = np.linspace(-delta, delta, size)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        pixels = np.asarray(image, dtype=np.float64) + np.broadcast_to(ramp, (size, size))[..., None]
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
    elif texture == "stripes":
        period, width = rng.randint(6, 14), rng.randint(1, 3)
        direction = rng.choice(("horizontal", "vertical", "diagonal", "antidiagonal"))
        for offset in range(-size, 2 * size, period):
            if direction == "horizontal":
                line = [(0, offset), (size, offset)]
            elif direction == "vertical":
                line = [(offset, 0), (offset, size)]
            elif direction == "diagonal":
                line = [(offset, 0), (offset + size, size)]
            else:
                line = [(offset, 0), (offset - size, size)]
            draw.line(line, fill=_shade(tone, delta), width=width)
    elif texture == "checks":
        side = rng.randint(8, 24)
        for y in range(0, size, side):
            for x in range(0, size, side):
                if (x // side + y // side) % 2:
                    draw.rectangle((x, y, x + side - 1, y + side - 1), fill=_shade(tone, delta))
    elif texture == "blotches":
        for _ in range(rng.randint(3, 8)):
            x, y, rx, ry = rng.randrange(size), rng.randrange(size), rng.randint(8, 30), rng.randint(8, 30)
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_shade(tone, rng.randint(-abs(delta), abs(delta))))
    for _ in range(background["marks"]):
        _draw_mark(draw, rng, tone, size)
    return image


def _draw_mark(draw: ImageDraw.ImageDraw, rng: random.Random, tone: list[int], size: int) -> None:
    """One clutter mark of ``MARKS`` in a muted colour near the tone (each channel within 60 levels)."""
    kind = rng.choice(MARKS)
    shift = rng.choice((-1, 1)) * rng.randint(25, 55)
    color = tuple(max(0, min(255, t + shift + rng.randint(-5, 5))) for t in tone)
    x, y = rng.randrange(size), rng.randrange(size)
    r = rng.randint(2, 5)
    if kind == "dot":
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=color)
    elif kind == "dash":
        draw.line([(x, y), (x + rng.randint(-2 * r, 2 * r), y + rng.randint(-2 * r, 2 * r))], fill=color, width=1)
    elif kind == "cross":
        draw.line([(x - r, y - r), (x + r, y + r)], fill=color, width=1)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=color, width=1)
    elif kind == "zigzag":
        points = [(x + i * r, y + (r if i % 2 else -r) // 2) for i in range(4)]
        draw.line(points, fill=color, width=1)
    else:
        for dx, dy in ((r, 0), (0, r), (r, r), (r, -r)):
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=color, width=1)


# ----------------------------------------------------------------------------- question families


def _plural(shape: str) -> str:
    return shape + "s"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _exist(scene: Scene, rng: random.Random) -> Item | None:
    """POPE-style existence; the ``negative`` subset decides how absent objects are drawn."""
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    negative = rng.choice(NEGATIVES)
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        if negative == "popular":
            top = max(COLOR_PRIOR[c] * SHAPE_PRIOR[s] for c, s in absent)
            pool = [(c, s) for c, s in absent if COLOR_PRIOR[c] * SHAPE_PRIOR[s] == top]
        elif negative == "adversarial":  # shares the colour or the shape of a present object
            pool = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        else:
            pool = absent
        color, shape = rng.choice(pool or absent)
        answer = "no"
    return {"question": f"is there a {color} {shape}?", "answer": answer, "chance": 0.5,
            "negative": negative}


def _attribute(scene: Scene, rng: random.Random) -> Item | None:
    """Colour of a unique shape, shape of a unique colour, or size of an object."""
    objs = scene["objects"]
    shape_count = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
    color_count = {c: sum(o["color"] == c for o in objs) for c in COLORS}
    options: list[Callable[[], Item]] = [lambda: _size_item(rng.choice(objs))]
    unique_shape = [o for o in objs if shape_count[o["shape"]] == 1]
    unique_color = [o for o in objs if color_count[o["color"]] == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        options.append(lambda: {"question": f"what color is the {o['shape']}?", "answer": o["color"],
                                "chance": 1 / len(COLORS)})
    if unique_color:
        o2 = rng.choice(unique_color)
        options.append(lambda: {"question": f"what shape is the {o2['color']} object?",
                                "answer": o2["shape"], "chance": 1 / len(SHAPES)})
    return rng.choice(options)()


def _size_item(o: dict[str, Any]) -> Item:
    return {"question": f"what size is the {o['color']} {o['shape']}?", "answer": o["size"],
            "chance": 1 / len(SIZES)}


def _count(scene: Scene, rng: random.Random) -> Item | None:
    """Number of shapes of one kind, of one colour, or in all."""
    objs = scene["objects"]
    kind = rng.choice(("shape", "color", "all"))
    if kind == "shape":
        shape = rng.choice(SHAPES)
        n, question = sum(o["shape"] == shape for o in objs), f"how many {_plural(shape)} are there?"
    elif kind == "color":
        color = rng.choice(list(COLORS))
        n, question = sum(o["color"] == color for o in objs), f"how many {color} shapes are there?"
    else:
        n, question = len(objs), "how many shapes are there?"
        return {"question": question, "answer": str(n), "chance": 1 / MAX_SHAPES}
    return {"question": question, "answer": str(n), "chance": 1 / (MAX_SHAPES + 1)}


def _spatial(scene: Scene, rng: random.Random) -> Item | None:
    """Is object A <relation> object B? Only pairs that differ along the relation's axis."""
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)
    question, holds = _relation_question(a, b, rng)
    return {"question": question, "answer": _yes_no(holds), "chance": 0.5}


def _relation_question(a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> tuple[str, bool]:
    """"is A <relation> B?" along an axis where A and B differ, and whether it holds."""
    axes = [ax for ax, key in ((0, "row"), (1, "col")) if a[key] != b[key]]
    axis = rng.choice(axes)
    key = "row" if axis == 0 else "col"
    relation = rng.choice([r for r, (ax, _) in RELATIONS.items() if ax == axis])
    sign = RELATIONS[relation][1]
    holds = (a[key] - b[key]) * sign > 0
    return f"is the {a['color']} {a['shape']} {relation} the {b['color']} {b['shape']}?", holds


def _reading(scene: Scene, rng: random.Random) -> Item | None:
    if scene["word"] is None:
        return None
    return {"question": "what word is written?", "answer": scene["word"]["text"], "chance": 1 / len(WORDS)}


def _listed(choices: list[str]) -> str:
    """Options as a multiple-choice question lists them: "A. red B. blue C. green D. yellow"."""
    return " ".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))


def _mcq(scene: Scene, rng: random.Random) -> Item | None:
    """Four options (one correct, random order); the answer is the letter (MMBench)."""
    base = rng.choice((_attribute, _count))(scene, rng)
    if base is None:
        return None
    answer = base["answer"]
    if answer in COLORS:
        pool = list(COLORS)
    elif answer in SHAPES:
        pool = list(SHAPES)
    elif answer in SIZES:
        return None  # two possible sizes: not a four-way choice
    else:
        pool = [str(i) for i in range(MAX_SHAPES + 1)]
    choices = [answer] + rng.sample([p for p in pool if p != answer], 3)
    rng.shuffle(choices)
    listed = _listed(choices)
    return {"question": f"{base['question']} {listed}", "answer": LETTERS[choices.index(answer)],
            "choices": choices, "chance": 0.25}


def _rule(scene: Scene, rng: random.Random) -> Item | None:
    """A stated rule checked against the image; yes/no balanced where the rule family allows it."""
    objs = scene["objects"]
    adjective = rng.choice(RULE_ADJECTIVES)
    want = rng.random() < 0.5
    present = {(o["color"], o["shape"]) for o in objs}
    colors = {o["color"] for o in objs}
    family = rng.choice(("has", "more", "every", "none", "word"))
    if family == "has":
        pool = sorted(present) if want else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(pool)
        rule, holds = f"it has a {color} {shape}", (color, shape) in present
    elif family == "more":
        n = rng.randint(0, len(objs) - 1) if want else rng.randint(len(objs), MAX_SHAPES)
        rule, holds = f"it has more than {n} shapes", len(objs) > n
    elif family == "every":
        shape = rng.choice(sorted({o["shape"] for o in objs}))
        colors_of_shape = sorted({o["color"] for o in objs if o["shape"] == shape})
        pool = colors_of_shape if want else sorted(set(COLORS) - set(colors_of_shape))
        if not pool:  # the shape appears in every colour: no false "every" rule can be stated
            return None
        color = rng.choice(pool)
        rule = f"every {shape} in it is {color}"
        holds = all(o["color"] == color for o in objs if o["shape"] == shape)
    elif family == "none":
        pool = sorted(set(COLORS) - colors) if want else sorted(colors)
        color = rng.choice(pool or list(COLORS))
        rule, holds = f"it has no {color} shapes", color not in colors
    else:
        if scene["word"] is None:
            return None
        text = scene["word"]["text"] if want else rng.choice([w for w in WORDS if w != scene["word"]["text"]])
        rule, holds = f"the word {text} is written in it", text == scene["word"]["text"]
    question = (f"read the rule and look at the picture. rule: a picture is {adjective} when {rule}. "
                f"is this picture {adjective}?")
    return {"question": question, "answer": _yes_no(holds), "chance": 0.5}


def textonly_item(rng: random.Random) -> Item:
    """Arithmetic without an image (answers 0-9)."""
    if rng.random() < 0.5:
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        return {"question": f"what is {a} plus {b}?", "answer": str(a + b), "chance": 0.1}
    a = rng.randint(0, 8)
    return {"question": f"what number comes after {a}?", "answer": str(a + 1), "chance": 0.1}


def _locate(scene: Scene, rng: random.Random) -> Item | None:
    """Training-only grounding by content: where is a named object (answer: its position words)."""
    o = rng.choice(scene["objects"])
    return {"question": f"where is the {o['color']} {o['shape']}?",
            "answer": position_name(o["row"], o["col"]), "chance": 1 / GRID ** 2}


def _describe(scene: Scene, rng: random.Random) -> Item | None:
    """Training-only grounding by position: what a named cell holds (an object, the word, or nothing)."""
    row, col = rng.randrange(GRID), rng.randrange(GRID)
    answer = "nothing"
    for o in scene["objects"]:
        if (o["row"], o["col"]) == (row, col):
            answer = f"{o['size']} {o['color']} {o['shape']}"
    word = scene["word"]
    if word is not None and (word["row"], word["col"]) == (row, col):
        answer = f"the word {word['text']}"
    return {"question": f"what is at the {position_name(row, col)}?", "answer": answer, "chance": 0.0}


def _option(scene: Scene, rng: random.Random) -> Item | None:
    """Training-only option lookup: the letter of the listed option that names a given value.

    The answer needs no image: it trains the copy step of ``mcq`` (find the option that matches,
    answer its letter) apart from the perception step that computes the value.
    """
    pool = rng.choice((list(COLORS), list(SHAPES), [str(i) for i in range(MAX_SHAPES + 1)]))
    choices = rng.sample(pool, 4)
    target = rng.choice(choices)
    listed = _listed(choices)
    return {"question": f"what is {target}? {listed}", "answer": LETTERS[choices.index(target)],
            "chance": 0.25}


def _relate(scene: Scene, rng: random.Random) -> Item | None:
    """Training-only spatial comparison from stated positions: two objects' cells given in words,
    then ``spatial``'s question. The answer needs no image: it trains the compare step of
    ``spatial`` apart from the lookup step that finds where each object is (``locate``)."""
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)
    stated = [f"the {o['color']} {o['shape']} is at the {position_name(o['row'], o['col'])}." for o in (a, b)]
    if rng.random() < 0.5:
        stated.reverse()
    question, holds = _relation_question(a, b, rng)
    return {"question": f"{' '.join(stated)} {question}", "answer": _yes_no(holds), "chance": 0.5}


IMAGE_TASKS: dict[str, Callable[[Scene, random.Random], Item | None]] = {
    "exist": _exist, "attribute": _attribute, "count": _count, "spatial": _spatial,
    "reading": _reading, "mcq": _mcq, "rule": _rule,
}
# Question families used only as training signal: dense, direct supervision of looking an object
# up by its content and by its position, the two primitives the benchmark's questions compose,
# of picking a listed option by its value (the copy step of multiple choice) and of comparing two
# stated positions (the compare step of spatial questions).
GROUNDING_TASKS: dict[str, Callable[[Scene, random.Random], Item | None]] = {
    "locate": _locate, "describe": _describe, "option": _option, "relate": _relate,
}
# Families whose answer needs no image: the trainer's text-only questions (``--text-steps``,
# ``--text-per-batch``) are drawn from these.
TEXT_TASKS = ("option", "relate", "textonly")


def make_item(task: str, scene: Scene | None, rng: random.Random) -> Item | None:
    """One question of ``task`` about ``scene`` (None when the scene cannot carry it)."""
    if task == "textonly":
        return textonly_item(rng)
    return (IMAGE_TASKS.get(task) or GROUNDING_TASKS[task])(scene, rng)


def check_image_layout(layout: str) -> str:
    """``layout`` if it is one of ``IMAGE_POSITIONS``; a ValueError naming the choices otherwise."""
    if layout not in IMAGE_POSITIONS:
        raise ValueError(f"image layout must be one of {', '.join(IMAGE_POSITIONS)}, got {layout!r}")
    return layout


def image_position(question: str, layout: str) -> str:
    """Where the image goes in the prompt of ``question``: ``layout`` (one of ``IMAGE_POSITIONS``)
    for every question, before the caption request always (as in the calibration pool)."""
    check_image_layout(layout)
    return "before" if question == CAPTION_PROMPT else layout


def position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COL_NAMES[col]
    if col == 1:
        return ROW_NAMES[row]
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


def caption(scene: Scene) -> str:
    """A detailed caption listing every object with its size, colour and position, and the word.

    Generation 2 says the same in fewer words ("2 shapes: big red circle at top left, small blue
    square at center. the word cat at bottom."): its background varies, so "on a grey background"
    would be wrong, and a calibration conversation's text stays a minority beside its visual tokens.
    """
    objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
    n = len(objs)
    if scene_generation(scene) == 2:
        listed = ", ".join(f"{o['size']} {o['color']} {o['shape']} at {position_name(o['row'], o['col'])}"
                           for o in objs)
        text = f"{n} shape{'s' if n > 1 else ''}: {listed}."
        word = scene["word"]
        if word is not None:
            text += f" the word {word['text']} at {position_name(word['row'], word['col'])}."
        return text
    parts = [f"the picture shows {n} shape{'s' if n > 1 else ''} on a grey background."]
    for o in objs:
        parts.append(f"a {o['size']} {o['color']} {o['shape']} is at the {position_name(o['row'], o['col'])}.")
    word = scene["word"]
    if word is not None:
        parts.append(f"the word {word['text']} is written at the {position_name(word['row'], word['col'])}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- vocabulary and scoring

_TEMPLATE_TEXT = (
    "is there a what color is the what shape is the object what size is the how many are there "
    "shapes is the left of right of above below what word is written read the rule and look at the "
    "picture rule a picture is when it has more than every in it no the word is written in it "
    "is this what is plus what number comes after the picture shows shape on a grey background "
    "at the top middle bottom left center right describe image in detail where nothing . ? A B C D"
)


def vocabulary() -> list[str]:
    """Every word the benchmark can produce (templates and value lists), sorted: the closed vocabulary."""
    words = set(_TEMPLATE_TEXT.lower().split())
    words |= set(COLORS) | set(SHAPES) | {_plural(s) for s in SHAPES} | set(SIZES) | set(WORDS)
    words |= set(RULE_ADJECTIVES) | {"yes", "no"} | {str(i) for i in range(10)}
    words |= {w for r in RELATIONS for w in r.split()}
    words |= {w.lower() for w in CAPTION_PROMPT.replace(".", " ").split()}
    words |= set(string.punctuation)
    return sorted(words)


# ----------------------------------------------------------------------------- the benchmark files


class _SceneStream:
    """Scenes from one seeded stream that skips every scene hash already handed out (split disjointness).

    Each split and task has its own stream (seeded by name) over one shared set of used hashes, so
    the first N test items of a task do not depend on the sizes of the other splits.
    """

    def __init__(self, used: set[str], name: str, generation: int) -> None:
        self.rng = random.Random(name)
        self.used = used
        self.generation = generation

    def next(self) -> tuple[Scene, str]:
        while True:
            scene = sample_scene(self.rng, self.generation)
            key = scene_hash(scene)
            if key not in self.used:
                self.used.add(key)
                return scene, key


def _save_image(out: Path, scene: Scene, key: str) -> str:
    rel = f"images/{key}.png"
    path = out / rel
    if not path.exists():
        render(scene).save(path, format="PNG")
    return rel


def _eval_split(out: Path, split: str, n: int, seed: int, used: set[str], layout: str,
                generation: int) -> set[str]:
    """Write ``out/split/<task>.jsonl`` with ``n`` items per task; returns the split's scene hashes."""
    (out / split).mkdir(parents=True, exist_ok=True)
    hashes: set[str] = set()
    for task in TASKS:
        stream = _SceneStream(used, f"{seed}-{split}-{task}", generation)
        rng = random.Random(f"{seed}-{split}-{task}-questions")
        lines = []
        while len(lines) < n:
            if task == "textonly":
                item, scene, key, image = textonly_item(rng), None, None, None
            else:
                scene, key = stream.next()
                item = make_item(task, scene, rng)
                if item is None:
                    continue
                image = _save_image(out, scene, key)
                hashes.add(key)
            record = {"id": f"{split}-{task}-{len(lines):05d}", "task": task, "image": image, **item,
                      "scene": scene, "scene_hash": key}
            if image is not None:
                record["image_position"] = image_position(item["question"], layout)
            lines.append(json.dumps(record, sort_keys=True))
        (out / split / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return hashes


DEFAULT_TASK_WEIGHTS = {"exist": 1.0, "attribute": 1.0, "count": 1.5, "spatial": 1.5, "reading": 1.5,
                        "mcq": 1.0, "rule": 1.5, "textonly": 0.3, "caption": 0.3}


def train_record(scene: Scene | None, rng: random.Random, weights: dict[str, float],
                 max_turns: int) -> list[dict[str, str]]:
    """The question-answer turns of one training conversation about ``scene`` (text-only when None).

    Several questions share one image so that one vision pass feeds several supervised answers;
    a caption turn, when drawn, is the only turn (as in the calibration pool).
    """
    if scene is None:
        return [{"task": "textonly", **qa(textonly_item(rng))} for _ in range(rng.randint(1, max_turns))]
    tasks = [t for t in weights if t not in ("textonly", "caption")]
    if rng.random() < weights.get("caption", 0) / sum(weights.values()):
        return [{"task": "caption", "question": CAPTION_PROMPT, "answer": caption(scene)}]
    turns: list[dict[str, str]] = []
    for _ in range(rng.randint(1, max_turns)):
        task = rng.choices(tasks, weights=[weights[t] for t in tasks])[0]
        item = make_item(task, scene, rng)
        if item is not None:
            turns.append({"task": task, **qa(item)})
    return turns


def qa(item: Item) -> dict[str, str]:
    """The question and answer of an item: one conversation turn."""
    return {"question": item["question"], "answer": item["answer"]}


def generate_train(out: Path, n: int, stream: _SceneStream, rng: random.Random,
                   weights: dict[str, float] | None = None, max_turns: int = 4) -> None:
    """Write ``out/train.jsonl``: one conversation per line, ``{"id", "scene", "turns"}``.

    Training images are not stored: ``render(scene)`` redraws them exactly, which is faster than
    decoding PNGs. ``scene`` is null for text-only conversations.
    """
    weights = weights or DEFAULT_TASK_WEIGHTS
    p_text = weights.get("textonly", 0) / sum(weights.values())
    with (out / "train.jsonl").open("w") as f:
        written = 0
        while written < n:
            scene = None if rng.random() < p_text else stream.next()[0]
            turns = train_record(scene, rng, weights, max_turns)
            if turns:
                f.write(json.dumps({"id": f"train-{written:07d}", "scene": scene, "turns": turns}) + "\n")
                written += 1


def generate_benchmark(out_dir: str | Path, seed: int = 0, n_train: int = 100_000, n_val: int = 100,
                       n_test: int = 200, n_calib: int = 256,
                       weights: dict[str, float] | None = None, max_turns: int = 4,
                       image_layout: str = DEFAULT_IMAGE_POSITION, generation: int = 1) -> dict[str, Any]:
    """Write the whole benchmark under ``out_dir`` deterministically from ``seed``; returns its manifest.

    Layout: ``images/<scene hash>.png``; ``val/<task>.jsonl`` and ``test/<task>.jsonl`` with
    ``n_val`` / ``n_test`` items per task, each image record's ``image_position`` following
    ``image_layout``; ``train.jsonl`` (``n_train`` conversations);
    ``calib.json`` (``n_calib`` captioned images, LLaVA conversation format); ``manifest.json``.
    ``generation`` picks the canvas (``CANVASES``); the manifest records it from generation 2 on
    (a manifest without it is of generation 1, whose files stay byte for byte what they were).
    """
    check_image_layout(image_layout)  # before anything is written
    check_generation(generation)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    test = _eval_split(out, "test", n_test, seed, used, image_layout, generation)
    val = _eval_split(out, "val", n_val, seed, used, image_layout, generation)
    stream = _SceneStream(used, f"{seed}-calib", generation)
    calib = []
    for i in range(n_calib):
        scene, key = stream.next()
        calib.append({"id": f"calib-{i:05d}", "image": _save_image(out, scene, key), "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
            {"from": "gpt", "value": caption(scene)}]})
    (out / "calib.json").write_text(json.dumps(calib, indent=1))
    eval_hashes = test | val
    generate_train(out, n_train, _SceneStream(used, f"{seed}-train", generation),
                   random.Random(f"{seed}-train-questions"), weights, max_turns)
    assert not test & val, "test and val share scenes"
    manifest = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test, "n_calib": n_calib,
                "tasks": list(TASKS), "max_turns": max_turns, "weights": weights or DEFAULT_TASK_WEIGHTS,
                "image_layout": image_layout,
                "test_hashes": hashlib.sha1("".join(sorted(test)).encode()).hexdigest(),
                "eval_scenes": len(eval_hashes)}
    if generation != 1:
        manifest["generation"] = generation
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def data_generation(manifest: dict[str, Any]) -> int:
    """The generation of a benchmark manifest (also ``training.json``'s ``data``); 1 when it records none."""
    return manifest.get("generation", 1)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

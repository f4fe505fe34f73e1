"""The per-document functions lmms-eval calls for the built-in benchmark's tasks.

The task YAMLs written by :mod:`atv_prune.eval.tasks` reference these through a one-line
``utils.py`` next to them (lmms-eval resolves ``!function utils.name`` beside the YAML).
Documents are the normalised records of :func:`atv_prune.eval.tasks.write_builtin_tasks`:
``image`` and ``video`` are absolute paths or None and ``choices`` a (possibly empty) list. A
video document's visual is its clip's path (lmms-eval's convention for video tasks: the model
class reads the clip; :class:`~atv_prune.eval.model.InMemoryVLM` draws its frames).

They follow lmms-eval's conventions, so that its stock model classes run the tasks as our own
does: simple (``is_simple``) classes read :func:`doc_to_text`, where an ``<image>`` marker places
the image as ``llava_hf`` expects (and the Qwen classes strip); chat classes read
:func:`doc_to_messages`, a user turn of image and text items in the record's order, with no
marker in the text.
"""

from __future__ import annotations

import string
from typing import Any

from PIL import Image

from ..model.chat import IMAGE_MARKER, VIDEO_MARKER
from ..model.images import open_image
from .answers import answer_matches

LETTERS = string.ascii_uppercase

#: The metric the built-in tasks report, already in [0, 100].
METRIC = "accuracy"


def listed_choices(choices: list[str]) -> str:
    """Lettered options as the benchmark writes them: ``A. red B. blue C. green``."""
    return " ".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))


def _question(doc: dict[str, Any]) -> str:
    """The question, followed by its lettered choices unless the question already lists them."""
    text = doc["question"]
    choices = doc.get("choices") or []
    if choices and listed_choices(choices) not in text:
        text = f"{text} {listed_choices(choices)}"
    return text


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question (with its choices), and an image marker at the end when the record puts its
    image after the text (without a marker, lmms-eval's classes put the image first)."""
    text = _question(doc)
    if doc.get("image") and doc.get("image_position") == "after":
        text = f"{text} {IMAGE_MARKER}"
    if doc.get("video"):
        text = f"{text} {VIDEO_MARKER}" if doc.get("image_position") == "after" else f"{VIDEO_MARKER}\n{text}"
    return text


def doc_to_messages(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> list[dict[str, Any]]:
    """The chat form of the document: one user turn holding the image (if any) and the question,
    in the record's order (the chat classes' format: ``{"type": "image", "url": PIL image}``)."""
    text = {"type": "text", "text": _question(doc)}
    kind = "video" if doc.get("video") else "image"
    visuals = [{"type": kind, "url": visual} for visual in doc_to_visual(doc)]
    content = [text, *visuals] if doc.get("image_position") == "after" else [*visuals, text]
    return [{"role": "user", "content": content}]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image | str]:
    """The document's image as 8-bit RGB, converted as calibration images are, or its video's
    path (an empty list for text-only questions)."""
    if doc.get("video"):
        return [doc["video"]]
    if not doc.get("image"):
        return []
    return [open_image(doc["image"])]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """100 when the generated answer's first line matches the reference after normalisation, else
    0. The first line is the task's ``until``, applied here because not every model class stops
    at it (lmms-eval's ``llava_hf`` does not)."""
    answer = results[0].split("\n", 1)[0]
    return {METRIC: 100.0 if answer_matches(answer, doc["answer"]) else 0.0}

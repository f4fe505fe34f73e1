"""The per-document functions lmms-eval calls for the built-in benchmark's tasks.

The task YAMLs written by :mod:`atv_prune.eval.tasks` reference these through a one-line
``utils.py`` next to them (lmms-eval resolves ``!function utils.name`` beside the YAML).
Documents are the normalised records of :func:`atv_prune.eval.tasks.write_builtin_tasks`:
``image`` is an absolute path or None and ``choices`` a (possibly empty) list.
"""

from __future__ import annotations

import string
from typing import Any

from PIL import Image

from ..model.images import open_image
from .answers import answer_matches

LETTERS = string.ascii_uppercase

#: The metric the built-in tasks report, already in [0, 100].
METRIC = "accuracy"
#: Where an image goes in a prompt (lmms-eval tasks such as MMMU interleave images this way).
IMAGE_MARKER = "<image>"


def listed_choices(choices: list[str]) -> str:
    """Lettered options as the benchmark writes them: ``A. red B. blue C. green``."""
    return " ".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, followed by its lettered choices unless the question already lists them, and
    an image marker at the end when the record puts its image after the text."""
    text = doc["question"]
    choices = doc.get("choices") or []
    if choices and listed_choices(choices) not in text:
        text = f"{text} {listed_choices(choices)}"
    if doc.get("image") and doc.get("image_position") == "after":
        text = f"{text} {IMAGE_MARKER}"
    return text


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The document's image as 8-bit RGB, converted as calibration images are (an empty list for
    text-only questions)."""
    if not doc.get("image"):
        return []
    return [open_image(doc["image"])]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """100 when the generated answer matches the reference after normalisation, else 0."""
    return {METRIC: 100.0 if answer_matches(results[0], doc["answer"]) else 0.0}

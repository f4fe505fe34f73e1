"""How a short generated answer is scored against the reference of a built-in task record."""

from __future__ import annotations

import re

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed, number words as digits."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split())


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match of a model's short answer after normalisation ("Yes." matches "yes", "A" matches "a")."""
    return normalize_answer(prediction) == normalize_answer(answer)

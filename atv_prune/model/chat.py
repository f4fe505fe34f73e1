"""Where images go in a user turn: one rule for calibration records and evaluation prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Marks where an image goes in a prompt (LLaVA's convention, also lmms-eval's interleaved tasks).
IMAGE_MARKER = "<image>"


def user_content(text: str, images: Sequence[Any]) -> list[dict[str, Any]]:
    """Chat-template content of a user turn: the i-th image where the i-th ``<image>`` marker
    stands, images beyond the markers first; text pieces stripped, empty ones and the markers
    beyond the images dropped (a text-only turn is its stripped text). ``images`` are image
    objects, or None for a placeholder item ``{"type": "image"}``."""
    pieces = text.split(IMAGE_MARKER)
    placed = min(len(images), len(pieces) - 1)
    content = [_image_item(image) for image in images[placed:]]
    for piece, image in zip(pieces[:placed], images[:placed]):
        _add_text(content, piece)
        content.append(_image_item(image))
    _add_text(content, "".join(pieces[placed:]))
    return content or [{"type": "text", "text": ""}]


def _add_text(content: list[dict[str, Any]], text: str) -> None:
    if text.strip():
        content.append({"type": "text", "text": text.strip()})


def _image_item(image: Any) -> dict[str, Any]:
    return {"type": "image"} if image is None else {"type": "image", "image": image}

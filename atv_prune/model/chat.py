"""Where images and videos go in a user turn: one rule for calibration records and evaluation prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

#: Marks where an image goes in a prompt (LLaVA's convention, also lmms-eval's interleaved tasks).
IMAGE_MARKER = "<image>"
#: Marks where a video goes in a prompt (LLaVA-OneVision's convention).
VIDEO_MARKER = "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")


def user_content(text: str, images: Sequence[Any], videos: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Chat-template content of a user turn: the i-th image where the i-th ``<image>`` marker
    stands and the i-th video where the i-th ``<video>`` marker stands; images, then videos,
    beyond their markers go first; text pieces stripped, empty ones and the markers beyond the
    items dropped (a text-only turn is its stripped text). ``images`` / ``videos`` are objects,
    or None for a placeholder item ``{"type": "image"}`` / ``{"type": "video"}``."""
    pieces = _MARKERS.split(text)  # text, marker, text, marker, ..., text
    markers = pieces[1::2]
    kinds = {IMAGE_MARKER: ("image", list(images)), VIDEO_MARKER: ("video", list(videos))}
    placed = {marker: min(len(items), markers.count(marker)) for marker, (_, items) in kinds.items()}
    content = [_item(kind, item) for marker, (kind, items) in kinds.items() for item in items[placed[marker]:]]
    used = dict.fromkeys(kinds, 0)
    pending = pieces[0]
    for marker, after in zip(markers, pieces[2::2]):
        kind, items = kinds[marker]
        if used[marker] < placed[marker]:
            _add_text(content, pending)
            content.append(_item(kind, items[used[marker]]))
            used[marker] += 1
            pending = after
        else:  # a marker beyond the items: dropped, its neighbours joined
            pending += after
    _add_text(content, pending)
    return content or [{"type": "text", "text": ""}]


def _add_text(content: list[dict[str, Any]], text: str) -> None:
    if text.strip():
        content.append({"type": "text", "text": text.strip()})


def _item(kind: str, value: Any) -> dict[str, Any]:
    return {"type": kind} if value is None else {"type": kind, kind: value}

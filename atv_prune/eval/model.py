"""An lmms-eval model class around a transformers VLM that is already in memory.

lmms-eval's own wrappers load a checkpoint by name; a model pruned in memory (or wrapped as a
modality-routed probe) would need a save/load round trip. :class:`InMemoryVLM` instead takes
the model and processor objects as they are, renders prompts with the processor's own chat
template and generates greedily in left-padded batches; a video document's clip (its path, as
lmms-eval passes videos) is read and its frames drawn as calibration clips are
(:mod:`atv_prune.model.videos`). Unlike lmms-eval's wrappers, which
answer "" when generation fails (scored 0, indistinguishable from a wrong answer), any error
here raises :class:`GenerationError` and ends the evaluation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..errors import AtvPruneError, ImageError
from ..model.chat import user_content
from ..model.images import to_rgb
from ..model.layout import resolve
from ..model.videos import Clip, VideoSampling, read_clip
from .env import require_lmms_eval

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError:
    require_lmms_eval()  # raises the one-line install hint when lmms-eval is missing
    raise

#: lmms-eval's own HF wrappers generate up to 1024 new tokens when a task sets no limit.
DEFAULT_MAX_NEW_TOKENS = 1024


class GenerationError(RuntimeError):
    """Generation failed for a batch of documents; the evaluation stops instead of scoring 0."""


def _visuals(visuals: Any, where: str, sampling: VideoSampling) -> tuple[list[Image.Image], list[Clip]]:
    """A document's visuals: PIL images as 8-bit RGB (:func:`~atv_prune.model.images.to_rgb`: high
    bit depths scaled, transparency on white), and paths as video clips (frames drawn by
    ``sampling``); audio and other kinds are refused."""
    if visuals is None:
        return [], []
    visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    unknown = sorted({type(v).__name__ for v in visuals if not isinstance(v, (Image.Image, str, Path))})
    if unknown:
        raise AtvPruneError(f"{where}: visuals of type {', '.join(unknown)} are not supported (images, and videos "
                            "given as paths)")
    try:
        clips = [read_clip(Path(v), sampling) for v in visuals if isinstance(v, (str, Path))]
    except ImageError as error:
        raise AtvPruneError(f"{where}: {error}") from None
    return [to_rgb(v) for v in visuals if isinstance(v, Image.Image)], clips


def _generation_settings(gen_kwargs: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    """(max new tokens, stop strings) of a request; sampling settings are ignored (always greedy)."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), until


def _cut(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class InMemoryVLM(lmms):
    """lmms-eval model class evaluating an in-memory image-text-to-text model (generate_until only).

    ``model`` must already be on ``device`` (inputs are moved there). ``batch_size`` requests
    with the same generation settings share one left-padded ``generate`` call.
    """

    def __init__(self, model: nn.Module, processor: Any, *, batch_size: int = 8, device: str = "cpu",
                 progress: bool = False, video: VideoSampling | None = None) -> None:
        require_lmms_eval()
        super().__init__()
        if batch_size < 1:
            raise AtvPruneError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.video = video or VideoSampling()
        self.layout = resolve(model)

    def _batch(self, requests: list[Instance], max_new_tokens: int, until: tuple[str, ...]) -> list[str]:
        """Greedy answers to a batch of requests sharing generation settings."""
        conversations, clips = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            images, doc_clips = _visuals(doc_to_visual(doc), f"task {task} document {doc_id}", self.video)
            clips += doc_clips
            content = user_content(context, images, [clip.frames for clip in doc_clips])
            conversations.append([{"role": "user", "content": content}])
        if clips:
            inputs = self._encode_with_videos(conversations, clips)
        else:
            inputs = self.processor.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True, "padding_side": "left"},
            )
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v
                  for k, v in self.layout.prepare_inputs(inputs).items()}
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                         num_beams=1)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]  # left padding: every prompt ends here
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def _encode_with_videos(self, conversations: list[list[dict[str, Any]]], clips: list[Clip]) -> dict[str, Any]:
        """A batch with clips, encoded as the processor's own ``apply_chat_template`` encodes one
        (no second BOS after a template that writes it), with the clips' drawn frames and their
        timestamps (``do_sample_frames=False``: the frames are drawn already)."""
        if getattr(self.processor, "video_processor", None) is None:
            raise AtvPruneError(f"the {type(self.processor).__name__} takes no video: evaluate video tasks with a "
                                "video model (atv-prune families lists those that take video)")
        texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        images = [item["image"] for turn in conversations for item in turn[0]["content"] if item["type"] == "image"]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "padding_side": "left", "return_tensors": "pt",
                                  "videos": [clip.frames for clip in clips],
                                  "videos_kwargs": {"video_metadata": [clip.metadata() for clip in clips],
                                                    "do_sample_frames": False}}
        if images:
            kwargs["images"] = images
        bos = getattr(getattr(self.processor, "tokenizer", None), "bos_token", None)
        if bos and texts[0].startswith(bos):
            kwargs["add_special_tokens"] = False
        return self.processor(**kwargs)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One greedy answer per request, in request order; raises :class:`GenerationError` on failure."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(_generation_settings(request.args[1]))].append(index)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate", disable=not self.progress)
        for key, indices in groups.items():
            max_new_tokens, until = json.loads(key)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                batch = [requests[i] for i in chunk]
                try:
                    texts = self._batch(batch, max_new_tokens, tuple(until))
                except AtvPruneError:
                    raise
                except Exception as error:
                    docs = ", ".join(f"{r.args[4]}/{r.args[3]}" for r in batch)
                    raise GenerationError(f"generation failed for documents {docs}: "
                                          f"{type(error).__name__}: {error}") from error
                for i, text in zip(chunk, texts):
                    answers[i] = text
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "InMemoryVLM answers generate_until tasks only; "
            "loglikelihood / multiple_choice tasks are not supported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "InMemoryVLM answers single-round generate_until tasks only; multi-round tasks are not supported"
        )

    def clean(self) -> None:
        """Keep the model: lmms-eval's default deletes every nn.Module attribute, but the caller owns it."""

"""The token regime of a built-in benchmark as a model sees it: visual against text tokens, and how much
of each image the objects cover.

ATV matters because in real VLMs visual tokens outnumber text tokens many times over (LLaVA-1.5:
576 per image against a few dozen text tokens) and most of them show redundant background. This
module measures both for a benchmark and a processor, with the real processor and tokenizer on the
whole conversations: calibration samples as the pruning draws them (``load_calibration``), test
questions with their answers as the chat template renders them. A token is visual when it is the
image token; every other token (chat template, question, answer) is text.

    python -m atv_prune.builtin.regime [--model DIR | --patch-size P] [--bench DIR] [--samples N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import AutoProcessor, LlavaProcessor

from ..model.calibration import load_calibration
from . import BENCHMARK_DIR, CHECKPOINT_DIR, scenes
from .tokenizer import build_processor


def token_counts(input_ids: Any, image_token_id: int) -> tuple[int, int]:
    """(visual, text) token counts of one sequence of input ids."""
    ids = list(np.asarray(input_ids).reshape(-1))
    visual = sum(i == image_token_id for i in ids)
    return visual, len(ids) - visual


def _summary(counts: list[tuple[int, int]]) -> dict[str, Any]:
    """Mean visual and text tokens, the ratio of the means, and the share of samples at least 3x visual."""
    visual = sum(v for v, _ in counts) / len(counts)
    text = sum(t for _, t in counts) / len(counts)
    return {"samples": len(counts), "visual": round(visual, 2), "text": round(text, 2),
            "ratio": round(visual / text, 2),
            "share_at_least_3x": round(sum(v >= 3 * t for v, t in counts) / len(counts), 3)}


def calibration_counts(bench: Path, processor: LlavaProcessor, samples: int, seed: int = 0) -> list[tuple[int, int]]:
    """Counts of the calibration samples the pruning draws from ``bench/calib.json`` (``load_calibration``)."""
    calib = load_calibration(bench / "calib.json", processor, samples=samples, seed=seed)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return [token_counts(s.inputs["input_ids"], image_id) for s in calib.samples]


def question_counts(bench: Path, processor: LlavaProcessor,
                    per_task: int | None = None) -> dict[str, list[tuple[int, int]]]:
    """Counts per task of the test questions with their answers, the image where the record places it."""
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts: dict[str, list[tuple[int, int]]] = {}
    for task in scenes.TASKS:
        counts[task] = []
        for item in scenes.read_jsonl(bench / "test" / f"{task}.jsonl")[:per_task]:
            text = {"type": "text", "text": item["question"]}
            content = [text] if item["image"] is None else (
                [text, {"type": "image"}] if item["image_position"] == "after" else [{"type": "image"}, text])
            messages = [{"role": "user", "content": content},
                        {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}]
            rendered = processor.apply_chat_template(messages, tokenize=False)
            images = None if item["image"] is None else [Image.open(bench / item["image"]).convert("RGB")]
            inputs = processor(text=[rendered], images=images, return_tensors="np")
            counts[task].append(token_counts(inputs["input_ids"], image_id))
    return counts


def patch_coverage(scene: scenes.Scene, patch_size: int) -> tuple[float, float]:
    """(share of the image's patches that show any pixel of an object or the word plate, share of its pixels)."""
    mask = np.asarray(scenes.foreground_mask(scene)) > 0
    return float(scenes.foreground_patches(scene, patch_size).mean()), float(mask.mean())


def measure(bench: Path, processor: LlavaProcessor, samples: int = 128, per_task: int | None = None) -> dict[str, Any]:
    """The benchmark's regime for ``processor``: calibration and test token counts and object coverage."""
    questions = question_counts(bench, processor, per_task)
    image_questions = [c for task, cs in questions.items() if task != "textonly" for c in cs]
    scenes_seen = [r["scene"] for task in scenes.TASKS if task != "textonly"
                   for r in scenes.read_jsonl(bench / "test" / f"{task}.jsonl")[:per_task]]
    coverage = [patch_coverage(scene, processor.patch_size) for scene in scenes_seen]
    return {
        "generation": scenes.data_generation(json.loads((bench / "manifest.json").read_text())),
        "image_size": processor.image_processor.crop_size["height"], "patch_size": processor.patch_size,
        "calibration": _summary(calibration_counts(bench, processor, samples)),
        "test_image_questions": _summary(image_questions),
        "test_all_questions": _summary([c for cs in questions.values() for c in cs]),
        "test_per_task": {task: _summary(cs) for task, cs in questions.items()},
        "object_patch_share": {"mean": round(sum(p for p, _ in coverage) / len(coverage), 3),
                               "max": round(max(p for p, _ in coverage), 3)},
        "object_pixel_share": {"mean": round(sum(q for _, q in coverage) / len(coverage), 3),
                               "max": round(max(q for _, q in coverage), 3)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=CHECKPOINT_DIR, help="checkpoint whose processor counts the tokens")
    p.add_argument("--patch-size", type=int, default=None,
                   help="count with the built-in processor of this patch size instead of --model's")
    p.add_argument("--bench", type=Path, default=BENCHMARK_DIR, help="benchmark folder with calib.json and test/")
    p.add_argument("--samples", type=int, default=128, help="calibration samples drawn (the pruning's default)")
    p.add_argument("--items", type=int, default=None, help="test items per task (default: all)")
    args = p.parse_args(argv)
    manifest = args.bench / "manifest.json"
    if not manifest.exists():
        p.error(f"--bench: {manifest} not found; give a built-in benchmark folder")
    if args.patch_size is not None:
        size = scenes.image_size(scenes.data_generation(json.loads(manifest.read_text())))
        if args.patch_size <= 0 or size % args.patch_size:
            p.error(f"--patch-size {args.patch_size} does not divide the benchmark's {size} px images")
        processor = build_processor(args.patch_size, size)
    elif not (args.model / "processor_config.json").exists():
        p.error(f"--model: {args.model} holds no processor; give a built-in checkpoint or --patch-size")
    else:
        processor = AutoProcessor.from_pretrained(args.model)
    result = measure(args.bench, processor, args.samples, args.items)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

"""Where a built-in model fails: accuracy on the training-only primitives and on spatial relations by axis.

The benchmark's composite questions are built from primitives the trainer can also ask alone:
looking an object up by content (``locate``) and by position (``describe``), and picking the listed
option that names a value (``option``, the copy step of ``mcq``). Scoring those on the benchmark's
test scenes tells a perception failure from a composition failure.

    python -m atv_prune.builtin.diagnose [--model DIR] [--bench DIR] [--items N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from . import BENCHMARK_DIR, CHECKPOINT_DIR, scenes
from .train import Encoder, evaluate


def diagnostic_items(bench: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` items of each primitive on the scenes of the test split's ``exist`` items, plus the
    first ``n`` ``spatial`` test items labelled by the axis they compare (``spatial-row``/``-col``)."""
    rng = random.Random(f"{seed}-diagnose")
    records = scenes.read_jsonl(bench / "test" / "exist.jsonl")[:n]
    items = [{"task": task, "scene": r["scene"], **scenes.make_item(task, r["scene"], rng)}
             for task in scenes.GROUNDING_TASKS for r in records]
    for r in scenes.read_jsonl(bench / "test" / "spatial.jsonl")[:n]:
        vertical = " above " in r["question"] or " below " in r["question"]
        items.append({**r, "task": "spatial-row" if vertical else "spatial-col"})
    return items


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=CHECKPOINT_DIR, help="trained built-in checkpoint")
    p.add_argument("--bench", type=Path, default=BENCHMARK_DIR, help="benchmark folder with test/")
    p.add_argument("--items", type=int, default=100, help="items per primitive")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for path, what in ((args.model / "training.json", "--model"), (args.bench / "test" / "exist.jsonl", "--bench")):
        if not path.exists():
            p.error(f"{what}: {path} not found; give a built-in checkpoint and a benchmark folder")
    torch.set_num_threads(args.threads)
    patch_size = json.loads((args.model / "training.json").read_text())["shape"]["patch_size"]
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    encoder = Encoder(AutoProcessor.from_pretrained(args.model), patch_size)
    accuracy = evaluate(model, encoder, diagnostic_items(args.bench, args.items))
    accuracy.pop("mean")
    print(json.dumps(accuracy, indent=1))
    return accuracy


if __name__ == "__main__":
    main()

"""Where a built-in model fails: accuracy on the training-only primitives and on spatial relations by axis.

The benchmark's composite questions are built from primitives the trainer can also ask alone:
looking an object up by content (``locate``) and by position (``describe``), and picking the listed
option that names a value (``option``, the copy step of ``mcq``). Scoring those on the benchmark's
test scenes tells a perception failure from a composition failure. ``--prune-parts P`` shows
where a model's robustness to pruning sits: the test retention when only one part of the decoder
(attention, MLP, one block) is magnitude-pruned to sparsity P, beside the whole decoder.

    python -m atv_prune.builtin.diagnose [--model DIR] [--bench DIR] [--items N] [--prune-parts P]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ..algorithms.prune import magnitude_prune
from ..eval.run import retention_of
from ..model.layout import resolve
from ..model.loading import load_model
from . import BENCHMARK_DIR, CHECKPOINT_DIR, scenes
from .train import Encoder, data_image_layout, evaluate, load_split


def diagnostic_items(bench: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Items of each primitive on the scenes of the first ``n`` ``exist`` test items (``n`` each,
    fewer for ``relate``, which needs two objects), plus the first ``n`` ``spatial`` test items
    labelled by the axis they compare (``spatial-row``/``-col``)."""
    rng = random.Random(f"{seed}-diagnose")
    records = scenes.read_jsonl(bench / "test" / "exist.jsonl")[:n]
    asked = ((task, r["scene"], scenes.make_item(task, r["scene"], rng))
             for task in scenes.GROUNDING_TASKS for r in records)
    items = [{"task": task, "scene": scene, **item} for task, scene, item in asked if item is not None]
    for r in scenes.read_jsonl(bench / "test" / "spatial.jsonl")[:n]:
        vertical = " above " in r["question"] or " below " in r["question"]
        items.append({**r, "task": "spatial-row" if vertical else "spatial-col"})
    return items


def decoder_parts(n_blocks: int) -> dict[str, Callable[[int, str], bool]]:
    """Named parts of the decoder as predicates on (block index, linear name inside the block)."""
    parts: dict[str, Callable[[int, str], bool]] = {
        "all": lambda _i, _name: True,
        "attention": lambda _i, name: name.startswith("self_attn."),
        "mlp": lambda _i, name: name.startswith("mlp."),
    }
    for block in range(n_blocks):
        parts[f"block {block}"] = lambda i, _name, block=block: i == block
    return parts


def magnitude_prune_part(model: nn.Module, part: Callable[[int, str], bool], sparsity: float) -> int:
    """Magnitude-prune (the engine's method, row-wise) the decoder linears ``part`` selects; returns their count."""
    pruned = 0
    with torch.no_grad():
        for i, block in enumerate(resolve(model).blocks(model)):
            for name, linear in block.named_modules():
                if isinstance(linear, nn.Linear) and part(i, name):
                    linear.weight.copy_(magnitude_prune(linear.weight, None, sparsity, None))
                    pruned += 1
    return pruned


def part_retention(model: LlavaForConditionalGeneration, encoder: Encoder, items: list[dict[str, Any]],
                   sparsity: float) -> dict[str, dict[str, Any]]:
    """Retention (``retention_of``: per task and mean) with each decoder part pruned in turn; ``model``
    is restored to its dense weights afterwards."""
    dense_weights = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate(model, encoder, items)
    dense.pop("mean")
    results: dict[str, dict[str, Any]] = {}
    for name, part in decoder_parts(len(resolve(model).blocks(model))).items():
        try:
            if magnitude_prune_part(model, part, sparsity) == 0:
                raise ValueError(f"decoder part '{name}' holds no linear layer")
            accuracy = evaluate(model, encoder, items)
        finally:
            model.load_state_dict(dense_weights)
        accuracy.pop("mean")
        results[name] = retention_of(accuracy, dense)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=CHECKPOINT_DIR, help="trained built-in checkpoint")
    p.add_argument("--bench", type=Path, default=BENCHMARK_DIR, help="benchmark folder with test/")
    p.add_argument("--items", type=int, default=100,
                   help="items per primitive, and test items per task for --prune-parts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prune-parts", type=float, default=None, metavar="P",
                   help="also report test retention with one decoder part magnitude-pruned to sparsity P")
    args = p.parse_args(argv)
    if args.prune_parts is not None and not 0 < args.prune_parts < 1:
        p.error(f"--prune-parts {args.prune_parts} is outside (0, 1): pass e.g. 0.6 for 60%")
    for path, what in ((args.model / "training.json", "--model"), (args.bench / "test" / "exist.jsonl", "--bench")):
        if not path.exists():
            p.error(f"{what}: {path} not found; give a built-in checkpoint and a benchmark folder")
    torch.set_num_threads(args.threads)
    record = json.loads((args.model / "training.json").read_text())
    model, _ = load_model(args.model)  # strictly: a damaged checkpoint is refused, never partly random
    encoder = Encoder(AutoProcessor.from_pretrained(args.model), record["shape"]["patch_size"],
                      data_image_layout(record["data"]))
    accuracy: dict[str, Any] = evaluate(model, encoder, diagnostic_items(args.bench, args.items))
    accuracy.pop("mean")
    if args.prune_parts is not None:
        test = load_split(args.bench, "test", args.items)
        accuracy["retention"] = part_retention(model, encoder, test, args.prune_parts)
    print(json.dumps(accuracy, indent=1))
    return accuracy


if __name__ == "__main__":
    main()

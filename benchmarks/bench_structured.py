"""Benchmark structured pruning: prefill and decode speed, parameters and file size, dense vs pruned.

Builds each model once, prunes copies with ``wanda-sp --structure both`` at each ratio (heads by whole
key/value groups and MLP channels, floor per block), saves every variant with ``save_pretrained`` (file
size) and times greedy ``generate`` on a fixed prompt (one image + text, ``--prompt`` tokens in all) for
exactly ``--new`` new tokens. Variants alternate within every repeat (dense, 0.2, 0.3, 0.5, dense, ...),
so load on the machine falls on all alike. Prefill is the time to the first new token's logits (vision
tower included); decode is the median time of the decode steps after it (robust to a step slowed by
another process). Figures are medians over repeats, and a speed-up is the median over repeats of the
dense / pruned ratio measured within the same repeat (load that drifts between repeats cancels).
Each repeat also decodes all variants in **lockstep** — one greedy step of each variant in turn, with
its own KV cache — so that every variant's steps meet the same load within milliseconds; the
``lockstep x`` column is the ratio of the median step times over all repeats.

The ideal decode speed-up is ``1 / (1 - removed fraction of decoder FLOPs)``, with the FLOPs of one
decode step at the mean context: 2 x (block linear weights) + 4 x context x heads x head_dim per block
(scores and values), + 2 x LM head weights (not pruned).

    python benchmarks/bench_structured.py                                  # 97M LLaVA + built-in, CPU, 1 thread
    python benchmarks/bench_structured.py --models llava-97m --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atv_prune import PruneConfig, RunSettings, prune  # noqa: E402
from atv_prune.model.calibration import CalibrationSample, CalibrationSet, load_calibration  # noqa: E402
from atv_prune.model.layout import resolve  # noqa: E402
from atv_prune.model.loading import load_model_and_processor  # noqa: E402
from atv_prune.model.shrink import DecoderGeometry  # noqa: E402

BUILTIN = Path(__file__).resolve().parents[1] / "atv_prune" / "builtin"

#: A LLaVA-1.5-shaped model of about 100M parameters: CLIP tower (224 px, patch 32: 49 image tokens)
#: and a Llama decoder with 12 heads in 12 key/value groups (so 0.2 / 0.3 / 0.5 remove 2 / 3 / 6).
LLAVA_97M = dict(hidden=768, layers=6, intermediate=2048, heads=12, kv_heads=12, vocab=30000,
                 vision_hidden=384, vision_layers=4, vision_heads=6, image=224, patch=32)


def build_llava_97m(dtype: torch.dtype) -> Any:
    """The random-initialised LLaVA of :data:`LLAVA_97M` (seeded)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    s = LLAVA_97M
    config = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         intermediate_size=s["intermediate"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"], max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="clip_vision_model", hidden_size=s["vision_hidden"],
                           intermediate_size=4 * s["vision_hidden"], num_hidden_layers=s["vision_layers"],
                           num_attention_heads=s["vision_heads"], image_size=s["image"], patch_size=s["patch"],
                           projection_dim=s["hidden"]),
        image_token_index=s["vocab"] - 1, image_seq_length=(s["image"] // s["patch"]) ** 2)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()


def llava_inputs(model: Any, prompt: int, seed: int) -> dict[str, torch.Tensor]:
    """One image's placeholder tokens after a few text tokens, text up to ``prompt`` tokens in all."""
    config = model.config
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, config.text_config.vocab_size, (prompt - n_image,), generator=g)
    text[text == config.image_token_index] = 5  # ids below 5: pad, bos, eos and the built-in's special ones
    ids = torch.cat([text[:4], torch.full((n_image,), config.image_token_index), text[4:]]).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)}


def models_and_calibration(name: str, samples: int, prompt: int, dtype: torch.dtype
                           ) -> tuple[Any, CalibrationSet, dict[str, torch.Tensor]]:
    """The model, its calibration set and the timed prompt's inputs."""
    if name == "llava-97m":
        model = build_llava_97m(dtype)
        calibration = CalibrationSet([CalibrationSample(llava_inputs(model, prompt, seed=100 + i), f"synthetic:{i}")
                                      for i in range(samples)], "synthetic", samples, 0)
        return model, calibration, llava_inputs(model, prompt, seed=0)
    loaded = load_model_and_processor(BUILTIN / "checkpoint", dtype="float32", device="cpu")
    model = loaded.model.to(dtype)
    calibration = load_calibration(BUILTIN / "benchmark" / "calib.json", loaded.processor, samples=samples)
    return model, calibration, llava_inputs(model, prompt, seed=0)


class _Stamps(LogitsProcessor):
    """Records the time at which each step's logits reach the sampler (one call per new token)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def timed_generate(model: Any, inputs: dict[str, torch.Tensor], new: int, device: torch.device
                   ) -> tuple[float, float]:
    """Greedy ``generate`` of exactly ``new`` tokens: (prefill seconds, median decode-step seconds)."""
    stamps = _Stamps(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   logits_processor=LogitsProcessorList([stamps]), pad_token_id=0)
    steps = [later - earlier for earlier, later in zip(stamps.times, stamps.times[1:])]
    return stamps.times[0] - start, statistics.median(steps)


@torch.no_grad()
def lockstep_steps(models: list[Any], inputs: dict[str, torch.Tensor], new: int, device: torch.device
                   ) -> list[list[float]]:
    """Greedy decoding of every model in turn, one step each, from the same prompt; the seconds of
    each model's ``new - 1`` cached decode steps."""
    states = []
    for model in models:
        out = model(**inputs, use_cache=True)
        states.append((out.past_key_values, out.logits[:, -1:].argmax(-1), inputs["attention_mask"]))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(new - 1):
        for index, model in enumerate(models):
            cache, token, mask = states[index]
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[index].append(time.perf_counter() - start)
            states[index] = (out.past_key_values, token, mask)
    return times


def decode_flops(model: Any, context: float) -> float:
    """FLOPs of one decode step at ``context`` cached tokens (see the module docstring)."""
    layout = resolve(model)
    geometry = DecoderGeometry.of(model)
    flops = 0.0
    for block in layout.blocks(model):
        flops += 2 * sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        flops += 4 * context * geometry.heads * geometry.head_dim
    return flops + 2 * model.get_output_embeddings().weight.numel()


def saved_bytes(model: Any) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    base, calibration, inputs = models_and_calibration(name, args.samples, args.prompt, dtype)
    variants: dict[str, Any] = {"dense": base}
    for ratio in args.ratios:
        pruned = copy.deepcopy(base)
        prune(pruned, None, calibration, PruneConfig(method="wanda-sp", structure="both", ratio=ratio,
                                                     samples=args.samples),
              settings=RunSettings(device=args.device, progress=False))
        variants[f"{ratio:g}"] = pruned
    context = args.prompt + args.new / 2
    rows = []
    for label, model in variants.items():
        geometry = DecoderGeometry.of(model)
        rows.append(dict(model=name, variant=label, params=sum(p.numel() for p in model.parameters()),
                         file_bytes=saved_bytes(model), heads=geometry.heads, mlp=geometry.intermediate,
                         flops=decode_flops(model, context), prefill=[], decode=[], steps=[]))
    models = list(variants.values())
    for model in models:
        model.to(device)
        timed_generate(model, {k: v.to(device) for k, v in inputs.items()}, 4, device)  # warm-up
    on_device = {k: v.to(device) for k, v in inputs.items()}
    for repeat in range(args.repeats):
        for row, model in zip(rows, models):
            prefill, decode = timed_generate(model, on_device, args.new, device)
            row["prefill"].append(prefill)
            row["decode"].append(decode)
        for row, steps in zip(rows, lockstep_steps(models, on_device, args.new, device)):
            row["steps"].extend(steps)
        print(f"[{name} repeat {repeat + 1}/{args.repeats}] " + "  ".join(
            f"{r['variant']}: {1e3 * r['decode'][-1]:.2f} ms/tok" for r in rows), flush=True)
    dense = rows[0]
    for row in rows:
        row["ideal"] = dense["flops"] / row["flops"]
        row["speedup"] = statistics.median(d / v for d, v in zip(dense["decode"], row["decode"]))
        row["prefill_speedup"] = statistics.median(d / v for d, v in zip(dense["prefill"], row["prefill"]))
        row["lockstep_speedup"] = statistics.median(dense["steps"]) / statistics.median(row["steps"])
    for row in rows:
        row["prefill_s"] = statistics.median(row["prefill"])
        row["decode_s"] = statistics.median(row["decode"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["llava-97m", "builtin"], default=["llava-97m", "builtin"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (image tokens included)")
    parser.add_argument("--new", type=int, default=64, help="new tokens generated")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples for the pruning")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [row for name in args.models for row in bench_model(name, args)]
    load_after = os.getloadavg()

    print(f"\n{args.device} {args.dtype}, {args.threads} thread(s), prompt {args.prompt} tokens (one image), "
          f"{args.new} new tokens, greedy, median of {args.repeats}; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} (1 min)")
    header = (f"{'model':10s} {'ratio':>6s} {'params M':>9s} {'file MB':>8s} {'heads':>5s} {'MLP':>5s} "
              f"{'prefill ms':>10s} {'prefill tok/s':>13s} {'prefill x':>9s} {'decode ms/tok':>13s} "
              f"{'decode tok/s':>12s} {'decode x':>8s} {'lockstep x':>10s} {'ideal':>6s} {'of ideal':>8s}")
    print(header)
    for row in rows:
        print(f"{row['model']:10s} {row['variant']:>6s} {row['params'] / 1e6:9.2f} {row['file_bytes'] / 1e6:8.2f} "
              f"{row['heads']:5d} {row['mlp']:5d} {1e3 * row['prefill_s']:10.2f} "
              f"{args.prompt / row['prefill_s']:13.1f} {row['prefill_speedup']:9.3f} {1e3 * row['decode_s']:13.3f} "
              f"{1 / row['decode_s']:12.1f} {row['speedup']:8.3f} {row['lockstep_speedup']:10.3f} "
              f"{row['ideal']:6.3f} {row['speedup'] / row['ideal']:8.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "load_average": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
    main()

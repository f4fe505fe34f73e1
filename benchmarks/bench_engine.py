"""Benchmark the pruning engine: wall time and peak memory of magnitude, Wanda and ATV.

Builds a random-initialised Qwen2-VL of a chosen size from its config,
synthesises calibration samples (image + caption-length text), and runs each method in a
fresh subprocess so peak memory is per method. Runs alternate between methods (A/B/A/B) and
the ratio ATV/Wanda is printed from medians measured in this one run.

    python benchmarks/bench_engine.py                       # >=100M-param Qwen2-VL, 32 samples, CPU fp32
    python benchmarks/bench_engine.py --size 7b --device cuda --dtype bfloat16 --samples 128
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atv_prune import PruneConfig, RunSettings, prune  # noqa: E402
from benchmarks.synthetic import qwen2_vl_samples  # noqa: E402

# Shapes: "small" is a >=100M-parameter model for CPU runs; "7b" follows Qwen2-VL-7B.
SIZES = {
    "small": dict(hidden=768, layers=8, intermediate=2048, heads=12, kv_heads=4, vocab=32000,
                  vision_hidden=384, vision_layers=4, vision_heads=6),
    "7b": dict(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
               vision_hidden=1280, vision_layers=32, vision_heads=16),
}


def build_qwen2_vl(size: dict, dtype: torch.dtype):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    eighth = size["hidden"] // size["heads"] // 8  # mrope sections sum to head_dim / 2, as in Qwen2-VL
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                         intermediate_size=size["intermediate"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"], bos_token_id=1, eos_token_id=2,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[eighth, 3 * eighth // 2, 3 * eighth // 2])),
        vision_config=dict(depth=size["vision_layers"], embed_dim=size["vision_hidden"],
                           hidden_size=size["hidden"], num_heads=size["vision_heads"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=size["vocab"] - 3, video_token_id=size["vocab"] - 2, vision_start_token_id=size["vocab"] - 4,
        vision_end_token_id=size["vocab"] - 5,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: a 7B model in fp32 needs 30 GB
    try:
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(args: argparse.Namespace, method: str, queue: mp.Queue) -> None:
    """Build the model, prune it with one method, report figures (runs in a subprocess)."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model = build_qwen2_vl(SIZES[args.size], dtype)
    calibration = qwen2_vl_samples(model.config, args.samples, args.text_tokens, args.grid)
    baseline = _peak_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    name, _, pool = method.partition(":")
    config = PruneConfig(method=name, pool=pool or None, sparsity=0.5, samples=args.samples)
    start = time.perf_counter()
    report = prune(model, None, calibration, config, settings=RunSettings(device=args.device, progress=False))
    wall = time.perf_counter() - start
    queue.put(dict(method=method, wall_s=wall, peak_bytes=_peak_bytes(device), baseline_bytes=baseline,
                   params=sum(p.numel() for p in model.parameters()), seconds=report.seconds,
                   sparsity=report.sparsity["overall"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=160, help="text tokens per sample (caption length)")
    parser.add_argument("--grid", type=int, default=32, help="image patches per side (visual tokens = grid^2/4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per method, interleaved")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "atv"],
                        help="METHOD or METHOD:POOL, e.g. wanda atv sparsegpt tamp wanda:amia")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            queue = context.Queue()
            process = context.Process(target=run_one, args=(args, method, queue))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise SystemExit(f"{method} run failed (exit code {process.exitcode})")
            result = queue.get()
            runs[method].append(result)
            print(f"[run {repeat + 1}/{args.repeats}] {method:9s} {result['wall_s']:8.2f} s  "
                  f"peak {result['peak_bytes'] / 2**30:6.2f} GiB", flush=True)

    params = runs[args.methods[0]][0]["params"]
    print(f"\nQwen2-VL '{args.size}' ({params / 1e6:.1f}M params), {args.samples} samples, "
          f"{args.text_tokens} text + {args.grid ** 2 // 4} visual tokens each, {args.device} {args.dtype}, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'method':10s} {'wall s':>8s} {'capture':>8s} {'stats':>8s} {'masks':>8s} {'propag.':>8s} "
          f"{'peak GiB':>9s} {'over model GiB':>15s}")
    medians = {}
    for method, results in runs.items():
        medians[method] = statistics.median(r["wall_s"] for r in results)
        secs = {k: statistics.median(r["seconds"].get(k, 0.0) for r in results)
                for k in ("capture", "statistics", "masks", "propagation")}
        peak = max(r["peak_bytes"] for r in results) / 2**30
        over = max(r["peak_bytes"] - r["baseline_bytes"] for r in results) / 2**30
        print(f"{method:10s} {medians[method]:8.2f} {secs['capture']:8.2f} {secs['statistics']:8.2f} "
              f"{secs['masks']:8.2f} {secs['propagation']:8.2f} {peak:9.2f} {over:15.2f}")
    if "wanda" in medians:
        for method, target in (("atv", "target <= 1.10; the authors' code: 1.35"),
                               ("tamp", "target <= 2; the paper: 19"), ("wanda:amia", "TAMP's AMIA alone"),
                               ("sparsegpt", "the paper: 9.0")):
            if method in medians:
                print(f"{method} / wanda wall-time ratio: {medians[method] / medians['wanda']:.3f} ({target})")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

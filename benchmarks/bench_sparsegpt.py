"""Benchmark SparseGPT's shared factorisation: one decoder block, factor per input group vs per weight.

q/k/v read the same input, as do gate/up, so the engine factorises the damped inverse Hessian once
per input group (``prepare_hessian``, 4 factorisations per block) instead of once per weight (7).
This script prunes one block's seven weights both ways on random activations, alternating the two
(A/B/A/B), checks that they give the same weights, and prints median times and their ratio.

    python benchmarks/bench_sparsegpt.py                                  # 768/2048 block, CPU fp32
    python benchmarks/bench_sparsegpt.py --size 7b --device cuda          # Qwen2-VL-7B block shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atv_prune.algorithms.sparsegpt import hessian_update, prepare_hessian, sparsegpt_prune  # noqa: E402

# (hidden, intermediate, heads, kv_heads): "small" matches bench_engine's CPU model, "7b" Qwen2-VL-7B.
SIZES = {"small": (768, 2048, 12, 4), "7b": (3584, 18944, 28, 4)}


def block_weights(hidden: int, intermediate: int, heads: int, kv_heads: int,
                  device: str) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """One decoder block's weights grouped by the input they read."""
    kv = hidden // heads * kv_heads
    shapes = {"attn_in": [("q", hidden), ("k", kv), ("v", kv)], "attn_out": [("o", hidden)],
              "mlp_in": [("gate", intermediate), ("up", intermediate)], "mlp_out": [("down", hidden)]}
    inputs = {"attn_in": hidden, "attn_out": hidden, "mlp_in": hidden, "mlp_out": intermediate}
    return {group: [(name, torch.randn(rows, inputs[group], device=device) / inputs[group] ** 0.5)
                    for name, rows in members] for group, members in shapes.items()}


def prune_block(weights: dict[str, list[tuple[str, torch.Tensor]]], hessians: dict[str, torch.Tensor],
                sparsity: float, shared: bool) -> dict[str, torch.Tensor]:
    """Prune every weight; ``shared`` factorises once per input group, otherwise once per weight."""
    pruned = {}
    for group, members in weights.items():
        factor = prepare_hessian(hessians[group])[1] if shared else None
        for name, weight in members:
            pruned[name] = sparsegpt_prune(weight, hessians[group], sparsity, factor=factor)[0]
    return pruned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind each Hessian")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    weights = block_weights(*SIZES[args.size], args.device)
    hessians = {group: 2 / args.tokens * hessian_update(torch.randn(args.tokens, members[0][1].shape[1],
                                                                     device=args.device))
                for group, members in weights.items()}

    def timed_call(call: Callable[[], Any]) -> tuple[float, Any]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = call()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    def timed(shared: bool) -> tuple[float, dict[str, torch.Tensor]]:
        return timed_call(lambda: prune_block(weights, hessians, args.sparsity, shared))

    times: dict[bool, list[float]] = {True: [], False: []}
    factor_times: dict[str, list[float]] = {group: [] for group in weights}
    results: dict[bool, dict[str, torch.Tensor]] = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            seconds, results[shared] = timed(shared)
            times[shared].append(seconds)
        for group in weights:
            factor_times[group].append(timed_call(lambda hessian=hessians[group]: prepare_hessian(hessian))[0])
    same = all(torch.equal(results[True][name], results[False][name]) for name in results[True])
    factor = {group: statistics.median(seconds) for group, seconds in factor_times.items()}
    all_factors = sum(factor[group] * len(members) for group, members in weights.items())
    per_weight, per_group = statistics.median(times[False]), statistics.median(times[True])
    shapes = ", ".join(f"{n} {tuple(w.shape)}" for m in weights.values() for n, w in m)
    print(f"SparseGPT, one {args.size} block ({shapes}), "
          f"{args.tokens} tokens, {args.sparsity:.0%}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}:")
    print(f"  factor per weight (7 factorisations): {per_weight:.2f} s")
    print(f"  factor per input group (4):          {per_group:.2f} s")
    print(f"  ratio per-group / per-weight: {per_group / per_weight:.2f}; identical weights: {same}")
    print(f"  the 7 factorisations alone: {all_factors:.2f} s ({all_factors / per_weight:.0%} of the per-weight "
          f"time); one per input group: {', '.join(f'{g} {t:.3f} s' for g, t in factor.items())}")


if __name__ == "__main__":
    main()

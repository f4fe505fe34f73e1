"""Benchmark SparseGPT on one decoder block: the shared factorisation, and the column loop.

``--compare factor`` (the default): q/k/v read the same input, as do gate/up, so the engine
factorises the damped inverse Hessian once per input group (``prepare_hessian``, 4 factorisations
per block) instead of once per weight (7). ``--compare loop``: the engine's column loop
(``sparsegpt_prune``: transposed blocks, four tensor operations per column) against the paper's
row-major loop (``tests/sparsegpt_reference.py``), both with the shared factors (so both times
include the factorisations and the mask selection). Either way the script prunes one block's seven
weights both ways on random activations, alternating the two (A/B/A/B), checks that weights and
masks are bit-identical, and prints median times and their ratio.

    python benchmarks/bench_sparsegpt.py                                  # 768/2048 block, CPU fp32
    python benchmarks/bench_sparsegpt.py --compare loop --pattern 2:4     # the column loop, 2:4
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atv_prune.algorithms.sparsegpt import hessian_update, prepare_hessian, sparsegpt_prune  # noqa: E402
from atv_prune.errors import ConfigError  # noqa: E402
from atv_prune.runs.config import parse_pattern  # noqa: E402

Loop = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Pruned = dict[str, tuple[torch.Tensor, torch.Tensor]]

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
                target: dict[str, Any], shared: bool, loop: Loop = sparsegpt_prune) -> Pruned:
    """``(new weight, mask)`` of every weight by ``loop``; ``shared`` factorises once per input
    group, otherwise once per weight. ``target`` is ``{"sparsity": s}`` or ``{"pattern": (n, m)}``."""
    pruned = {}
    for group, members in weights.items():
        factor = prepare_hessian(hessians[group])[1] if shared else None
        for name, weight in members:
            pruned[name] = loop(weight, hessians[group], factor=factor, **target)
    return pruned


def bit_identical(first: Pruned, second: Pruned) -> bool:
    """Every weight equal bit for bit (signed zeros included) and every mask equal."""
    return all(torch.equal(first[name][0].view(torch.int32), second[name][0].view(torch.int32))
               and torch.equal(first[name][1], second[name][1]) for name in first)


def nm_pattern(text: str) -> tuple[int, int]:
    """``--pattern``'s ``N:M`` with ``0 < N < M``."""
    try:
        n, m = parse_pattern(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"pattern '{text}' needs 0 < N < M")
    return n, m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=("factor", "loop"), default="factor",
                   help="factor: per input group vs per weight; loop: the engine's column loop vs the paper's")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind each Hessian")
    target_group = p.add_mutually_exclusive_group()
    target_group.add_argument("--sparsity", type=float, default=0.5)
    target_group.add_argument("--pattern", type=nm_pattern, help="N:M instead of --sparsity, e.g. 2:4")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.pattern is not None:
        target: dict[str, Any] = {"pattern": args.pattern}
        target_name = "{}:{}".format(*args.pattern)
    else:
        target, target_name = {"sparsity": args.sparsity}, f"{args.sparsity:.0%}"
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

    if args.compare == "factor":
        variants = {"factor per weight (7 factorisations)": (False, sparsegpt_prune),
                    "factor per input group (4)": (True, sparsegpt_prune)}
    else:
        sys.path.append(str(ROOT / "tests"))
        from sparsegpt_reference import textbook_sparsegpt

        variants = {"the paper's column loop": (True, textbook_sparsegpt),
                    "the engine's column loop": (True, sparsegpt_prune)}
    times: dict[str, list[float]] = {label: [] for label in variants}
    results: dict[str, Pruned] = {}
    factor_times: dict[str, list[float]] = {group: [] for group in weights}
    for _ in range(args.repeats):
        for label, (shared, loop) in variants.items():
            seconds, results[label] = timed_call(
                lambda shared=shared, loop=loop: prune_block(weights, hessians, target, shared, loop))
            times[label].append(seconds)
        if args.compare == "factor":
            for group in weights:
                factor_times[group].append(timed_call(lambda hessian=hessians[group]: prepare_hessian(hessian))[0])
    before, after = variants
    same = bit_identical(results[before], results[after])
    medians = {label: statistics.median(seconds) for label, seconds in times.items()}
    shapes = ", ".join(f"{name} {tuple(weight.shape)}" for members in weights.values() for name, weight in members)
    print(f"SparseGPT, one {args.size} block ({shapes}), "
          f"{args.tokens} tokens, {target_name}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}:")
    width = max(map(len, medians)) + 1
    for label, seconds in medians.items():
        print(f"  {label + ':':<{width}} {seconds:.2f} s")
    print(f"  ratio {after} / {before}: {medians[after] / medians[before]:.2f}; "
          f"weights and masks bit-identical: {same}")
    if args.compare == "factor":
        factor = {group: statistics.median(seconds) for group, seconds in factor_times.items()}
        all_factors = sum(factor[group] * len(members) for group, members in weights.items())
        print(f"  the 7 factorisations alone: {all_factors:.2f} s ({all_factors / medians[before]:.0%} of the "
              f"per-weight time); one per input group: {', '.join(f'{g} {t:.3f} s' for g, t in factor.items())}")


if __name__ == "__main__":
    main()

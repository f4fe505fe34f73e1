"""Masks by selection against the stable sort they replaced, side by side, on one CPU thread.

For each weight shape (those of a 7B decoder block's linears by default, divided by ``--scale``),
times the unstructured 50% mask and the 2:4 mask made (a) by a full stable ``torch.sort`` of every
row / group, as before, and (b) by :func:`atv_prune.algorithms.masks.lowest_mask` /
:func:`~atv_prune.algorithms.masks.nm_mask`, alternating, and checks the masks are equal.

    python benchmarks/bench_masks.py --scale 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atv_prune.algorithms.masks import lowest_mask, nm_mask  # noqa: E402

#: (rows, columns) of q/o, k/v, gate/up and down in a Llama-2-7B block.
SHAPES = ((4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008))


def sorted_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def sorted_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True).reshape(rows, cols)


def _time(function, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=2, help="divide every dimension by this")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':>12s} {'target':>6s} {'sort s':>8s} {'select s':>9s} {'speed-up':>8s}")
    totals = {"sort": 0.0, "select": 0.0}
    for rows, cols in SHAPES:
        rows, cols = rows // args.scale, cols // args.scale
        scores = torch.randn(rows, cols, generator=g).abs() * torch.rand(cols, generator=g)  # Wanda-like
        for target, old, new in (("50%", lambda s: sorted_mask(s, s.shape[1] // 2),
                                  lambda s: lowest_mask(s, s.shape[1] // 2)),
                                 ("2:4", lambda s: sorted_nm(s, 2, 4), lambda s: nm_mask(s, 2, 4))):
            times: dict[str, list[float]] = {"sort": [], "select": []}
            for _ in range(args.repeats):
                t_old, a = _time(old, scores)
                t_new, b = _time(new, scores)
                assert torch.equal(a, b), "the selection differs from the stable sort"
                times["sort"].append(t_old)
                times["select"].append(t_new)
            sort, select = statistics.median(times["sort"]), statistics.median(times["select"])
            totals["sort"] += sort
            totals["select"] += select
            print(f"{rows:>5d}x{cols:<6d} {target:>6s} {sort:8.3f} {select:9.3f} {sort / select:7.1f}x")
    print(f"{'all':>12s} {'':>6s} {totals['sort']:8.3f} {totals['select']:9.3f} "
          f"{totals['sort'] / totals['select']:7.1f}x   (medians of {args.repeats}; masks equal)")


if __name__ == "__main__":
    main()

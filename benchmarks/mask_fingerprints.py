"""Fingerprints of the pruned weights for every family x method x pool x target on the tiny models.

Prints (or writes with ``--out``) one sha256 per cell over every decoder weight after pruning, and
with ``--compare FILE`` checks them against an earlier run: the proof that a refactor of the engine
changes no mask and no SparseGPT update. Run it before and after a change, on the same machine:

    python benchmarks/mask_fingerprints.py --out before.json      # on the old commit
    python benchmarks/mask_fingerprints.py --compare before.json  # on the new one

It uses only the public API (``atv_prune.prune``, ``PruneConfig``, ``RunSettings``, ``CalibrationSet``)
and the MoT probe (``motprobe.make_probe`` / ``prune_pathway``). The fingerprints of 2b561b9 (before
the package was layered) were reproduced exactly by d6e7bbc (288 cells).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from atv_prune import CalibrationSample, CalibrationSet, PruneConfig, RunSettings, prune  # noqa: E402
from tiny_models import FAMILY_NAMES, build_tiny_model, make_inputs  # noqa: E402

#: (method, pool) pairs covering every method and every pool.
METHOD_POOLS: tuple[tuple[str, str | None], ...] = (
    ("magnitude", None), ("wanda", "mixed"), ("wanda", "text"), ("wanda", "visual"),
    ("atv", "atv"), ("atv", "drift-fixed"), ("atv", "random"), ("atv", "random-fixed"), ("atv", "abs"),
    ("atv", "abs-fixed"), ("atv", "abs-rel"), ("atv", "abs-rel-fixed"), ("atv", "dbs"), ("atv", "dbs-fixed"),
    ("sparsegpt", "mixed"), ("sparsegpt", "atv"),
    ("tamp", "amia"),
)
QUIET = RunSettings(progress=False)
TARGETS: tuple[dict, ...] = ({"sparsity": 0.5, "pattern": None}, {"sparsity": None, "pattern": (2, 4)})


def _calibration(model: nn.Module, family: str) -> CalibrationSet:
    samples = [CalibrationSample(make_inputs(model, family, seed=i, n_text=10 + 3 * i), f"tiny:{i}")
               for i in range(4)]
    return CalibrationSet(samples, "in-memory", 4, 0)


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _config(method: str, pool: str | None, target: dict) -> PruneConfig:
    allocation = "uniform" if method == "tamp" and target["pattern"] is not None else None
    return PruneConfig(method=method, pool=pool, allocation=allocation, seed=0, **target)


def fingerprints() -> dict[str, str]:
    """Cell label -> fingerprint of the pruned model."""
    from motprobe import make_probe, prune_pathway

    torch.set_num_threads(1)
    results = {}
    for family in FAMILY_NAMES:
        model = build_tiny_model(family, seed=0)
        calibration = _calibration(model, family)
        for method, pool in METHOD_POOLS:
            for target in TARGETS:
                pruned = copy.deepcopy(model)
                config = _config(method, pool, target)
                prune(pruned, None, calibration, config, settings=QUIET)
                results[f"{family} {method}:{pool} {config.target_label}"] = _fingerprint(pruned)
        for pathway in ("text", "visual"):
            probe = copy.deepcopy(model)
            make_probe(probe)
            prune_pathway(probe, None, calibration, _config("wanda", "text", TARGETS[0]), pathway, settings=QUIET)
            results[f"{family} probe-{pathway}:text 50%"] = _fingerprint(probe)
        print(f"{family}: done", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Write the fingerprints here (JSON).")
    parser.add_argument("--compare", type=Path, help="Compare with fingerprints written earlier.")
    args = parser.parse_args()
    results = fingerprints()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = sorted(k for k in before.keys() | results.keys() if before.get(k) != results.get(k))
        print(f"{len(results)} cells, {len(differ)} differ" + (": " + ", ".join(differ[:20]) if differ else ""))
        sys.exit(1 if differ else 0)
    if not args.out:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

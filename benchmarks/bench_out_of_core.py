"""Out-of-core pruning, measured: peak host memory of streamed pruning against the checkpoint's size.

``build`` writes a random-initialised Qwen2-VL-class checkpoint (fp32, so that the CPU computes in
the checkpoint's own dtype) in 1 GB shards; the default ``4gb`` size has 24 decoder blocks of
hidden 2048 / MLP 5632 (a 1.27B-parameter model, 5.1 GB on disk). ``run`` prunes it with each
method in a fresh process (one thread, one malloc arena) under a hard memory cap smaller than the
checkpoint: a memory cgroup of its own (``memory.max`` in cgroup v2 where the memory controller
is available, else ``memory.limit_in_bytes`` in cgroup v1; needs write access to the process's
cgroup), which kills the process when its resident memory (page cache included, reclaimed first)
would exceed the cap. An address-space cap (``ulimit -v`` / RLIMIT_AS, or RLIMIT_DATA) cannot be
used: transformers' ``from_pretrained`` maps every shard file into the address space while it
loads the non-block weights, so the address space reaches the checkpoint's size though the block
weights are never read then. It prints, per method, the peak resident memory (VmHWM) beside the
formula

    Python + torch after imports + non-block weights + 2 decoder blocks + calibration activations kept

(all in the compute dtype), the wall time (per phase in each run's JSON line) and whether the
in-memory path fits under the same cap. Calibration: synthetic samples (one image of ``grid x grid``
patches plus text).

    python benchmarks/bench_out_of_core.py build --out /work/runs/ooc/ckpt
    python benchmarks/bench_out_of_core.py run --checkpoint /work/runs/ooc/ckpt --cap 3GB \\
        --methods wanda atv sparsegpt --memory-check --json /work/runs/ooc/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import qwen2_vl_samples  # noqa: E402

#: Text-model shapes; "4gb" is what docs/benchmark.md reports, "small" checks the script in seconds.
SIZES = {
    "4gb": dict(hidden=2048, layers=24, intermediate=5632, heads=16, kv_heads=4, vocab=32000,
                vision_hidden=768, vision_layers=6, vision_heads=12),
    "small": dict(hidden=256, layers=4, intermediate=704, heads=4, kv_heads=2, vocab=4000,
                  vision_hidden=128, vision_layers=2, vision_heads=4),
}


def _config(size: dict):
    from transformers import Qwen2VLConfig

    eighth = size["hidden"] // size["heads"] // 8  # mrope sections sum to head_dim / 2, as in Qwen2-VL
    return Qwen2VLConfig(
        text_config=dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                         intermediate_size=size["intermediate"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"], bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[eighth, 3 * eighth // 2, 3 * eighth // 2])),
        vision_config=dict(depth=size["vision_layers"], embed_dim=size["vision_hidden"], hidden_size=size["hidden"],
                           num_heads=size["vision_heads"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=size["vocab"] - 3, video_token_id=size["vocab"] - 2, vision_start_token_id=size["vocab"] - 4,
        vision_end_token_id=size["vocab"] - 5, tie_word_embeddings=False,
    )


def build(args: argparse.Namespace) -> None:
    """Write the checkpoint (random init, seed 0) in fp32 shards of ``--shard-size``."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(_config(SIZES[args.size])).eval()
    model.save_pretrained(args.out, max_shard_size=args.shard_size)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{size / 1e9:.2f} GB in {len(list(Path(args.out).glob('*.safetensors')))} shards")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def one(args: argparse.Namespace) -> None:
    """One pruning run (in the capped child process): prints its figures as one JSON line."""
    import tempfile

    import torch
    import transformers  # noqa: F401 - imported before the baseline is read: it is part of it

    from atv_prune import PruneConfig, RunSettings, prune_checkpoint
    from atv_prune.model.layout import resolve
    from atv_prune.model.loading import model_skeleton, read_config
    from atv_prune.model.streaming import block_bytes, model_bytes
    from atv_prune.runs import checkpoint  # noqa: F401 - the pruning code, imported before the baseline

    torch.set_num_threads(1)
    model_skeleton(args.checkpoint)  # transformers' model classes, imported on first use
    baseline = _status("VmRSS")
    config = read_config(args.checkpoint)
    skeleton = model_skeleton(args.checkpoint)
    blocks = resolve(skeleton).blocks(skeleton)
    block = block_bytes(blocks, torch.float32)
    non_block = model_bytes(skeleton, torch.float32) - model_bytes(blocks, torch.float32)
    calibration = qwen2_vl_samples(config, args.samples, args.text_tokens, args.grid)
    settings = RunSettings(device="cpu", load=args.load, progress=False, activation_memory=args.activation_memory)
    out = Path(tempfile.mkdtemp(prefix="ooc-", dir=args.scratch)) / "pruned"
    anonymous = [0]
    stop = threading.Event()

    def sample() -> None:  # the anonymous part of the resident set (file pages can be reclaimed)
        while not stop.wait(0.05):
            anonymous[0] = max(anonymous[0], _status("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = prune_checkpoint(args.checkpoint, out, calibration, PruneConfig(method=args.method, sparsity=0.5),
                              settings=settings, dtype="float32")
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    subprocess.run(["rm", "-rf", str(out.parent)], check=True)
    print(json.dumps(dict(
        method=args.method, load=report.settings["load"], wall_s=wall, peak_rss=_status("VmHWM"),
        peak_anonymous=anonymous[0],
        peak_vm=_status("VmPeak"), baseline_rss=baseline, non_block_bytes=non_block, block_bytes=block,
        activations_kept=report.memory["activations_kept_bytes"],
        activations_spilled=report.memory["activations_spilled_bytes"], seconds=report.seconds,
        sparsity=report.sparsity["overall"], output_bytes=output_bytes)))


def _memory_cgroup() -> tuple[Path, str, str]:
    """This process's memory cgroup folder and the names of its limit and peak-usage files
    (cgroup v2 where the memory controller is enabled there, else v1)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        v2 = Path("/sys/fs/cgroup") / path.lstrip("/")
        if controllers == "" and "memory" in (v2 / "cgroup.controllers").read_text().split():
            return v2, "memory.max", "memory.peak"
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes", \
                "memory.max_usage_in_bytes"
    raise SystemExit("no memory cgroup found for this process: run without --cap")


def _child(args: argparse.Namespace, method: str, load: str, cap: str | None) -> dict:
    """One run in a fresh process, under ``cap`` in a child memory cgroup made for it."""
    from atv_prune.model.memory import parse_size

    command = [sys.executable, __file__, "one", "--checkpoint", str(args.checkpoint), "--method", method,
               "--load", load, "--samples", str(args.samples), "--text-tokens", str(args.text_tokens),
               "--grid", str(args.grid), "--scratch", str(args.scratch)]
    if args.activation_memory:
        command += ["--activation-memory", args.activation_memory]
    group = None
    if cap is not None:
        parent, limit_file, _ = _memory_cgroup()
        group = parent / f"atv-prune-bench-{os.getpid()}"
        group.mkdir()
        (group / limit_file).write_text(str(parse_size(cap, "--cap")))
        command = ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "capped", *command]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1", PYTHONUNBUFFERED="1")
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if group is not None:
            group.rmdir()
    if result.returncode != 0:
        tail = " | ".join(line for line in result.stderr.strip().splitlines()[-3:])
        killed = " (killed: the cap was reached)" if result.returncode in (-9, 137) else ""
        return dict(method=method, load=load, failed=True, returncode=result.returncode,
                    error=(tail[-400:] or "no output") + killed)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    gib = 2 ** 30
    size = sum(f.stat().st_size for f in Path(args.checkpoint).glob("*.safetensors"))
    print(f"checkpoint {args.checkpoint}: {size / gib:.2f} GiB on disk; cap (memory cgroup) {args.cap}; "
          f"{args.samples} samples of {args.text_tokens} text + {args.grid ** 2 // 4} visual tokens; 1 thread",
          flush=True)
    results = []
    for method in args.methods:
        result = _child(args, method, "stream", args.cap)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.memory_check:
        result = _child(args, args.methods[0], "memory", args.cap)
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{'method':10s} {'load':7s} {'wall s':>8s} {'I/O s':>7s} {'peak RSS GiB':>13s} {'anon GiB':>9s} "
          f"{'formula GiB':>12s} {'VmPeak GiB':>11s} {'checkpoint GiB':>15s} {'peak/ckpt':>9s}")
    for r in results:
        if r.get("failed"):
            print(f"{r['method']:10s} {r['load']:7s} failed under the cap (exit {r['returncode']}): {r['error']}")
            continue
        formula = r["baseline_rss"] + r["non_block_bytes"] + 2 * r["block_bytes"] + r["activations_kept"]
        io = sum(r["seconds"].get(k, 0) for k in ("load_model", "read_blocks", "write_blocks", "save"))
        print(f"{r['method']:10s} {r['load']:7s} {r['wall_s']:8.1f} {io:7.1f} {r['peak_rss'] / gib:13.2f} "
              f"{r['peak_anonymous'] / gib:9.2f} "
              f"{formula / gib:12.2f} {r['peak_vm'] / gib:11.2f} {size / gib:15.2f} {r['peak_rss'] / size:9.2f}")
    first = next((r for r in results if not r.get("failed")), None)
    if first is not None:
        print(f"\nformula = Python+torch after imports {first['baseline_rss'] / gib:.2f} + non-block weights "
              f"{first['non_block_bytes'] / gib:.2f} + 2 x block {first['block_bytes'] / gib:.3f} + activations kept "
              f"{first['activations_kept'] / gib:.3f} GiB (fp32)")
    if args.json:
        args.json.write_text(json.dumps(dict(checkpoint_bytes=size, cap=args.cap, results=results), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the random-initialised checkpoint")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--size", choices=list(SIZES), default="4gb")
    make.add_argument("--shard-size", default="1GB")
    for name in ("run", "one"):
        sub = commands.add_parser(name, help="prune it under the cap" if name == "run" else argparse.SUPPRESS)
        sub.add_argument("--checkpoint", type=Path, required=True)
        sub.add_argument("--samples", type=int, default=8)
        sub.add_argument("--text-tokens", type=int, default=96)
        sub.add_argument("--grid", type=int, default=16, help="image patches per side (visual tokens = grid^2/4)")
        sub.add_argument("--activation-memory", default=None, help="--activation-memory of the runs")
        sub.add_argument("--scratch", type=Path, default=Path("/tmp"), help="where the pruned outputs go")
        if name == "run":
            sub.add_argument("--cap", default="3GB", help="memory cap of every run (a memory cgroup of its own)")
            sub.add_argument("--methods", nargs="+", default=["wanda", "atv", "sparsegpt"])
            sub.add_argument("--memory-check", action="store_true",
                             help="also try the in-memory path under the same cap (expected to fail)")
            sub.add_argument("--json", type=Path, default=None)
        else:
            sub.add_argument("--method", required=True)
            sub.add_argument("--load", default="stream")
    args = parser.parse_args()
    {"build": build, "run": run, "one": one}[args.command](args)


if __name__ == "__main__":
    main()

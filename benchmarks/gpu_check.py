"""The first GPU run: 7-8B-shaped VLMs pruned on one GPU, timed and measured (``gpu_check.sh`` runs it).

For each shape (LLaVA-NeXT-8B: Llama-3-8B decoder + CLIP-L/336 anyres; Qwen2-VL-7B), a
random-initialised model is built in bf16 (on the GPU, then kept in host memory), and:

1. the runs: ATV, Wanda and SparseGPT at 50% and 2:4 on ``--samples`` calibration samples of
   LLaVA-NeXT-sized token counts (~2,900 visual + ~100 text), each from a fresh copy of the dense
   model, blocks moved to the GPU one at a time, activations waiting in (pinned) host memory.
   Printed per run: wall time per phase, peak GPU memory (allocator) while the blocks are walked,
   against one block + one sample's hidden states + 2 GB, and while capturing (vision tower and
   embeddings on the GPU), and peak host memory (VmHWM, reset per run where the kernel lets us)
   with what the run added to the models the script holds (its pinned activations, scratch).
2. block-0 masks agreement: the shape cut to one decoder block is pruned on the GPU in bf16 and
   on the CPU in fp32 (the path every figure so far comes from), from the same 4 small samples;
   the share of weights whose pruned/kept state agrees is printed per method (at 50%).

Each method's 50% runs on every shape come first, then its agreement check, then the 2:4 runs;
none starts once its estimate would pass ``--budget`` (the ones left out are named). The estimate
is 1.2 x the longest such task of the same method so far, else of any method, so a method's
first task can overrun: SparseGPT 50% on the LLaVA-NeXT-8B shape had not finished after about
300 s on an H200 (docs/benchmark.md). ``--only`` makes some of the runs (e.g. those a first call
had to leave out), and ``--layers`` cuts the decoders to fewer blocks, for runs too slow for a
call with every block.

Figures go to stdout and, with ``--out DIR``, to ``DIR/gpu_check.json``, rewritten after every run
(so a call stopped at its time limit keeps the figures of the runs it finished). ``--tiny`` uses tiny
shapes and 4 samples (what the test suite runs on the CPU with ``--device cpu --tiny``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atv_prune import CalibrationSample, CalibrationSet, PruneConfig, RunSettings, prune  # noqa: E402
from atv_prune.model.layout import resolve  # noqa: E402
from atv_prune.model.streaming import block_bytes  # noqa: E402

#: (name, full shapes, tiny shapes). Full shapes follow the published configs of
#: llava-hf/llama3-llava-next-8b-hf and Qwen/Qwen2-VL-7B-Instruct.
SHAPES = {
    "llava_next_8b": {
        "full": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128320,
                     vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096, tile=336,
                     patch=14, text=100),
        "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=512, vision_hidden=32,
                     vision_layers=2, vision_heads=2, vision_intermediate=64, tile=28, patch=14, text=12),
    },
    "qwen2_vl_7b": {
        "full": dict(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
                     vision_hidden=1280, vision_layers=32, vision_heads=16, grid=108, text=100),
        "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=512, vision_hidden=32,
                     vision_layers=2, vision_heads=2, grid=8, text=12),
    },
}
METHODS = ("atv", "wanda", "sparsegpt")
TARGETS = ({"sparsity": 0.5, "pattern": None}, {"sparsity": None, "pattern": (2, 4)})


def llava_next_config(s: dict, layers: int | None = None):
    from transformers import LlavaNextConfig

    tile = s["tile"]
    return LlavaNextConfig(
        text_config=dict(model_type="llama", hidden_size=s["hidden"], num_hidden_layers=layers or s["layers"],
                         intermediate_size=s["intermediate"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"], rope_theta=500000.0,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(model_type="clip_vision_model", hidden_size=s["vision_hidden"],
                           intermediate_size=s["vision_intermediate"], num_hidden_layers=s["vision_layers"],
                           num_attention_heads=s["vision_heads"], image_size=tile, patch_size=s["patch"],
                           projection_dim=768),
        image_token_index=s["vocab"] - 64,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
                              [tile, 3 * tile]],
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def qwen2_vl_config(s: dict, layers: int | None = None):
    from transformers import Qwen2VLConfig

    eighth = s["hidden"] // s["heads"] // 8  # mrope sections sum to head_dim / 2
    vocab = s["vocab"]
    return Qwen2VLConfig(
        text_config=dict(hidden_size=s["hidden"], num_hidden_layers=layers or s["layers"],
                         intermediate_size=s["intermediate"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[eighth, 3 * eighth // 2, 3 * eighth // 2])),
        vision_config=dict(depth=s["vision_layers"], embed_dim=s["vision_hidden"], hidden_size=s["hidden"],
                           num_heads=s["vision_heads"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=vocab - 60, video_token_id=vocab - 59, vision_start_token_id=vocab - 62,
        vision_end_token_id=vocab - 61,
    )


def build(name: str, s: dict, device: torch.device, layers: int | None = None) -> torch.nn.Module:
    """The random-initialised model (seed 0) in bf16, built on ``device`` (fast init) and kept on the CPU."""
    from transformers import LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration

    config = (llava_next_config if name.startswith("llava") else qwen2_vl_config)(s, layers)
    cls = LlavaNextForConditionalGeneration if name.startswith("llava") else Qwen2VLForConditionalGeneration
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.to("cpu").eval()


def samples(name: str, config, s: dict, n: int, seed: int, small: bool = False) -> CalibrationSet:
    """Synthetic samples: ``s["text"]`` text tokens around one image; LLaVA-NeXT: a 2x2-tile image
    (576 base + 48 x 49 = 2,928 visual tokens at 336 px); Qwen2-VL: ``grid x grid`` patches
    (2,916 visual tokens at 108). ``small``: a one-tile / quarter-grid image (the agreement check)."""
    g = torch.Generator().manual_seed(seed)
    base: torch.Tensor | None = None  # one random image, shifted per sample (drawing 128 would take longer than a run)
    made = []
    for index in range(n):
        text = torch.randint(3, 200, (s["text"],), generator=g)
        if name.startswith("llava"):
            tile, side = s["tile"], s["tile"] // s["patch"]
            rows, cols = (1, 2) if small else (2, 2)
            n_image = side * side + rows * side * (cols * side + 1)
            base = torch.randn(1, 1 + rows * cols, 3, tile, tile, generator=g) if base is None else base
            image = {"pixel_values": (base + 0.01 * index).to(torch.bfloat16),
                     "image_sizes": torch.tensor([[rows * tile, cols * tile]])}
            middle = [torch.full((n_image,), config.image_token_index)]
        else:
            grid = s["grid"] // 2 if small else s["grid"]
            vision = config.vision_config
            patch_dim = 3 * vision.temporal_patch_size * vision.patch_size ** 2
            base = torch.randn(grid * grid, patch_dim, generator=g) if base is None else base
            image = {"pixel_values": (base + 0.01 * index).to(torch.bfloat16),
                     "image_grid_thw": torch.tensor([[1, grid, grid]])}
            middle = [torch.tensor([config.vision_start_token_id]),
                      torch.full((grid * grid // vision.spatial_merge_size ** 2,), config.image_token_id),
                      torch.tensor([config.vision_end_token_id])]
        ids = torch.cat([text[:8], *middle, text[8:]]).unsqueeze(0)
        made.append(CalibrationSample({"input_ids": ids, "attention_mask": torch.ones_like(ids), **image},
                                      f"synthetic:{index}"))
    return CalibrationSet(made, "synthetic", n, seed)


def _tokens(calibration: CalibrationSet) -> int:
    return calibration.samples[0].inputs["input_ids"].shape[1]


def _config(method: str, target: dict) -> PruneConfig:
    return PruneConfig(method=method, **target)


def _label(method: str, target: dict) -> str:
    return f"{method} {_config(method, target).target_label}"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_host_peak() -> bool:
    """Reset VmHWM (``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    blocks = resolve(model).blocks(model)
    return {name: module.weight.detach().eq(0).cpu() for name, module in blocks[0].named_modules()
            if isinstance(module, torch.nn.Linear)}


def agreement(name: str, model: torch.nn.Module, calibration: CalibrationSet, method: str, device: torch.device,
              quiet: RunSettings) -> dict:
    """Block-0 masks of ``method`` at 50% on ``device`` in bf16 against the CPU in fp32 (``model``:
    the shape cut to one decoder block)."""
    target = TARGETS[0]
    on_device, on_cpu = copy.deepcopy(model), copy.deepcopy(model).float()
    prune(on_device, None, calibration, _config(method, target), settings=quiet)
    prune(on_cpu, None, calibration, _config(method, target), settings=RunSettings(device="cpu", progress=False))
    a, b = _masks(on_device), _masks(on_cpu)
    agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    print(f"  block-0 masks {name:14s} {_label(method, target):14s} agree {agree:.2%} ({device} bf16 vs cpu fp32)",
          flush=True)
    return dict(shape=name, run=_label(method, target), mask_agreement=agree)


def one_run(name: str, dense: torch.nn.Module, calibration: CalibrationSet, method: str, target: dict,
            device: torch.device, quiet: RunSettings, seq: int) -> dict:
    model = copy.deepcopy(dense)
    blocks = resolve(model).blocks(model)
    one_block = block_bytes(blocks, torch.bfloat16)
    hidden_bytes = seq * model.config.get_text_config().hidden_size * 2
    reset = _reset_host_peak()
    resident_before = _status("VmRSS")  # every model the script holds, this run's copy included
    start = time.perf_counter()
    report = prune(model, None, calibration, _config(method, target), settings=quiet)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    goal = one_block + hidden_bytes + 2 * 2**30
    host_peak = _status("VmHWM")
    del model
    return dict(shape=name, run=_label(method, target), wall_s=round(wall, 2), seconds=report.seconds,
                gpu_peak_bytes=report.memory.get("gpu_peak_blocks_bytes"),
                gpu_capture_peak_bytes=report.memory.get("gpu_peak_capture_bytes"), gpu_goal_bytes=goal,
                block_bytes=one_block, sample_hidden_bytes=hidden_bytes, host_peak_bytes=host_peak,
                host_added_bytes=host_peak - resident_before if reset else None, host_peak_is_per_run=reset,
                sparsity=report.sparsity["overall"])


def _print_run(row: dict) -> None:
    gib = 2 ** 30
    named = ("capture", "statistics", "masks", "propagation", "move_blocks")
    other = row["seconds"]["total"] - sum(row["seconds"].get(k, 0) for k in named)
    phases = " ".join(f"{k} {row['seconds'].get(k, 0):.1f}" for k in named) + f" other {other:.1f}"
    gpu = (f"GPU peak blocks {row['gpu_peak_bytes'] / gib:.2f} GiB (goal <= {row['gpu_goal_bytes'] / gib:.2f}), "
           f"capture {row['gpu_capture_peak_bytes'] / gib:.2f}" if row["gpu_peak_bytes"] is not None else "no GPU")
    added = (f", +{row['host_added_bytes'] / gib:.1f} GiB over the models held" if row["host_added_bytes"] is not None
             else " (process)")
    print(f"  {row['shape']:14s} {row['run']:14s} {row['wall_s']:7.1f} s [{phases}]  {gpu}  host peak "
          f"{row['host_peak_bytes'] / gib:.1f} GiB{added}", flush=True)


def _write(folder: Path | None, result: dict) -> None:
    """``folder/gpu_check.json`` replaced whole (never left half written)."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "gpu_check.json.partial"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(folder / "gpu_check.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and 4 samples (a check of the script)")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples [128; 4 with --tiny]")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no further run is started (estimated from the runs so far)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    labels = [_label(method, target) for target in TARGETS for method in METHODS]
    parser.add_argument("--only", nargs="+", default=labels, choices=labels, metavar="RUN",
                        help=f"the runs to make, in the usual order (a method's 50%% run brings its block-0 check); "
                             f"from: {', '.join(repr(label) for label in labels).replace('%', '%%')} [all]")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder blocks per shape [the published count: 32 and 28; 2 with --tiny]")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json")
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")

    started = time.perf_counter()
    device = torch.device(args.device)
    size = "tiny" if args.tiny else "full"
    n_samples = args.samples or (4 if args.tiny else 128)
    quiet = RunSettings(device=str(device), progress=False)
    torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {size} shapes, "
          f"{n_samples} samples", flush=True)
    result: dict = {"device": str(device), "size": size, "samples": n_samples, "layers": args.layers,
                    "agreement": [], "runs": [], "skipped": []}
    dense, calibration, one_block, small = {}, {}, {}, {}
    for name in args.shapes:
        s = SHAPES[name][size]
        build_start = time.perf_counter()
        dense[name] = build(name, s, device, layers=args.layers)
        calibration[name] = samples(name, dense[name].config, s, n_samples, seed=0)
        one_block[name] = build(name, s, device, layers=1)
        small[name] = samples(name, one_block[name].config, s, 4, seed=7, small=True)
        print(f"  {name}: {sum(p.numel() for p in dense[name].parameters()) / 1e9:.2f}B parameters "
              f"(decoder blocks: {dense[name].config.get_text_config().num_hidden_layers}), "
              f"{_tokens(calibration[name])} tokens per sample, built in {time.perf_counter() - build_start:.1f} s",
              flush=True)
    # the most telling first: each method at 50% on every shape, then its block-0 agreement, then 2:4
    tasks = []
    for method in METHODS:
        tasks += [("run", name, method, TARGETS[0]) for name in args.shapes]
        tasks += [("agree", name, method, TARGETS[0]) for name in args.shapes]
    tasks += [("run", name, method, TARGETS[1]) for method in METHODS for name in args.shapes]
    tasks = [task for task in tasks if _label(task[2], task[3]) in args.only]
    longest: dict[tuple[str, str], float] = {}
    for kind, name, method, target in tasks:
        estimate = longest.get((kind, method), max((v for (k, _), v in longest.items() if k == kind), default=0.0))
        if time.perf_counter() - started + 1.2 * estimate > args.budget:
            result["skipped"].append(f"{kind} {name} {_label(method, target)}")
            _write(args.out, result)
            continue
        task_start = time.perf_counter()
        if kind == "agree":
            result["agreement"].append(agreement(name, one_block[name], small[name], method, device, quiet))
        else:
            row = one_run(name, dense[name], calibration[name], method, target, device, quiet,
                          _tokens(calibration[name]))
            result["runs"].append(row)
            _print_run(row)
        longest[kind, method] = max(longest.get((kind, method), 0.0), time.perf_counter() - task_start)
        _write(args.out, result)
    result["total_s"] = round(time.perf_counter() - started, 1)
    if result["skipped"]:
        print(f"skipped to stay within --budget {args.budget:.0f} s: {', '.join(result['skipped'])}")
    print(f"gpu_check finished in {result['total_s']:.0f} s")
    _write(args.out, result)


if __name__ == "__main__":
    main()

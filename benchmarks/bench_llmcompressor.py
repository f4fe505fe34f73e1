"""Our Wanda against llm-compressor 0.14's ``WandaPruningModifier``, same model, same samples.

``prepare`` writes a random-initialised 97M-parameter LLaVA (Llama decoder: 9 blocks, hidden 768,
MLP 2048, vocabulary 16000; CLIP vision tower 4 x 384 at 224 px, 196 image tokens) and the
calibration inputs (``--samples`` records of 196 image + ``--text-tokens`` text tokens, as
processor outputs) into ``--dir``. ``run`` prunes that model to 50% (unstructured, decoder linears
only) with each tool in a fresh process, alternating (ours, theirs, ours, theirs, ...), one
thread each, and prints the median wall time of each, the ratio, and our phases. llm-compressor
pins transformers 5.15-5.17, so it runs from its own environment (``--llmc-python``, e.g. a venv
made with ``pip install torch==2.13.0`` then ``pip install "llmcompressor==0.14.*"``); it uses its
sequential pipeline over the decoder blocks (layer-wise, as ours), with the vision tower,
projector and LM head ignored. Timed: the pruning call on a model already in memory (our
``prune``, their ``oneshot``).

    python benchmarks/bench_llmcompressor.py prepare --dir /tmp/llmc-bench
    python benchmarks/bench_llmcompressor.py run --dir /tmp/llmc-bench --llmc-python /work/venv-llmc/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN = 15999


def prepare(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=768, num_hidden_layers=9, intermediate_size=2048,
                         num_attention_heads=12, num_key_value_heads=12, vocab_size=16000, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, max_position_embeddings=1024),
        vision_config=dict(model_type="clip_vision_model", hidden_size=384, intermediate_size=1536,
                           num_hidden_layers=4, num_attention_heads=6, image_size=224, patch_size=16,
                           projection_dim=384),
        image_token_index=IMAGE_TOKEN, image_seq_length=196, vision_feature_select_strategy="default",
        vision_feature_layer=-2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(args.dir / "model")
    g = torch.Generator().manual_seed(1)
    inputs = []
    for _ in range(args.samples):
        text = torch.randint(3, 15000, (args.text_tokens,), generator=g)
        ids = torch.cat([text[:4], torch.full((196,), IMAGE_TOKEN), text[4:]]).unsqueeze(0)
        inputs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "pixel_values": torch.randn(1, 3, 224, 224, generator=g)})
    torch.save(inputs, args.dir / "inputs.pt")
    print(f"wrote {args.dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.samples} samples of {196 + args.text_tokens} tokens")


def _decoder_sparsity(model) -> float:
    import torch

    linears = [m for n, m in model.named_modules() if "language_model" in n and ".layers." in n
               and isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return zeros / sum(m.weight.numel() for m in linears)


def ours(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from atv_prune import CalibrationSample, CalibrationSet, PruneConfig, RunSettings, prune
    from atv_prune.model.loading import load_model

    torch.set_num_threads(1)
    model, _ = load_model(args.dir / "model")
    inputs = torch.load(args.dir / "inputs.pt")
    calibration = CalibrationSet([CalibrationSample(x, f"sample:{i}") for i, x in enumerate(inputs)], "inputs.pt",
                                 len(inputs), 0)
    start = time.perf_counter()
    report = prune(model, None, calibration, PruneConfig(method="wanda", pool="mixed", sparsity=0.5,
                                                         samples=len(inputs)),
                   settings=RunSettings(device="cpu", progress=False))
    wall = time.perf_counter() - start
    print(json.dumps({"tool": "ours", "wall_s": wall, "seconds": report.seconds,
                      "sparsity": _decoder_sparsity(model)}))


def theirs(args: argparse.Namespace) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from torch.utils.data import DataLoader
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(args.dir / "model", dtype=torch.float32).eval()
    inputs = torch.load(args.dir / "inputs.pt")
    loader = DataLoader(inputs, batch_size=1, collate_fn=lambda batch: batch[0])
    recipe = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"],
                                  ignore=["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"])
    # oneshot wants a processor when given data; the samples are already model inputs, so any will do
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        unk_token="<unk>")
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=loader, recipe=recipe, pipeline="sequential",
            sequential_targets=["LlamaDecoderLayer"], num_calibration_samples=len(inputs))
    wall = time.perf_counter() - start
    print(json.dumps({"tool": "llm-compressor", "wall_s": wall, "sparsity": _decoder_sparsity(model)}))


def run(args: argparse.Namespace) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    results: dict[str, list[dict]] = {"ours": [], "llm-compressor": []}
    for repeat in range(args.repeats):
        for tool, python in (("ours", sys.executable), ("llm-compressor", args.llmc_python)):
            command = [python, __file__, "ours" if tool == "ours" else "theirs", "--dir", str(args.dir)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{tool} failed: {done.stderr.strip()[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[tool].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {tool:15s} {result['wall_s']:7.2f} s  decoder sparsity "
                  f"{result['sparsity']:.4f}", flush=True)
    median = {tool: statistics.median(r["wall_s"] for r in runs) for tool, runs in results.items()}
    print(f"\nmedian of {args.repeats}: ours {median['ours']:.2f} s, llm-compressor {median['llm-compressor']:.2f} s, "
          f"ratio ours / llm-compressor = {median['ours'] / median['llm-compressor']:.3f}")
    phases = {k: statistics.median(r["seconds"].get(k, 0.0) for r in results["ours"])
              for k in ("capture", "statistics", "masks", "propagation")}
    print("ours, median phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
          + f"; masks {phases['masks'] / median['ours']:.1%} of the run")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "run", "ours", "theirs"):
        sub = commands.add_parser(name)
        sub.add_argument("--dir", type=Path, required=True)
        if name == "prepare":
            sub.add_argument("--samples", type=int, default=32)
            sub.add_argument("--text-tokens", type=int, default=100)
        if name == "run":
            sub.add_argument("--llmc-python", required=True, help="python of the environment with llm-compressor")
            sub.add_argument("--repeats", type=int, default=3)
            sub.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    {"prepare": prepare, "run": run, "ours": ours, "theirs": theirs}[args.command](args)


if __name__ == "__main__":
    main()

"""Train the built-in LLaVA (CLIP tower, projector, Llama decoder) from scratch on the scene benchmark.

``python -m atv_prune.builtin.train --out DIR --seed 0 --steps N`` generates the benchmark (or
reads ``--data``), trains with the loss on the assistant answers only, evaluates every task on
val (greedy, at most 4 new tokens), and saves model + processor (safetensors) with a model card.
Runs are deterministic given the seed, the step count and the thread count; ``--minutes`` is a
safety cap that stops early (and is then recorded in the card).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from . import scenes
from .tokenizer import ASSISTANT, BOS, EOS, IMAGE, PAD, USER, build_processor


@dataclass
class ModelShape:
    """Sizes of the three parts of the model; the defaults give about 6.6M parameters."""

    patch_size: int = 12
    vision_hidden: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_intermediate: int = 704


def build_model(shape: ModelShape, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` matching the processor's token ids."""
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("pad", PAD), ("bos", BOS), ("eos", EOS), ("image", IMAGE))}
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=scenes.IMAGE_SIZE, patch_size=shape.patch_size, num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads, max_position_embeddings=512,
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids["image"],
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(scenes.IMAGE_SIZE // shape.patch_size) ** 2,
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["pad"]
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.bos_token_id = ids["bos"]
    return model


class Encoder:
    """Token ids and pixel tensors built directly (what the processor would produce, but faster).

    The token sequence is exactly the chat template's rendering tokenized by the processor
    (checked by the tests): ``<s><|user|><image>...question<|assistant|>answer<|end|>...``.
    """

    def __init__(self, processor: LlavaProcessor, patch_size: int) -> None:
        tok = processor.tokenizer
        self.tok = tok
        self.special = {t: tok.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, IMAGE, USER, ASSISTANT)}
        self.n_image = (scenes.IMAGE_SIZE // patch_size) ** 2
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            self._cache[text] = ids
        return ids

    def conversation(self, turns: list[dict[str, str]], with_image: bool,
                     generation: bool = False) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a conversation; labels keep only answers and their end tokens.

        With ``generation`` the last turn's answer is left out and the prompt ends at ``<|assistant|>``.
        """
        s = self.special
        ids, labels = [s[BOS]], [-100]
        for i, turn in enumerate(turns):
            prompt = [s[USER]] + ([s[IMAGE]] * self.n_image if with_image and i == 0 else [])
            prompt += self.words(turn["question"]) + [s[ASSISTANT]]
            ids += prompt
            labels += [-100] * len(prompt)
            if generation and i == len(turns) - 1:
                break
            answer = self.words(turn["answer"]) + [s[EOS]]
            ids += answer
            labels += answer
        return ids, labels

    @staticmethod
    def pixels(scene: scenes.Scene) -> torch.Tensor:
        """The rendered scene normalised like the processor: (x / 255 - 0.5) / 0.5, channels first."""
        array = np.asarray(scenes.render(scene), dtype=np.float32)
        return torch.from_numpy((array / 255.0 - 0.5) / 0.5).permute(2, 0, 1).contiguous()

    def batch(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch of conversations (pixel values only for those with an image)."""
        encoded = [self.conversation(r["turns"], r["scene"] is not None) for r in records]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.special[PAD]
        input_ids = torch.full((len(records), length), pad, dtype=torch.long)
        labels = torch.full((len(records), length), -100, dtype=torch.long)
        attention = torch.zeros((len(records), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention[row, : len(ids)] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        images = [self.pixels(r["scene"]) for r in records if r["scene"] is not None]
        if images:
            out["pixel_values"] = torch.stack(images)
        return out


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, encoder: Encoder, items: list[dict[str, Any]],
             batch_size: int = 64) -> dict[str, float]:
    """Accuracy per task (greedy, at most 4 new tokens); items of equal prompt length share a batch."""
    model.eval()
    groups: dict[tuple[int, bool], list[tuple[dict[str, Any], list[int]]]] = defaultdict(list)
    for item in items:
        ids, _ = encoder.conversation([item], item["scene"] is not None, generation=True)
        groups[(len(ids), item["scene"] is not None)].append((item, ids))
    correct: dict[str, list[bool]] = defaultdict(list)
    eos = encoder.special[EOS]
    for (_, with_image), members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start: start + batch_size]
            input_ids = torch.tensor([ids for _, ids in chunk])
            kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
            if with_image:
                kwargs["pixel_values"] = torch.stack([encoder.pixels(it["scene"]) for it, _ in chunk])
            out = model.generate(**kwargs, max_new_tokens=4, do_sample=False)
            for (item, _), row in zip(chunk, out[:, input_ids.shape[1]:].tolist()):
                row = row[: row.index(eos)] if eos in row else row
                prediction = encoder.tok.decode(row, skip_special_tokens=True)
                correct[item["task"]].append(scenes.answer_matches(prediction, item["answer"]))
    model.train()
    accuracy = {task: 100.0 * sum(v) / len(v) for task, v in sorted(correct.items())}
    accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
    return accuracy


def load_split(data: Path, split: str, per_task: int | None = None) -> list[dict[str, Any]]:
    """The items of a val/test split, the first ``per_task`` of every task (all when None)."""
    items = []
    for task in scenes.TASKS:
        items += scenes.read_jsonl(data / split / f"{task}.jsonl")[:per_task]
    return items


def chance_levels(items: list[dict[str, Any]]) -> dict[str, float]:
    """Chance accuracy per task: the mean of its items' chance."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for item in items:
        by_task[item["task"]].append(item["chance"])
    return {task: 100.0 * sum(v) / len(v) for task, v in sorted(by_task.items())}


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _format(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1f}" for k, v in acc.items())


def write_card(out: Path, args: argparse.Namespace, shape: ModelShape, n_params: int,
               results: dict[str, Any]) -> None:
    """MODEL_CARD.md: how to reproduce the checkpoint and its dense accuracy per task."""
    chance, val, test = results["chance"], results["val"], results["test"]
    rows = "\n".join(f"| {t} | {chance.get(t, float('nan')):.1f} | {val.get(t, float('nan')):.1f} | "
                     f"{test.get(t, float('nan')):.1f} |" for t in [*scenes.TASKS, "mean"])
    card = f"""# Built-in LLaVA scene model

A `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer GELU projector, Llama decoder)
trained from scratch on the built-in scene benchmark (`atv_prune.builtin.scenes`), so that
pruning methods can be compared without downloading anything.

- Parameters: {n_params:,} (vision {shape.vision_layers} x {shape.vision_hidden}, patch {shape.patch_size},
  {scenes.IMAGE_SIZE} px images, {(scenes.IMAGE_SIZE // shape.patch_size) ** 2} visual tokens;
  decoder {shape.text_layers} x {shape.text_hidden}, {shape.text_heads} heads, MLP {shape.text_intermediate}).
- Tokenizer: closed word-level vocabulary ({results['vocab_size']} tokens) with a chat template.
- Training command (2 CPU threads, fp32):

      {results['command']}

- Seed {args.seed}; {results['steps']} steps of batch {args.batch_size} ({results['samples']:,} conversations,
  up to {args.max_turns} questions each), AdamW lr {args.lr} (warmup {args.warmup}, cosine), weight decay
  {args.weight_decay}; {results['minutes']:.1f} minutes at {results['samples_per_s']:.1f} conversations/s.
- Data: `generate_benchmark(seed={args.seed}, n_train={args.n_train}, n_val={args.n_val},
  n_test={args.n_test}, n_calib={args.n_calib})`; splits disjoint by scene.

## Dense accuracy (%; greedy, exact match after normalisation)

| task | chance | val ({args.n_val}/task) | test ({args.n_test}/task) |
|---|---|---|---|
{rows}
"""
    (out / "MODEL_CARD.md").write_text(card)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the checkpoint and processor")
    p.add_argument("--data", type=Path, help="benchmark folder (default: generate into OUT/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=None, help="stop early after this long")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-items", type=int, default=50, help="val items per task in periodic evaluations")
    p.add_argument("--log-every", type=int, default=50)
    for field, default in asdict(ModelShape()).items():
        p.add_argument("--" + field.replace("_", "-"), type=int, default=default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    if not (data / "manifest.json").exists():
        scenes.generate_benchmark(data, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                                  n_test=args.n_test, n_calib=args.n_calib, max_turns=args.max_turns)
    train = scenes.read_jsonl(data / "train.jsonl")
    shape = ModelShape(**{f: getattr(args, f) for f in asdict(ModelShape())})
    processor = build_processor(shape.patch_size)
    model = build_model(shape, processor)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; {len(train):,} training conversations", flush=True)
    encoder = Encoder(processor, shape.patch_size)
    probe = load_split(data, "val", args.eval_items)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    order_rng = random.Random(args.seed)
    order: list[int] = []
    curve: list[dict[str, Any]] = []
    model.train()
    start = time.time()
    train_time, step, loss_sum = 0.0, 0, 0.0
    while step < args.steps:
        if args.minutes is not None and train_time > 60 * args.minutes:
            print(f"stopping at step {step}: --minutes {args.minutes} reached", flush=True)
            break
        t0 = time.time()
        if len(order) < args.batch_size:
            fresh = list(range(len(train)))
            order_rng.shuffle(fresh)
            order += fresh
        batch = encoder.batch([train[i] for i in order[: args.batch_size]])
        del order[: args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, args.steps, args.lr, args.warmup)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        train_time += time.time() - t0
        loss_sum += loss.item()
        if step % args.log_every == 0:
            print(f"step {step} loss {loss_sum / args.log_every:.4f} "
                  f"{step * args.batch_size / train_time:.1f} conv/s {train_time / 60:.1f} min", flush=True)
            loss_sum = 0.0
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, encoder, probe)
            curve.append({"step": step, "minutes": train_time / 60, **acc})
            print(f"eval step {step}: {_format(acc)}", flush=True)

    val_items, test_items = load_split(data, "val"), load_split(data, "test")
    results: dict[str, Any] = {
        "command": "python -m atv_prune.builtin.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "steps": step, "samples": step * args.batch_size, "minutes": train_time / 60,
        "samples_per_s": step * args.batch_size / max(train_time, 1e-9), "n_params": n_params,
        "vocab_size": len(processor.tokenizer), "chance": chance_levels(test_items),
        "val": evaluate(model, encoder, val_items), "test": evaluate(model, encoder, test_items),
        "curve": curve, "wall_minutes": (time.time() - start) / 60, "shape": asdict(shape),
    }
    print(f"final val: {_format(results['val'])}\nfinal test: {_format(results['test'])}", flush=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(results, indent=1))
    write_card(args.out, args, shape, n_params, results)
    return results


if __name__ == "__main__":
    main()

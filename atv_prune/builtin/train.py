"""Train the built-in LLaVA (CLIP tower, projector, Llama decoder) from scratch on the scene benchmark.

``python -m atv_prune.builtin.train --out DIR --seed 0 --steps N`` generates the benchmark (or
reads ``--data``), trains with the loss on the assistant answers only, evaluates every task on
val (greedy, at most 4 new tokens), and saves model + processor (safetensors) with a model card.
Runs are deterministic given the seed and the step count on one CPU and one thread (two threads: the
same in a 300-step check); pinning the kernels (``PINNED_KERNELS``, set before the command) gives other x86 CPUs
with AVX2 the same code paths; ``--minutes`` is a safety cap that stops early (``training.json``'s
``stopped_by_minutes``, and a line of the card).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from ..eval.answers import answer_matches
from ..runs.export import write_files_into
from . import outliers, scenes
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


def processor_image_size(processor: LlavaProcessor) -> int:
    """The side in pixels of the square images ``processor`` feeds the model."""
    return processor.image_processor.crop_size["height"]


def build_model(shape: ModelShape, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """A randomly initialised ``LlavaForConditionalGeneration`` matching the processor's token ids and image size."""
    image_size = processor_image_size(processor)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("pad", PAD), ("bos", BOS), ("eos", EOS), ("image", IMAGE))}
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=image_size, patch_size=shape.patch_size, num_channels=3,
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
        image_seq_length=(image_size // shape.patch_size) ** 2,
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
    (checked by the tests): ``<s><|user|><image>...question<|assistant|>answer<|end|>...``, the
    image placed by ``scenes.image_position`` for ``image_layout``.
    """

    def __init__(self, processor: LlavaProcessor, patch_size: int, image_layout: str) -> None:
        self.image_layout = scenes.check_image_layout(image_layout)
        tok = processor.tokenizer
        self.tok = tok
        self.special = {t: tok.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, IMAGE, USER, ASSISTANT)}
        self.n_image = (processor_image_size(processor) // patch_size) ** 2
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
            image = [s[IMAGE]] * self.n_image if with_image and i == 0 else []
            words = self.words(turn["question"])
            if scenes.image_position(turn["question"], self.image_layout) == "after":
                prompt = [s[USER]] + words + image + [s[ASSISTANT]]
            else:
                prompt = [s[USER]] + image + words + [s[ASSISTANT]]
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


def cell_labels(scene: scenes.Scene) -> torch.Tensor:
    """Per grid cell (row-major): colour, shape, size and word class, 0 where the cell has none."""
    labels = torch.zeros(scenes.GRID * scenes.GRID, 4, dtype=torch.long)
    for o in scene["objects"]:
        cell = o["row"] * scenes.GRID + o["col"]
        labels[cell, 0] = list(scenes.COLORS).index(o["color"]) + 1
        labels[cell, 1] = scenes.SHAPES.index(o["shape"]) + 1
        labels[cell, 2] = list(scenes.SIZES).index(o["size"]) + 1
    word = scene["word"]
    if word is not None:
        labels[word["row"] * scenes.GRID + word["col"], 3] = scenes.WORDS.index(word["text"]) + 1
    return labels


def pool_cells(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, side*side, D) averaged over each grid cell: (B, GRID*GRID, D), row-major."""
    side = math.isqrt(tokens.shape[1])
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    return torch.nn.functional.adaptive_avg_pool2d(grid, scenes.GRID).flatten(2).transpose(1, 2)


def token_cells(n_tokens: int) -> torch.Tensor:
    """The grid cell (row-major) of each of ``n_tokens`` patch tokens of a square, row-major patch grid."""
    side = math.isqrt(n_tokens)
    index = torch.arange(side) * scenes.GRID // side
    return (index[:, None] * scenes.GRID + index[None, :]).flatten()


def pretrain_vision(model: LlavaForConditionalGeneration, scene_list: list[scenes.Scene], steps: int,
                    batch_size: int, lr: float, rng: random.Random, log_every: int) -> list[dict[str, float]]:
    """Short supervised pretraining of the vision tower: classify every grid cell's contents.

    Patch features pooled to the 3 x 3 grid feed linear heads (colour, shape, size, word); the
    heads are thrown away afterwards. This grounds the tower far faster than the answer loss does,
    which reaches the tower only through the projector and the whole decoder.
    """
    tower = model.model.vision_tower
    dim = tower.config.hidden_size
    classes = (len(scenes.COLORS), len(scenes.SHAPES), len(scenes.SIZES), len(scenes.WORDS))
    heads = torch.nn.ModuleList(torch.nn.Linear(dim, n + 1) for n in classes)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    curve = []
    correct, total = 0.0, 0
    for step in range(steps):
        chosen = [scene_list[rng.randrange(len(scene_list))] for _ in range(batch_size)]
        pixels = torch.stack([Encoder.pixels(sc) for sc in chosen])
        labels = torch.stack([cell_labels(sc) for sc in chosen])  # (B, 9, 4)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, min(50, steps // 10 + 1))
        cells = pool_cells(tower(pixel_values=pixels).last_hidden_state[:, 1:])  # CLS dropped
        logits = [head(cells) for head in heads]
        loss = sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten())
                   for i, lg in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        predicted = torch.stack([lg.argmax(-1) for lg in logits], -1)
        correct += (predicted == labels).all(-1).float().sum().item()
        total += labels.shape[0] * labels.shape[1]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": loss.item(), "cell_accuracy": 100.0 * correct / total})
            print(f"vision step {step + 1} loss {loss.item():.4f} cell accuracy {100.0 * correct / total:.1f}",
                  flush=True)
            correct, total = 0.0, 0
    return curve


def text_items(tasks: dict[str, float], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` text-only questions drawn from ``tasks`` (weights), each about a fresh random scene
    that is never shown: items with ``scene`` None, as ``Encoder.batch`` and ``evaluate`` take them."""
    names = list(tasks)
    items: list[dict[str, Any]] = []
    while len(items) < n:
        task = rng.choices(names, weights=[tasks[t] for t in names])[0]
        item = scenes.make_item(task, scenes.sample_scene(rng), rng)
        if item is not None:
            items.append({"task": task, "scene": None, "turns": [scenes.qa(item)], **item})
    return items


def pretrain_text(model: LlavaForConditionalGeneration, encoder: Encoder, tasks: dict[str, float], steps: int,
                  batch_size: int, lr: float, warmup: int, weight_decay: float, seed: int,
                  log_every: int) -> list[dict[str, Any]]:
    """Pretraining of the decoder blocks on text-only questions (no image), before the image mix.

    Steps a model learns only slowly inside the mix, where each is a small share of the questions
    (picking the option that names a value, comparing two positions), are learned here from
    dedicated batches at a constant rate after warmup; the word embeddings and the LM head stay as
    initialised. Measured (pilots P14, P16 in docs/builtin.md): the phase teaches ``option``, but
    the image mix afterwards learns thousands of steps later, with or without the embeddings and
    the LM head training here too. Returns the loss curve and, at the end, the accuracy per task on
    200 newly drawn items each (not unseen: ``option`` has about 2000 distinct questions).
    """
    language_model = model.get_decoder()
    embedding = language_model.get_input_embeddings().weight
    decoder = [p for p in language_model.parameters() if p is not embedding]  # blocks and final norm
    trained = {id(p) for p in decoder}
    frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in decoder if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in decoder if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    rng = random.Random(f"{seed}-text")
    curve: list[dict[str, Any]] = []
    loss_sum = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        loss = model(**encoder.batch(text_items(tasks, batch_size, rng))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        loss_sum += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            done = (step + 1) % log_every or log_every
            curve.append({"step": step + 1, "loss": loss_sum / done})
            print(f"text step {step + 1} answer loss {loss_sum / done:.4f}", flush=True)
            loss_sum = 0.0
    for param in frozen:
        param.requires_grad_(True)
    if steps:
        probe = [it for task in tasks for it in text_items({task: 1.0}, 200, random.Random(f"{seed}-text-{task}"))]
        accuracy = evaluate(model, encoder, probe)
        curve.append({"step": steps, **accuracy})
        print(f"text phase accuracy: {_format(accuracy)}", flush=True)
    return curve


class VisualWordAlignment:
    """Auxiliary loss that makes each cell's visual tokens name the cell's contents in word-embedding space.

    The projector output pooled per grid cell is scored against the decoder's input embeddings of
    the candidate words (colour, shape, size, printed word, each with "nothing" for an empty cell);
    cross-entropy on the true words. Visual tokens then share directions with the question words
    that refer to them, so the decoder's matching of a question against the image starts from the
    same geometry as matching text against text -- the role CLIP's text alignment plays in LLaVA.
    With ``tokens``, every visual token of a cell names the cell's contents instead of their mean: where
    a cell holds many tokens (4 x 4 on generation 2's images with patch 12), each token the decoder
    can attend to is aligned, not only their average. With one token per cell both are the same.
    With ``foreground`` (with ``tokens``), a token names its cell's colour, shape, size and word only
    where its patch shows a pixel of the object or the word plate, and "nothing" where it shows
    background: the background patches of a cell are not pulled towards the words of its object.
    Positions are named by every token.
    """

    def __init__(self, model: LlavaForConditionalGeneration, encoder: Encoder, positions: bool = False,
                 tokens: bool = False, foreground: bool = False) -> None:
        if foreground and not tokens:
            raise ValueError("foreground alignment scores single tokens: give it with tokens=True")
        groups = (list(scenes.COLORS), list(scenes.SHAPES), list(scenes.SIZES), list(scenes.WORDS))
        self.candidates = [torch.tensor([encoder.words(w)[0] for w in ["nothing", *g]]) for g in groups]
        # With ``positions``, every cell also names its row and its column ("top", "left", ...):
        # the position words a spatial question compares then travel with the retrieved object.
        cells = torch.arange(scenes.GRID * scenes.GRID)
        self.position_groups = [(torch.tensor([encoder.words(w)[0] for w in names]), labels)
                                for names, labels in ((scenes.ROW_NAMES, cells // scenes.GRID),
                                                      (scenes.COL_NAMES, cells % scenes.GRID))] if positions else []
        self.tokens, self.foreground = tokens, foreground
        self.embeddings = model.get_input_embeddings()
        self.features: torch.Tensor | None = None
        model.model.multi_modal_projector.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.features = output

    def loss(self, scene_list: list[scenes.Scene]) -> torch.Tensor:
        """Mean cross-entropy over cells (or tokens) and word groups for the images of the last forward pass."""
        if self.tokens:
            units, where = self.features, token_cells(self.features.shape[1])
        else:
            units, where = pool_cells(self.features), torch.arange(scenes.GRID * scenes.GRID)
        labels = torch.stack([cell_labels(sc) for sc in scene_list])[:, where]  # (B, units, 4)
        if self.foreground:
            shown = torch.stack([self._shows_foreground(sc, units.shape[1]) for sc in scene_list])  # (B, units)
            labels = labels * shown[..., None]
        groups = [(ids, labels[..., i]) for i, ids in enumerate(self.candidates)]
        groups += [(ids, fixed[where].expand(len(scene_list), -1)) for ids, fixed in self.position_groups]
        total = units.new_zeros(())
        for ids, target in groups:
            logits = units @ self.embeddings.weight[ids].T
            total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        return total / len(groups)

    @staticmethod
    def _shows_foreground(scene: scenes.Scene, n_tokens: int) -> torch.Tensor:
        """Whether each of the ``n_tokens`` patch tokens of ``scene``'s image shows its foreground."""
        patch_size = scenes.image_size(scenes.scene_generation(scene)) // math.isqrt(n_tokens)
        return torch.from_numpy(scenes.foreground_patches(scene, patch_size)).flatten().long()


@torch.no_grad()
def standardize_projector(model: LlavaForConditionalGeneration, scene_list: list[scenes.Scene],
                          target_norm: float = 1.0, n: int = 256) -> None:
    """Fold feature standardisation into the projector and scale its output to ``target_norm``.

    A pretrained tower's features have norms ~100x the word embeddings; this exact affine
    re-parameterisation (per-dimension mean/std into ``linear_1``, a scale on ``linear_2``) starts
    the decoder with visual tokens on the scale of text tokens, without changing the architecture.
    """
    pixels = torch.stack([Encoder.pixels(sc) for sc in scene_list[:n]])
    layer = model.config.vision_feature_layer
    hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    projector = model.model.multi_modal_projector
    projector.linear_1.bias -= projector.linear_1.weight @ (mean / std)
    projector.linear_1.weight /= std
    norm = projector(hidden).norm(dim=-1).mean()
    projector.linear_2.weight *= target_norm / norm
    projector.linear_2.bias *= target_norm / norm


def add_outlier_features(model: LlavaForConditionalGeneration, encoder: Encoder, records: list[dict[str, Any]],
                         k: int, scale: float, batch_size: int = 32) -> dict[str, Any]:
    """Give the ``k`` largest residual channels (RMS over ``records``) LLM-sized outliers with
    ``outliers.amplify_outlier_features``; returns what ``training.json`` records of it."""
    batches = (encoder.batch(records[i: i + batch_size]) for i in range(0, len(records), batch_size))
    rms = outliers.residual_rms(model, batches)
    channels = outliers.largest_channels(rms, k)
    outliers.amplify_outlier_features(model, channels, scale)
    return {"channels": channels, "scale": scale, "residual_rms": [round(rms[c].item(), 3) for c in channels],
            "median_residual_rms": round(rms.median().item(), 3), "conversations": len(records)}


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
                correct[item["task"]].append(answer_matches(prediction, item["answer"]))
    model.train()
    accuracy = {task: 100.0 * sum(v) / len(v) for task, v in sorted(correct.items())}
    accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
    return accuracy


SUBSET_PER_TASK = 20  # the fixed test subset whose accuracy the checkpoint test re-measures


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
    chance = {task: 100.0 * sum(v) / len(v) for task, v in sorted(by_task.items())}
    chance["mean"] = sum(chance.values()) / len(chance)
    return chance


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
    chance, val, test, data = results["chance"], results["val"], results["test"], results["data"]
    generation = scenes.data_generation(data)
    data_call = ", ".join([*(f"{k}={data[k]}" for k in ("seed", "n_train", "n_val", "n_test", "n_calib", "max_turns")),
                           f"image_layout={data_image_layout(data)!r}", *([f"generation={generation}"] * (generation != 1))])
    size = scenes.image_size(generation)
    rows = "\n".join(f"| {t} | {chance.get(t, float('nan')):.1f} | {val.get(t, float('nan')):.1f} | "
                     f"{test.get(t, float('nan')):.1f} |" for t in [*scenes.TASKS, "mean"])
    card = f"""# Built-in LLaVA scene model

A `LlavaForConditionalGeneration` (CLIP vision tower, 2-layer GELU projector, Llama decoder)
trained from scratch on the built-in scene benchmark (`atv_prune.builtin.scenes`), so that
pruning methods can be compared without downloading anything.

- Parameters: {n_params:,} (vision {shape.vision_layers} x {shape.vision_hidden}, patch {shape.patch_size},
  {size} px images, {(size // shape.patch_size) ** 2} visual tokens;
  decoder {shape.text_layers} x {shape.text_hidden}, {shape.text_heads} heads, MLP {shape.text_intermediate}).
- Tokenizer: closed word-level vocabulary ({results['vocab_size']} tokens) with a chat template.
- Training command ({args.threads} CPU thread(s), fp32):

      {results['command']}

- Vision tower first pretrained {args.vision_steps} steps (batch {args.vision_batch_size}, lr {args.vision_lr}) to
  classify each grid cell's colour, shape, size and word ({results['vision_minutes']:.1f} minutes); afterwards
  its learning rate is {args.vision_lr_scale} x the rest.
{_text_lines(args, results)}- Visual-word alignment loss weight {args.align_weight} (`VisualWordAlignment`: each cell's visual
  tokens{(' (each of them, background patches naming nothing)' if args.align_foreground else ' (each of them)')
         if args.align_tokens else ' (their mean)'} scored against the decoder's word embeddings of its colour, shape, size and word{
  ' and of its row and column' if args.align_positions else ''}).
- Seed {args.seed}; {results['steps']} steps of batch {args.batch_size + args.text_per_batch} ({results['samples']:,} conversations,
  up to {args.max_turns} questions each), AdamW lr {args.lr} (warmup {args.warmup}, cosine), weight decay
  {args.weight_decay}; {results['minutes']:.1f} minutes at {results['samples_per_s']:.1f} conversations/s{_early_stop(args, results)}.
{_outlier_line(results['outliers'])}- Data: `generate_benchmark({data_call})`, training mix {data['weights']}
  ({', '.join(f'`{t}`' for t in scenes.GROUNDING_TASKS)} are training-only questions); splits disjoint by scene.

## Dense accuracy (%; greedy, exact match after normalisation)

| task | chance | val ({data['n_val']}/task) | test ({data['n_test']}/task) |
|---|---|---|---|
{rows}
"""
    (out / "MODEL_CARD.md").write_text(card)


def _early_stop(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The card's note that ``--minutes`` cut the run (and so its cosine schedule) short, if it did."""
    if not results["stopped_by_minutes"]:
        return ""
    return f"; stopped by `--minutes {args.minutes:g}` at step {results['steps']} of {args.steps}, before the schedule's end"


def _outlier_line(record: dict[str, Any] | None) -> str:
    """The card's line on the outlier features the trained weights were given, if any."""
    if record is None:
        return ""
    rms = ", ".join(f"{c} ({r:.1f})" for c, r in zip(record["channels"], record["residual_rms"]))
    return (f"- Outlier features (`outliers.amplify_outlier_features`, exact: the outputs are bit-identical): "
            f"the {len(record['channels'])} residual\n  channels of largest RMS over the first "
            f"{record['conversations']} training conversations, {rms} against a median of "
            f"{record['median_residual_rms']:.1f},\n  have their RMSNorm gains x{record['scale']:g} and the "
            f"q/k/v and gate/up weights reading them /{record['scale']:g}.\n")


def _text_lines(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The card's lines on text-only questions: the phase before the mix and those added to its batches."""
    mix = ", ".join(f"{t}={w:g}" for t, w in args.text_weights.items())
    lines = ""
    if args.text_steps:
        final = results["text_curve"][-1]
        reached = ", ".join(f"{t} {final[t]:.1f}%" for t in args.text_weights)
        lines += (f"- Decoder blocks then pretrained {args.text_steps} steps on text-only questions ({mix}; batch "
                  f"{args.batch_size},\n  lr {args.lr} after {args.warmup} warmup steps, constant; "
                  f"{results['text_minutes']:.1f} minutes), reaching {reached} on 200 fresh items each.\n")
    if args.text_per_batch:
        lines += f"- Every batch of the image mix also holds {args.text_per_batch} text-only questions ({mix}).\n"
    return lines


#: Environment variables that pin the CPU kernels' code paths (ATen's vector width, MKL's and oneDNN's
#: instruction sets), so that another x86 CPU with AVX2 takes the same paths; each changes the
#: weights of a run. They are read when torch loads, so they go before the command.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def kernel_settings() -> dict[str, Any]:
    """The kernel pinning this process runs with, and the vector width ATen chose."""
    return {**{name: os.environ.get(name) for name in PINNED_KERNELS},
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def command_line(argv: list[str], kernels: dict[str, Any]) -> str:
    """The command that reproduces this run: the pinned kernel variables that were set, then the trainer call."""
    pins = [f"{name}={kernels[name]}" for name in PINNED_KERNELS if kernels.get(name)]
    return " ".join([*pins, "python -m atv_prune.builtin.train", *(shlex.quote(a) for a in argv)])


#: Training conversations (the first ones of train.jsonl) that rank the residual channels for --outlier-channels.
OUTLIER_CONVERSATIONS = 256

# What the trainer writes into --out beside the data folder (the end-to-end test checks the list).
CHECKPOINT_FILES = ("MODEL_CARD.md", "chat_template.jinja", "config.json", "generation_config.json",
                    "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                    "training.json")


def data_image_layout(manifest: dict[str, Any]) -> str:
    """The image layout of a benchmark manifest (also ``training.json``'s ``data``); manifests
    written before the option existed have none and put the image after the question."""
    return manifest.get("image_layout", "after")


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
    p.add_argument("--generation", type=int, choices=scenes.GENERATIONS, default=1,
                   help="benchmark generation: its canvas (scenes.CANVASES; 2: 144 px images on varied backgrounds)")
    p.add_argument("--image-position", choices=scenes.IMAGE_POSITIONS, default=scenes.DEFAULT_IMAGE_POSITION,
                   help="where the image goes in a question's prompt (the caption request always follows it)")
    p.add_argument("--task-weights", default="", help="training mix overrides, e.g. reading=2,textonly=0.6")
    p.add_argument("--vision-steps", type=int, default=0, help="steps of cell-classification pretraining")
    p.add_argument("--vision-batch-size", type=int, default=64)
    p.add_argument("--vision-lr", type=float, default=1e-3)
    p.add_argument("--standardize-projector", action="store_true",
                   help="start visual tokens on the scale of text embeddings (see standardize_projector)")
    p.add_argument("--vision-lr-scale", type=float, default=1.0, help="tower lr / --lr after pretraining")
    p.add_argument("--align-weight", type=float, default=0.0,
                   help="weight of the visual-word alignment loss (see VisualWordAlignment)")
    p.add_argument("--align-tokens", action="store_true",
                   help="the alignment loss scores every visual token of a cell, not the cell's mean")
    p.add_argument("--align-foreground", action="store_true",
                   help="with --align-tokens: tokens of background patches name 'nothing', not their cell's object")
    p.add_argument("--align-positions", action="store_true",
                   help="the alignment loss also makes each cell name its row and column words")
    p.add_argument("--text-steps", type=int, default=0,
                   help="steps of text-only pretraining of the decoder before the image mix (see pretrain_text)")
    p.add_argument("--text-tasks", default=None,
                   help=f"mix of the text-only questions (--text-steps, --text-per-batch): task=weight pairs of "
                        f"{', '.join(scenes.TEXT_TASKS)} (default option=1)")
    p.add_argument("--text-per-batch", type=int, default=0,
                   help="text-only questions of --text-tasks added to every batch of the image mix")
    p.add_argument("--outlier-channels", type=int, default=0, metavar="K",
                   help="after training, give the K largest residual channels LLM-sized outlier features "
                        "(an exact rescaling, outliers.amplify_outlier_features)")
    p.add_argument("--outlier-scale", type=float, default=16.0,
                   help="factor (a power of two) the outlier channels' norm gains grow by")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-items", type=int, default=50, help="val items per task in periodic evaluations")
    p.add_argument("--log-every", type=int, default=50)
    for field, default in asdict(ModelShape()).items():
        p.add_argument("--" + field.replace("_", "-"), type=int, default=default)
    args = p.parse_args(argv)
    try:
        args.weights = task_weights(args.task_weights)
    except ValueError as error:
        p.error(str(error))
    if args.align_weight < 0:
        p.error(f"--align-weight must be >= 0, got {args.align_weight}")
    for flag in ("align_positions", "align_tokens", "align_foreground"):
        if getattr(args, flag) and not args.align_weight:
            p.error(f"--{flag.replace('_', '-')} extends the alignment loss: give it with --align-weight > 0")
    if args.align_foreground and not args.align_tokens:
        p.error("--align-foreground labels single tokens: give it with --align-tokens")
    data = args.data or args.out / "data"
    if (data / "manifest.json").exists():
        manifest = json.loads((data / "manifest.json").read_text())
        layout = data_image_layout(manifest)
        if layout != args.image_position:
            p.error(f"the benchmark in {data} puts the image {layout} each question but --image-position is "
                    f"{args.image_position}: pass --image-position {layout} or another --data folder")
        if scenes.data_generation(manifest) != args.generation:
            p.error(f"the benchmark in {data} is of generation {scenes.data_generation(manifest)} but --generation is "
                    f"{args.generation}: pass --generation {scenes.data_generation(manifest)} or another --data folder")
    size = scenes.image_size(args.generation)
    if args.patch_size <= 0 or size % args.patch_size:
        p.error(f"--patch-size {args.patch_size} does not divide the {size} px images of generation {args.generation}")
    in_the_way = [name for name in CHECKPOINT_FILES if (args.out / name).is_dir()]
    if in_the_way:
        p.error(f"--out {args.out} holds {', '.join(in_the_way)} as a folder where the checkpoint writes a file: "
                "remove it or choose another output folder")
    if not 0 <= args.outlier_channels <= args.text_hidden:
        p.error(f"--outlier-channels must be in [0, --text-hidden {args.text_hidden}], got {args.outlier_channels}")
    try:
        outliers.check_scale(args.outlier_scale)
    except ValueError as error:
        p.error(f"--outlier-scale: {error}")
    for flag in ("text_steps", "text_per_batch"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.text_tasks is not None and not (args.text_steps or args.text_per_batch):
        p.error("--text-tasks mixes the text-only questions: give it with --text-steps or --text-per-batch > 0")
    try:
        args.text_weights = text_task_weights("option=1" if args.text_tasks is None else args.text_tasks)
    except ValueError as error:
        p.error(str(error))
    return args


def _weights_into(weights: dict[str, float], spec: str, known: list[str], flag: str) -> dict[str, float]:
    """``weights`` with the ``task=weight`` pairs of ``spec`` (the value of ``flag``) applied in order."""
    for pair in filter(None, spec.split(",")):
        task, _, value = pair.partition("=")
        if task not in known:
            raise ValueError(f"unknown task '{task}' in {flag}: use one of {', '.join(known)}")
        try:
            weights[task] = float(value)
        except ValueError:
            raise ValueError(f"{flag} needs task=number pairs, got '{pair}'") from None
        if weights[task] < 0:
            raise ValueError(f"{flag}: a task weight must be >= 0, got '{pair}'")
    return weights


def task_weights(overrides: str) -> dict[str, float]:
    """The training mix: the defaults with ``task=weight`` overrides applied in the order given
    (the order of the keys fixes the generated question stream)."""
    known = [*scenes.TASKS, "caption", *scenes.GROUNDING_TASKS]
    return _weights_into(dict(scenes.DEFAULT_TASK_WEIGHTS), overrides, known, "--task-weights")


def text_task_weights(spec: str) -> dict[str, float]:
    """The mix of text-only questions from ``task=weight`` pairs (tasks of ``scenes.TEXT_TASKS``)."""
    weights = _weights_into({}, spec, list(scenes.TEXT_TASKS), "--text-tasks")
    if not sum(weights.values()) > 0:
        raise ValueError(f"--text-tasks needs at least one task with a positive weight, got '{spec}'")
    return weights


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    kernels = kernel_settings()
    if any(kernels[name] != value for name, value in PINNED_KERNELS.items()):
        pins = " ".join(f"{name}={value}" for name, value in PINNED_KERNELS.items())
        print(f"note: CPU kernels not pinned, so these weights are reproducible on this CPU type only; "
              f"for other AVX2 CPUs run with {pins} before the command", flush=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    if not (data / "manifest.json").exists():
        scenes.generate_benchmark(data, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                                  n_test=args.n_test, n_calib=args.n_calib, weights=args.weights,
                                  max_turns=args.max_turns, image_layout=args.image_position,
                                  generation=args.generation)
    train = scenes.read_jsonl(data / "train.jsonl")
    shape = ModelShape(**{f: getattr(args, f) for f in asdict(ModelShape())})
    processor = build_processor(shape.patch_size, scenes.image_size(args.generation))
    model = build_model(shape, processor)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; {len(train):,} training conversations", flush=True)
    encoder = Encoder(processor, shape.patch_size, args.image_position)
    probe = load_split(data, "val", args.eval_items)

    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        groups[("vision_tower" in name, param.dim() >= 2 and "embed" not in name)].append(param)
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": args.weight_decay if decays else 0.0,
          "lr_scale": args.vision_lr_scale if vision else 1.0} for (vision, decays), params in groups.items()],
        lr=args.lr, betas=(0.9, 0.98))
    order_rng = random.Random(args.seed)
    text_rng = random.Random(f"{args.seed}-text-mix")
    vision_start = time.time()
    vision_curve = pretrain_vision(model, [r["scene"] for r in train if r["scene"] is not None],
                                   args.vision_steps, args.vision_batch_size, args.vision_lr,
                                   random.Random(f"{args.seed}-vision"), args.log_every)
    if args.standardize_projector:
        standardize_projector(model, [r["scene"] for r in train if r["scene"] is not None])
    vision_minutes = (time.time() - vision_start) / 60
    text_start = time.time()
    text_curve = pretrain_text(model, encoder, args.text_weights, args.text_steps, args.batch_size, args.lr,
                               args.warmup, args.weight_decay, args.seed, args.log_every)
    text_minutes = (time.time() - text_start) / 60
    alignment = (VisualWordAlignment(model, encoder, positions=args.align_positions, tokens=args.align_tokens,
                                     foreground=args.align_foreground)
                 if args.align_weight > 0 else None)
    order: list[int] = []
    curve: list[dict[str, Any]] = []
    model.train()
    start = time.time()
    train_time, step, answer_loss_sum, align_loss_sum, align_steps = 0.0, 0, 0.0, 0.0, 0
    per_step = args.batch_size + args.text_per_batch  # conversations per step, text-only questions included
    while step < args.steps:
        if args.minutes is not None and train_time + 60 * (vision_minutes + text_minutes) > 60 * args.minutes:
            print(f"stopping at step {step}: --minutes {args.minutes} reached", flush=True)
            break
        t0 = time.time()
        if len(order) < args.batch_size:
            fresh = list(range(len(train)))
            order_rng.shuffle(fresh)
            order += fresh
        records = [train[i] for i in order[: args.batch_size]]
        records += text_items(args.text_weights, args.text_per_batch, text_rng)
        batch = encoder.batch(records)
        del order[: args.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * _lr(step, args.steps, args.lr, args.warmup)
        answer_loss = model(**batch).loss
        loss = answer_loss
        if alignment is not None and "pixel_values" in batch:
            align_loss = alignment.loss([r["scene"] for r in records if r["scene"] is not None])
            loss = loss + args.align_weight * align_loss
            align_loss_sum += align_loss.item()
            align_steps += 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        train_time += time.time() - t0
        answer_loss_sum += answer_loss.item()
        if step % args.log_every == 0:
            aligned = f" align loss {align_loss_sum / align_steps:.4f}" if align_steps else ""
            print(f"step {step} answer loss {answer_loss_sum / args.log_every:.4f}{aligned} "
                  f"{step * per_step / train_time:.1f} conv/s {train_time / 60:.1f} min", flush=True)
            answer_loss_sum, align_loss_sum, align_steps = 0.0, 0.0, 0
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, encoder, probe)
            curve.append({"step": step, "minutes": train_time / 60, **acc})
            print(f"eval step {step}: {_format(acc)}", flush=True)

    outlier_record = (add_outlier_features(model, encoder, train[:OUTLIER_CONVERSATIONS], args.outlier_channels,
                                           args.outlier_scale) if args.outlier_channels else None)
    val_items, test_items = load_split(data, "val"), load_split(data, "test")
    results: dict[str, Any] = {
        "command": command_line(argv or sys.argv[1:], kernels), "kernels": kernels,
        "steps": step, "stopped_by_minutes": step < args.steps, "samples": step * per_step, "minutes": train_time / 60,
        "samples_per_s": step * per_step / max(train_time, 1e-9), "n_params": n_params,
        "vocab_size": len(processor.tokenizer), "chance": chance_levels(test_items),
        "val": evaluate(model, encoder, val_items), "test": evaluate(model, encoder, test_items),
        "subset_per_task": SUBSET_PER_TASK,
        "test_subset": evaluate(model, encoder, load_split(data, "test", SUBSET_PER_TASK)),
        "curve": curve, "wall_minutes": (time.time() - start) / 60, "shape": asdict(shape), "seed": args.seed,
        "data": json.loads((data / "manifest.json").read_text()), "vision_curve": vision_curve, "vision_minutes": vision_minutes,
        "text_curve": text_curve, "text_minutes": text_minutes, "outliers": outlier_record,
    }
    print(f"final val: {_format(results['val'])}\nfinal test: {_format(results['test'])}", flush=True)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        write_card(folder, args, shape, n_params, results)
        (folder / "training.json").write_text(json.dumps(results, indent=1))

    write_files_into(args.out, fill, last="training.json")
    return results


if __name__ == "__main__":
    main()

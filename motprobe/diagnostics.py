"""Diagnostics of modality asymmetry: mask IoU between calibration pools, t-SNE of token
activations, and ATV's per-block visual drift and budget (the paper's Fig. A1).

Everything here runs on the original model through atv_prune's engine and capture code; the
functions return plain data, and the ``plot_*`` / ``write_*`` helpers turn it into files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atv_prune.errors import CalibrationError, ConfigError
from atv_prune.model.calibration import CalibrationSet, fit_context
from atv_prune.model.capture import capture_sample, non_block_modules_on
from atv_prune.model.layout import context_length, resolve
from atv_prune.model.loading import resolve_device
from atv_prune.model.walk import walk_blocks
from atv_prune.runs.api import prune
from atv_prune.runs.config import PruneConfig, RunSettings
from atv_prune.runs.plots import save_figure


def pruned_masks(model: nn.Module, calibration: CalibrationSet, config: PruneConfig,
                 settings: RunSettings | None = None) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place with ``config`` and return the boolean mask (True = pruned) of every
    decoder linear, by weight name."""
    layout = resolve(model)
    before = {name: m.weight.detach() == 0 for name, m in _decoder_linears(model, layout.block_path).items()}
    prune(model, None, calibration, config, settings=settings)
    return {name: (m.weight.detach() == 0) & ~before[name]
            for name, m in _decoder_linears(model, layout.block_path).items()}


def _decoder_linears(model: nn.Module, block_path: str) -> dict[str, nn.Linear]:
    prefix = block_path + "."
    return {name: m for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, nn.Linear)}


def mask_iou(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """IoU of the pruned sets per linear: |A ∩ B| / |A ∪ B|, with block index and module name."""
    rows = []
    for name, mask in first.items():
        other = second[name]
        union = int((mask | other).sum())
        block, module = _split_name(name)
        rows.append({"linear": name, "block": block, "module": module,
                     "iou": int((mask & other).sum()) / union if union else 1.0})
    return rows


def _split_name(name: str) -> tuple[int, str]:
    """``...layers.12.self_attn.q_proj`` -> (12, 'self_attn.q_proj')."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[position + 1 :])
    raise ValueError(f"no block index in {name}")


def iou_summary(rows: list[dict[str, Any]], bins: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 0.95, 1.0)) -> dict:
    """Distribution of the IoU values: quantiles, mean, and the share in each bin (as in the paper)."""
    values = np.array([row["iou"] for row in rows])
    edges = (0.0,) + bins
    counts, _ = np.histogram(values, bins=edges)
    shares = {f"{lo:.2f}-{hi:.2f}": float(c / len(values)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}
    by_module: dict[str, list[float]] = {}
    for row in rows:
        by_module.setdefault(row["module"], []).append(row["iou"])
    return {
        "linears": len(values),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "quantiles": {q: float(np.quantile(values, float(q))) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")},
        "max": float(values.max()),
        "share_by_bin": shares,
        "mean_by_module": {module: float(np.mean(v)) for module, v in sorted(by_module.items())},
    }


def check_block_range(blocks: list[int], n_blocks: int) -> None:
    """Refuse block indices outside the model's ``0 .. n_blocks - 1``."""
    if not blocks or min(blocks) < 0 or max(blocks) >= n_blocks:
        raise ConfigError(f"blocks {blocks} are out of range: the model has blocks 0-{n_blocks - 1}")


@torch.no_grad()
def block_activations(
    model: nn.Module, calibration: CalibrationSet, blocks: list[int], device: str | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The input hidden states of the chosen blocks for every calibration token, with its modality:
    ``{block: (activations (tokens, d) fp32, visual (tokens,) bool)}``, from the dense model, run
    one block at a time on ``device`` (default: CUDA when present, else the CPU) by the engine's
    own block walk. Samples are first fitted to the model's context as a pruning run fits them."""
    device = resolve_device(device)
    layout = resolve(model)
    decoder = layout.blocks(model)
    check_block_range(blocks, len(decoder))
    calibration, _ = fit_context(calibration, context_length(model.config), layout.visual_token_ids)
    with non_block_modules_on(model, decoder, device):
        samples = [capture_sample(model, layout, s.inputs, s.source, device, "cpu") for s in calibration.samples]
    collected: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {b: [] for b in blocks}
    for index, _ in walk_blocks(decoder, samples, device, last=max(blocks)):
        if index in collected:
            collected[index] = [(sample.hidden[0].float().cpu(), sample.visual.cpu()) for sample in samples]
    return {b: (torch.cat([h for h, _ in parts]), torch.cat([v for _, v in parts])) for b, parts in collected.items()}


def tsne_embedding(activations: torch.Tensor, visual: torch.Tensor, tokens_per_modality: int, seed: int,
                   perplexity: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE (scikit-learn) of up to ``tokens_per_modality`` text and visual tokens drawn at
    random (seeded); returns the embedding and the visual flags of the drawn tokens."""
    from sklearn.manifold import TSNE

    rng = random.Random(seed)
    chosen = []
    for flag in (False, True):
        positions = (visual == flag).nonzero().squeeze(1).tolist()
        chosen += rng.sample(positions, min(tokens_per_modality, len(positions)))
    if len(chosen) < 3:
        raise CalibrationError(f"only {len(chosen)} tokens for a t-SNE (3 or more needed): raise --samples or --tokens")
    index = torch.tensor(sorted(chosen))
    data = activations[index].numpy()
    embedding = TSNE(n_components=2, perplexity=min(perplexity, (len(index) - 1) / 3), random_state=seed,
                     init="pca").fit_transform(data)
    return embedding, visual[index].numpy()


def plot_iou_histogram(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Histogram of mask IoU over all pruned linears, one colour per module type."""
    import seaborn as sns

    def draw(axis: Any) -> None:
        sns.histplot(x=[r["iou"] for r in rows], hue=[r["module"] for r in rows], multiple="stack",
                     bins=20, ax=axis)
        axis.set_xlabel("mask IoU (text-only vs visual-only calibration)")
        axis.set_ylabel("linears")
        axis.set_title(title)

    save_figure(path, draw)


def plot_tsne(embeddings: dict[int, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """One scatter per block: text vs visual tokens in the t-SNE plane."""
    import seaborn as sns

    def draw(axes: Any) -> None:
        for axis, (block, (points, visual)) in zip(axes, sorted(embeddings.items())):
            sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=np.where(visual, "visual", "text"),
                            hue_order=["text", "visual"], s=8, linewidth=0, ax=axis)
            axis.set_title(f"block {block} input")
            axis.set_xticks([])
            axis.set_yticks([])

    save_figure(path, draw, size=(4.5 * len(embeddings), 4.2), panels=len(embeddings))


def plot_drift(blocks: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per-block mean visual drift (left axis) and visual tokens selected per sample (right axis)."""
    index = [b["index"] for b in blocks]

    def draw(axis: Any) -> None:
        axis.plot(index, [b["mean_drift"] for b in blocks], marker="o", color="tab:blue")
        axis.set_xlabel("decoder block")
        axis.set_ylabel("mean visual drift 1 - cos(h_in, h_out)", color="tab:blue")
        twin = axis.twinx()
        twin.bar(index, [b["visual_tokens_per_sample"] for b in blocks], alpha=0.3, color="tab:orange")
        twin.set_ylabel("visual tokens selected per sample", color="tab:orange")
        axis.set_title(title)

    save_figure(path, draw, size=(7.0, 4.0))


def plot_sensitivity_heatmap(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean retention of every (pathway, pool) row at every target, as a heatmap (Table 1); a
    failed cell is left blank."""
    import seaborn as sns

    columns = [c for c in rows[0] if c.endswith(" mean")]
    values = np.array([[np.nan if row[c] is None else row[c] for c in columns] for row in rows], dtype=float)
    labels = [f"{row['pathway']} / {row['calibration']}" for row in rows]

    def draw(axis: Any) -> None:
        sns.heatmap(values, annot=True, fmt=".1f", cmap="RdYlGn", vmin=min(50.0, float(np.nanmin(values))),
                    vmax=max(100.0, float(np.nanmax(values))), xticklabels=[c.replace(" mean", "") for c in columns],
                    yticklabels=labels, ax=axis, cbar_kws={"label": "mean retention (%)"})
        axis.set_xlabel("target")
        axis.set_ylabel("pruned pathway / calibration")
        axis.set_title("MoT probe: pathway sensitivity")

    save_figure(path, draw, size=(2.0 + 1.6 * len(columns), 1.2 + 0.5 * len(rows)))

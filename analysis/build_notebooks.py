"""Write the analysis notebooks (run once after editing the cell sources below).

Each notebook reads the files a CLI command wrote into a folder named by an environment variable
(so the same notebook runs on the built-in model in CI and on a real study), and never recomputes
what the CLI already measured.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
IMPORTS = {
    "json": "import json",
    "np": "import numpy as np",
    "plt": "import matplotlib.pyplot as plt",
    "sns": "import seaborn as sns",
}


def setup(*names: str) -> str:
    """The first cell's imports: always os, Path, pandas and the Agg backend, plus ``names``."""
    lines = ["import os", "from pathlib import Path", "", "import matplotlib", "import pandas as pd"]
    lines += [IMPORTS[name] for name in names]
    return "\n".join(lines) + '\n\nmatplotlib.use("Agg")\n'


NOTEBOOKS = {
    "mask_iou.ipynb": [
        new_markdown_cell("# Mask IoU between text-only and visual-only calibration\n\n"
                          "Reads the folder written by `motprobe iou` (`MOTPROBE_IOU_DIR`, default `iou/`). "
                          "The paper's LLaVA-NeXT-8B IoU spans about 0.60-1.00 with most linears at 0.90-0.95."),
        new_code_cell(setup("json", "plt", "sns") + 'folder = Path(os.environ.get("MOTPROBE_IOU_DIR", "iou"))\n'
                      'table = pd.read_csv(folder / "iou.csv")\n'
                      'summary = json.loads((folder / "iou_summary.json").read_text())\n'
                      'print({k: summary[k] for k in ("pools", "method", "target", "linears", "mean", "min", "max")})\n'
                      'table.head()'),
        new_markdown_cell("## Distribution, per module type and per block"),
        new_code_cell('by_module = table.groupby("module")["iou"].describe()[["count", "mean", "min", "max"]]\n'
                      'print(by_module)\n'
                      'shares = pd.Series(summary["share_by_bin"])\n'
                      'print(shares)\n'
                      'assert abs(shares.sum() - 1) < 1e-9'),
        new_code_cell('fig, axes = plt.subplots(1, 2, figsize=(11, 4))\n'
                      'sns.histplot(table, x="iou", hue="module", multiple="stack", bins=20, ax=axes[0])\n'
                      'axes[0].set_title("mask IoU per linear")\n'
                      'sns.lineplot(table, x="block", y="iou", hue="module", marker="o", ax=axes[1])\n'
                      'axes[1].set_title("mask IoU per block")\n'
                      'fig.tight_layout()'),
        new_markdown_cell("Low IoU marks linears where text and visual calibration disagree on which weights "
                          "matter: the candidates for modality-aware calibration."),
        new_code_cell('table.sort_values("iou").head(10)'),
    ],
    "tsne.ipynb": [
        new_markdown_cell("# Text and visual token activations (t-SNE)\n\n"
                          "Reads `motprobe tsne` output (`MOTPROBE_TSNE_DIR`, default `tsne/`). The paper finds "
                          "text and visual activations in distinct regions."),
        new_code_cell(setup("plt", "sns") + 'from sklearn.metrics import silhouette_score\n'
                      'folder = Path(os.environ.get("MOTPROBE_TSNE_DIR", "tsne"))\n'
                      'points = pd.read_csv(folder / "tsne.csv")\n'
                      'points.groupby(["block", "modality"]).size()'),
        new_code_cell('blocks = sorted(points["block"].unique())\n'
                      'fig, axes = plt.subplots(1, len(blocks), figsize=(4.5 * len(blocks), 4), squeeze=False)\n'
                      'for axis, block in zip(axes[0], blocks):\n'
                      '    part = points[points["block"] == block]\n'
                      '    sns.scatterplot(part, x="x", y="y", hue="modality", s=8, linewidth=0, ax=axis)\n'
                      '    axis.set_title(f"block {block}")\n'
                      'fig.tight_layout()'),
        new_markdown_cell("How separated are the modalities? Silhouette score of the modality labels in the "
                          "embedding (1: separate clusters, 0: mixed)."),
        new_code_cell('separation = {int(b): float(silhouette_score(p[["x", "y"]], p["modality"]))\n'
                      '              for b, p in points.groupby("block") if p["modality"].nunique() == 2}\n'
                      'separation'),
    ],
    "drift.ipynb": [
        new_markdown_cell("# ATV's per-block visual drift and budget (the paper's Fig. A1)\n\n"
                          "Reads `motprobe drift` output (`MOTPROBE_DRIFT_DIR`, default `drift/`)."),
        new_code_cell(setup("np", "plt") + 'folder = Path(os.environ.get("MOTPROBE_DRIFT_DIR", "drift"))\n'
                      'blocks = pd.read_csv(folder / "drift.csv")\n'
                      'blocks'),
        new_code_cell('fig, axis = plt.subplots(figsize=(7, 4))\n'
                      'axis.plot(blocks["index"], blocks["mean_drift"], marker="o", label="mean visual drift")\n'
                      'axis.set_xlabel("block")\n'
                      'axis.set_ylabel("mean drift")\n'
                      'twin = axis.twinx()\n'
                      'twin.bar(blocks["index"], blocks["visual_tokens_per_sample"], alpha=0.3, color="tab:orange")\n'
                      'twin.set_ylabel("visual tokens selected per sample")\n'
                      'fig.tight_layout()'),
        new_markdown_cell("The budget follows the drift: K = min(n_vis, round(min(1, alpha * drift) * n_text))."),
        new_code_cell('ratio = blocks["visual_tokens_per_sample"] / blocks["text_tokens_per_sample"]\n'
                      'print("visual tokens per text token, per block:", ratio.round(3).tolist())\n'
                      'print("correlation with drift:", float(np.corrcoef(ratio, blocks["mean_drift"])[0, 1])\n'
                      '      if ratio.std() > 0 else "budget constant across blocks")'),
    ],
    "sensitivity.ipynb": [
        new_markdown_cell("# MoT probe: pathway sensitivity (the paper's Table 1)\n\n"
                          "Reads `motprobe sensitivity` output (`MOTPROBE_STUDY_DIR`, default `study/`). "
                          "Paper, LLaVA-NeXT-8B at 60%: text pathway 84.65 / 50.92 / 64.97 (text / visual / "
                          "mixed calibration), visual pathway 100.05 / 99.25 / 99.57."),
        new_code_cell(setup("json", "sns") + 'folder = Path(os.environ.get("MOTPROBE_STUDY_DIR", "study"))\n'
                      'table = pd.read_csv(folder / "results.csv")\n'
                      'results = json.loads((folder / "results.json").read_text())\n'
                      'print("dense scores:", results["dense"]["evaluation"]["scores"])\n'
                      'table'),
        new_code_cell('means = table.set_index(["pathway", "calibration"])[[c for c in table if c.endswith(" mean")]]\n'
                      'ax = sns.heatmap(means, annot=True, fmt=".1f", cmap="RdYlGn")\n'
                      'ax.set_title("mean retention (%)")\n'
                      'means'),
        new_markdown_cell("Which pathway is sensitive, and what calibration does the study recommend?"),
        new_code_cell('gap = means.groupby(level="pathway").min()\n'
                      'print("worst-case retention per pathway:\\n", gap)\n'
                      'recipe = results["recipe"]\n'
                      'print(json.dumps(recipe, indent=2) if recipe else "no recipe (one pathway only)")'),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}})
        nbformat.write(notebook, HERE / name)


if __name__ == "__main__":
    main()

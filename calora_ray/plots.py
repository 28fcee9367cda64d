"""Figures a person looks at instead of reading JSON: sensitivity by block, loss curves, and
`image_grid`, the one maker of labelled image grids (samples, validation images, previews)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_KIND_COLOURS = {"to_q": "#4C72B0", "to_k": "#55A868", "to_v": "#C44E52", "to_out.0": "#8172B2"}


def _block_of(name: str) -> str:
    """'up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q' -> 'up_blocks.1'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def plot_scores(scores: dict[str, float], selected: list[str], path: str | Path, title: str = "",
                ylabel: str = "concept sensitivity") -> None:
    """Bar per candidate in UNet order, coloured by projection, selected ones starred, blocks shaded."""
    names = list(scores)
    values = [scores[n] for n in names]
    chosen = set(selected)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.12 * len(names)), 4.2), dpi=110)
    kinds = [n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in names]
    ax.bar(range(len(names)), values, color=[_KIND_COLOURS.get(k, "grey") for k in kinds], width=0.85)
    top = max(values) if values and max(values) > 0 else 1.0
    for i, n in enumerate(names):
        if n in chosen:
            ax.plot(i, values[i] + 0.04 * top, marker="*", color="black", markersize=9)
    # Shade alternate blocks and label them, so "which part of the UNet" is visible at a glance.
    blocks = [_block_of(n) for n in names]
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or blocks[i] != blocks[start]:
            if len({*blocks[:start]}) % 2 == 1:
                ax.axvspan(start - 0.5, i - 0.5, color="0.92", zorder=0)
            ax.text((start + i - 1) / 2, -0.02, blocks[start].replace("_blocks", ""), rotation=0,
                    ha="center", va="top", fontsize=7, transform=ax.get_xaxis_transform())
            start = i
    for kind, colour in _KIND_COLOURS.items():
        ax.bar([0], [0], color=colour, label=kind)
    ax.plot([], [], marker="*", color="black", linestyle="", label=f"selected ({len(selected)})")
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    ax.set_xticks([])
    ax.set_xlim(-1, len(names))
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "",
              ylabel: str = "diffusion loss", log_scale: bool = False) -> None:
    """Training loss against step, with a moving average when there are enough points."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, color="#4C72B0", alpha=0.5 if len(losses) > 20 else 1.0, label="loss")
    if len(losses) > 20:
        w = max(5, len(losses) // 20)
        smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="#C44E52", label=f"moving average ({w})")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(rows: list[list[Image.Image]], labels: list[str], cell: int | None = None) -> Image.Image:
    """Rows of images, each row under its wrapped label (e.g. the prompt). Nearest-neighbour
    upscaling keeps small images (32-64 px) readable; cells are at least 128 px."""
    size = max(img.size[0] for row in rows for img in row)
    cell = cell or max(128, size)
    cols = max(len(row) for row in rows)
    wrapped = [textwrap.wrap(label, width=max(20, cols * cell // 7))[:3] for label in labels]
    strip = [12 * len(lines) + 6 for lines in wrapped]
    grid = Image.new("RGB", (cols * cell, sum(cell + h for h in strip)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for row, lines, h in zip(rows, wrapped, strip):
        for j, line in enumerate(lines):
            draw.text((3, y + 3 + 12 * j), line, fill="black")
        for i, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (i * cell, y + h))
        y += h + cell
    return grid

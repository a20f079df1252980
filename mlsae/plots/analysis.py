"""Figures of the analysis commands (analyze, resid-sim, report), on matplotlib's Agg canvas.
Uses plots.eval only.

Every `*_figure` function takes plain arrays and an output stem (a path without suffix) and
writes `<stem>.png` and `<stem>.pdf` (PNG for the HTML report, PDF for papers); it returns the
PNG path. Layers on axes are LM block numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mlsae.plots.eval import new_figure

FORMATS = ("png", "pdf")
TICKS_MAX = 16  # label at most this many layers on an axis


def save(fig: Figure, stem: str | Path, formats: Sequence[str] = FORMATS) -> Path:
    stem = Path(stem)
    for fmt in formats:
        fig.savefig(stem.with_suffix(f".{fmt}"), dpi=120)
    return stem.with_suffix(".png")


def _layer_ticks(layers: Sequence[int]) -> tuple[list[int], list[str]]:
    step = max(1, -(-len(layers) // TICKS_MAX))
    pos = list(range(0, len(layers), step))
    return pos, [str(layers[i]) for i in pos]


def layer_heatmap_figure(p: np.ndarray, layers: Sequence[int], stem: str | Path, title: str,
                         latent_ids: Sequence[int] | None = None) -> Path:
    """Heatmap of `p [layer, latent]` (each column a distribution over layers, already sorted).

    With `latent_ids` (few columns) the columns are labelled with the latent ids."""
    n_layers, n_cols = p.shape
    labelled = latent_ids is not None
    fig = new_figure(max(6.0, 0.28 * n_cols + 2.0) if labelled else 10.0,
                  max(3.0, 0.16 * n_layers + 1.6))
    ax = fig.add_subplot()
    # square-root colour scale: a latent spread over L layers has shares near 1/L, which a
    # linear scale up to 1 would show as uniformly dark
    im = ax.imshow(p, aspect="auto", cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                   origin="lower", interpolation="nearest" if labelled else "antialiased")
    fig.colorbar(im, ax=ax, label="share of the latent's activation (sqrt scale)")
    ax.set_yticks(*_layer_ticks(layers))
    ax.set_ylabel("layer")
    if labelled:
        ax.set_xticks(range(n_cols), [str(i) for i in latent_ids], rotation=90, fontsize=7)
        ax.set_xlabel("latent (sorted by mean layer)")
    else:
        ax.set_xlabel(f"{n_cols} latents, sorted by mean layer")
    ax.set_title(title)
    return save(fig, stem)


def std_hist_figure(edges: np.ndarray, latent_counts: np.ndarray, token_counts: np.ndarray,
                    stem: str | Path, what: str = "dataset") -> Path:
    """Histograms (as fractions) of layer std: per latent over the token set vs per active
    (token, latent) pair, on the same bins."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    for counts, label in ((latent_counts, f"per latent, aggregated over the {what}"),
                          (token_counts, "per (token, latent), single tokens")):
        total = counts.sum()
        if total > 0:
            ax.stairs(counts / total, edges, label=label, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("std over layers (layer positions)")
    ax.set_ylabel("fraction")
    ax.set_title("Layer spread of latents: aggregated vs single tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, stem)


def n_active_figure(latent_hist: np.ndarray, pair_hist: np.ndarray, stem: str | Path,
                    what: str = "dataset") -> Path:
    """Bars: fraction of latents active at n layers (over the token set) vs fraction of active
    (token, latent) pairs firing at n layers. Index n of each histogram = n layers."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    n = np.arange(1, len(latent_hist))
    width = 0.4
    for shift, hist, label in ((-width / 2, latent_hist, f"latents ({what})"),
                               (width / 2, pair_hist, "(token, latent) pairs")):
        total = hist[1:].sum()
        if total > 0:
            ax.bar(n + shift, hist[1:] / total, width, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of active layers")
    ax.set_ylabel("fraction")
    ax.set_title("How many layers a latent is active at")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, stem)


def dynamics_figure(entry_hist: np.ndarray, exit_hist: np.ndarray, lifespan_hist: np.ndarray,
                    layers: Sequence[int], stem: str | Path, persistence: float | None = None,
                    contiguous: float | None = None) -> Path:
    """Two panels over active (token, latent) pairs: the entry (first active) and exit (last
    active) layer, and the lifespan exit - entry + 1 in layer positions (index n = n)."""
    fig = new_figure(10.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    pos = np.arange(len(layers))
    total = max(int(entry_hist.sum()), 1)
    ax1.bar(pos - 0.2, entry_hist / total, 0.4, label="entry layer")
    ax1.bar(pos + 0.2, exit_hist / total, 0.4, label="exit layer")
    ax1.set_xticks(*_layer_ticks(layers))
    ax1.set_xlabel("layer")
    ax1.set_ylabel("fraction of active (token, latent) pairs")
    ax1.set_title("Where a latent enters and leaves (per token)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, axis="y")
    n = np.arange(1, len(lifespan_hist))
    ax2.bar(n, lifespan_hist[1:] / max(int(lifespan_hist.sum()), 1), 0.8)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_yscale("log")
    ax2.set_xlabel("lifespan = exit - entry + 1 (layers)")
    ax2.set_ylabel("fraction")
    bits = [f"persistence {persistence:.3f}" if persistence is not None else "",
            f"contiguous {contiguous:.3f}" if contiguous is not None else ""]
    ax2.set_title("Lifespan per token" + (f"\n({', '.join(b for b in bits if b)})"
                                          if any(bits) else ""), fontsize=10)
    ax2.grid(alpha=0.3, axis="y")
    return save(fig, stem)


def top_latents_figure(tokens: Sequence[str], top_ids: np.ndarray, top_acts: np.ndarray,
                       layers: Sequence[int], stem: str | Path) -> Path:
    """Grid token x layer: each cell's colour is the largest activation, its text the latent.

    top_ids, top_acts [layer, token] (-1 / 0 where nothing fired or the position is excluded).
    """
    n_layers, n_tok = top_ids.shape
    fig = new_figure(max(5.0, 0.62 * n_tok + 2.0), max(3.0, 0.24 * n_layers + 1.6))
    ax = fig.add_subplot()
    im = ax.imshow(np.where(top_ids >= 0, top_acts, np.nan), aspect="auto", cmap="magma_r",
                   origin="lower", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="activation of the top latent")
    for i in range(n_layers):
        for j in range(n_tok):
            if top_ids[i, j] >= 0:  # white text on the dark (large) end of magma_r
                dark = im.norm(top_acts[i, j]) > 0.55
                ax.text(j, i, str(int(top_ids[i, j])), ha="center", va="center", fontsize=5,
                        color="white" if dark else "black")
    ax.set_xticks(range(n_tok), [repr(t)[1:-1] for t in tokens], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yticks(*_layer_ticks(layers))
    ax.set_ylabel("layer")
    ax.set_title("Top latent per token and layer")
    return save(fig, stem)


def resid_sim_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], stem: str | Path) -> Path:
    """One line per model: cosine of adjacent layers' centred residuals vs relative depth."""
    fig = new_figure(6.4, 3.8)
    ax = fig.add_subplot()
    for name, (x, cos) in curves.items():
        ax.plot(x, cos, "o-", markersize=3, label=f"{name} (mean {np.mean(cos):.3f})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth of the layer pair")
    ax.set_ylabel("cos(x_l - mean, x_l+1 - mean)")
    ax.set_title("Residual-stream similarity of adjacent layers")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, stem)


def training_curves_figure(rows: list[dict], stem: str | Path) -> Path:
    """Loss, mean FVU, mean L0 and dead fraction against training tokens (metrics.jsonl)."""
    fig = new_figure(11.0, 3.2)
    tokens = [r["tokens"] for r in rows]
    series = {
        "loss": [r["loss"] for r in rows],
        "FVU (mean over layers)": [float(np.mean(r["fvu"])) for r in rows],
        "L0 (mean over layers)": [float(np.mean(r["l0"])) for r in rows],
        "dead fraction": [r["dead_fraction"] for r in rows],
    }
    for ax, (title, ys) in zip(fig.subplots(1, 4), series.items()):
        ax.plot(tokens, ys, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    return save(fig, stem, ("png",))


def latent_layers_figure(p: np.ndarray, counts: np.ndarray, layers: Sequence[int],
                         stem: str | Path, title: str) -> Path:
    """One latent: its share of activation per layer (bars) and firing count (line)."""
    fig = new_figure(4.2, 2.4)
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    ax.bar(x, p, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share", fontsize=8)
    ax.set_xticks(*_layer_ticks(layers))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("layer", fontsize=8)
    twin = ax.twinx()
    twin.plot(x, counts, color="tab:orange", marker=".", linewidth=1)
    twin.set_ylabel("firings", fontsize=8, color="tab:orange")
    twin.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    return save(fig, stem, ("png",))

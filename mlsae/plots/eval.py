"""Figures of `mlsae baselines`, `mlsae compare` and the replacement curve (matplotlib's Agg
canvas, PNG files).

Figures are built with `matplotlib.figure.Figure` and never through pyplot, so no GUI backend
is touched and nothing global changes for a caller that uses pyplot itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Cells above this FVU share the top colour: worse than predicting the mean is "bad" already,
# and letting a far-off layer's FVU of 50 set the scale would wash out the rest.
FVU_VMAX = 1.0
ANNOTATE_MAX = 12  # write the value in each cell up to this many rows/columns


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def fvu_matrix_figure(matrix: torch.Tensor, train_layers: list[int], eval_layers: list[int],
                      path: str | Path) -> Path:
    """Heatmap of `matrix [train layer, eval layer]` FVU values."""
    n_rows, n_cols = matrix.shape
    fig = new_figure(max(4.0, 0.35 * n_cols + 2.5), max(3.0, 0.35 * n_rows + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=FVU_VMAX, aspect="auto")
    fig.colorbar(im, ax=ax, extend="max", label="FVU")
    ax.set_xticks(range(n_cols), [str(v) for v in eval_layers])
    ax.set_yticks(range(n_rows), [str(v) for v in train_layers])
    ax.set_xlabel("evaluated on layer")
    ax.set_ylabel("single-layer SAE trained on layer")
    ax.set_title("FVU of single-layer SAEs across layers")
    if max(n_rows, n_cols) <= ANNOTATE_MAX:
        for i in range(n_rows):
            for j in range(n_cols):
                v = float(matrix[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * FVU_VMAX else "white")
    fig.savefig(path, dpi=120)
    return Path(path)


def compare_figure(rows: list[dict], path: str | Path) -> Path:
    """FVU, dCE and L0 over layers: MLSAE vs single-layer SAEs (rows of `compare`)."""
    fig = new_figure(11.0, 3.4)
    titles = {"fvu": "FVU", "dce": "dCE (nats)", "l0": "L0"}
    for ax, (metric, title) in zip(fig.subplots(1, 3), titles.items()):
        for who, label, style in (("mlsae", "MLSAE", "o-"), ("baseline", "single-layer", "s--")):
            pts = [(r["layer"], r[f"{who}_{metric}"]) for r in rows
                   if r[f"{who}_{metric}"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=4)
        if metric == "dce":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.savefig(path, dpi=120)
    return Path(path)


def replacement_figure(curves: dict[str, dict], path: str | Path) -> Path:
    """Multi-layer replacement curves (eval.json `replacement` dicts, by label): dCE and KL
    after replacing the first n layers, over the deepest replaced layer."""
    fig = new_figure(9.0, 3.4)
    styles = ("o-", "s--", "^:", "d-.")
    for ax, (metric, title) in zip(fig.subplots(1, 2), (("dce", "dCE (nats)"),
                                                        ("kl", "KL(clean || replaced)"))):
        for (label, rep), style in zip(curves.items(), styles):
            xs = [pt["layers"][-1] for pt in rep["curve"]]
            ys = [pt["ce"] - rep["ce_clean"] if metric == "dce" else pt["kl"]
                  for pt in rep["curve"]]
            ax.plot(xs, ys, style, label=label, markersize=4)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layers replaced: all chosen up to this one")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    fig.suptitle("Multi-layer replacement (free-running)")
    fig.savefig(path, dpi=120)
    return Path(path)


ARCH_COLORS = {"topk": "tab:blue", "batchtopk": "tab:orange", "token-topk": "tab:green",
               "jumprelu": "tab:red", "matryoshka": "tab:purple"}


def pareto_figure(curves: dict, path: str | Path, model: str = "", tokens: int = 0) -> Path:
    """FVU and dCE against L0: `curves[arch][kind] = [[l0, fvu, dce], ...]`, one colour per
    architecture, MLSAE solid, single-layer baselines dashed."""
    fig = new_figure(10.0, 4.0)
    axes = fig.subplots(1, 2)
    for arch, kinds in curves.items():
        for kind, pts in kinds.items():
            l0 = [p[0] for p in pts]
            style = "-" if kind == "mlsae" else "--"
            label = f"{arch} ({'MLSAE' if kind == 'mlsae' else 'per-layer'})"
            for ax, j in zip(axes, (1, 2)):
                ax.plot(l0, [p[j] for p in pts], style, marker="o", ms=4,
                        color=ARCH_COLORS.get(arch), label=label)
    for ax, name in zip(axes, ("FVU", "dCE (nats)")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per vector)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"matched-L0 comparison{' on ' + model if model else ''}"
                 f"{f', {tokens:,} held-out tokens' if tokens else ''}", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)

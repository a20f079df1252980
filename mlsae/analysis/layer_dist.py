"""Layer distributions of latents (SPEC §5): over a token set (`LayerDistribution`: counts and
totals per (layer, latent), p_f(l), mean layer, layer std, entropy, active-layer counts) and
over one prompt (heatmaps). Pure tensors; uses torch only.

Input convention. For one batch the SAE gives, per (layer, token) vector, its k selected latents:
``top_idx [layer, *tok, k]`` (int64 latent ids) and ``top_acts [layer, *tok, k]`` (float, >= 0
after ReLU; a zero means "selected by top-k but inactive"). ``*tok`` is any number of token dims
(e.g. ``[batch, seq]``); they are flattened to ``[token]``. ``layer`` is the POSITION in the
SAE's layer list (0..L-1), not the LM block number. An optional boolean ``mask [*tok]`` keeps
only the included tokens (SPEC §2 excluded positions). Nothing here builds a dense
``[layer, token, n_latents]`` tensor.

Variance over layers, used everywhere in this module: for a distribution ``p`` over layer
positions ``l = 0..L-1`` (non-negative, summing to 1),

    mean(p) = sum_l p(l) * l,   Var(p) = sum_l p(l) * (l - mean(p))**2,   std(p) = sqrt(Var(p)),

i.e. the variance of the layer position of a random draw from ``p`` (a population variance, in
squared layer-index units). A latent at one layer only has Var 0; uniform over L layers has
Var (L**2 - 1) / 12; the maximum is ((L - 1) / 2)**2 (half the mass at each end).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Threshold for "layer l is active for latent f": counts[l, f] >= max(min_count,
# min_frac * sum_l counts[l, f]). Why: one stray firing should not make a latent "multi-layer",
# so a layer must carry at least 1% of the latent's firings. 1% is below the uniform share 1/L
# for any L <= 100, so a genuinely spread-out latent keeps all its layers. min_count = 1 keeps
# rare latents (fewer than 100 firings) counted at every layer where they fired at all.
DEFAULT_MIN_COUNT = 1
DEFAULT_MIN_FRAC = 0.01


def flatten_codes(top_idx: Tensor, top_acts: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """[layer, *tok, k] -> [layer, token, k], keeping only tokens where ``mask [*tok]`` is true."""
    if top_idx.shape != top_acts.shape or top_idx.dim() < 3:
        raise ValueError(f"need top_idx/top_acts [layer, *tok, k], got {tuple(top_idx.shape)}")
    n_layers, k = top_idx.shape[0], top_idx.shape[-1]
    idx, acts = top_idx.reshape(n_layers, -1, k), top_acts.reshape(n_layers, -1, k)
    if mask is not None:
        if tuple(mask.shape) != tuple(top_idx.shape[1:-1]):
            raise ValueError(f"mask {tuple(mask.shape)} != token dims {tuple(top_idx.shape[1:-1])}")
        keep = mask.reshape(-1).to(device=idx.device, dtype=torch.bool)
        idx, acts = idx[:, keep], acts[:, keep]
    return idx, acts


def active_entries(idx: Tensor, acts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Active entries of [layer, token, k] as flat (layer [m], token [m], latent [m], act [m])."""
    layer, token, slot = (acts > 0).nonzero(as_tuple=True)
    return layer, token, idx[layer, token, slot], acts[layer, token, slot].double()


def layer_probs(totals: Tensor) -> Tensor:
    """p_f(l) = totals[l, f] / sum_l totals[l, f]: [layer, n] -> [layer, n] float64.

    Latents with zero total (never fired) get NaN columns.
    """
    totals = totals.double()
    s = totals.sum(0, keepdim=True)
    return torch.where(s > 0, totals / s.clamp_min(1e-300), torch.nan)


def layer_moments(p: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [n], Var [n]) of each column of ``p [layer, n]`` over layer positions 0..L-1.

    Var is sum_l p(l) (l - mean)^2 (module docstring), computed centred for accuracy.
    """
    pos = torch.arange(p.shape[0], dtype=p.dtype, device=p.device)[:, None]  # [layer, 1]
    mean = (p * pos).sum(0)
    return mean, (p * (pos - mean) ** 2).sum(0)


def layer_entropy(p: Tensor) -> Tensor:
    """H(p_f) / log L for ``p [layer, n]`` -> [n], in [0, 1]; 0 log 0 = 0; L = 1 gives 0."""
    n_layers = p.shape[0]
    h = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(0)
    h = torch.where(p.isnan().any(0), torch.nan, h)
    return h / math.log(n_layers) if n_layers > 1 else h * 0


def n_active_layers(
    counts: Tensor, min_count: int = DEFAULT_MIN_COUNT, min_frac: float = DEFAULT_MIN_FRAC
) -> Tensor:
    """Number of layers where latent f is active: [layer, n] -> [n] int64.

    Layer l counts when counts[l, f] >= max(min_count, min_frac * sum_l counts[l, f]); see
    DEFAULT_MIN_COUNT / DEFAULT_MIN_FRAC for why. min_count=1, min_frac=0 counts any firing;
    min_count below 1 acts as 1 (a layer with no firing is never active).
    """
    thr = (min_frac * counts.sum(0, keepdim=True).double()).clamp_min(max(min_count, 1))
    return (counts.double() >= thr).sum(0)


def aggregated_layer_var(totals: Tensor) -> float:
    """Mean over latents that ever fired of Var_l(p_f) (SPEC §5 "aggregated layer variance")."""
    var = layer_moments(layer_probs(totals))[1]
    alive = ~var.isnan()
    return var[alive].mean().item() if alive.any() else math.nan


class LayerDistribution:
    """Streaming per-(layer, latent) firing counts and activation totals over a token set.

    Memory O(L x n). ``counts [L, n]`` int64: tokens where latent f > 0 at layer l;
    ``totals [L, n]`` float64: sum of its activations there.
    """

    def __init__(self, n_layers: int, n_latents: int, device: torch.device | str = "cpu"):
        self.n_layers, self.n_latents = n_layers, n_latents
        self.counts = torch.zeros(n_layers, n_latents, dtype=torch.int64, device=device)
        self.totals = torch.zeros(n_layers, n_latents, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def update(self, top_idx: Tensor, top_acts: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch: top_idx, top_acts [layer, *tok, k]; mask [*tok] (optional)."""
        dev = self.counts.device
        idx, acts = flatten_codes(top_idx.to(dev), top_acts.to(dev), mask)
        if idx.shape[0] != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {idx.shape[0]}")
        layer, _, latent, a = active_entries(idx, acts)
        flat = layer * self.n_latents + latent  # [m] index into the flattened [L, n]
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.totals.view(-1).index_add_(0, flat, a)
        self.n_tokens += idx.shape[1]

    def probs(self) -> Tensor:
        """p_f(l) [L, n] (NaN for dead latents)."""
        return layer_probs(self.totals)

    def per_latent(
        self, min_count: int = DEFAULT_MIN_COUNT, min_frac: float = DEFAULT_MIN_FRAC
    ) -> dict[str, Tensor]:
        """Per-latent stats, each [n]: count, total, layer_mean, layer_var, layer_std,
        entropy (H/log L), n_active_layers. Float stats are NaN for latents that never fired."""
        p = self.probs()
        mean, var = layer_moments(p)
        return {
            "count": self.counts.sum(0),
            "total": self.totals.sum(0),
            "layer_mean": mean,
            "layer_var": var,
            "layer_std": var.sqrt(),
            "entropy": layer_entropy(p),
            "n_active_layers": n_active_layers(self.counts, min_count, min_frac),
        }

    def aggregated_layer_var(self) -> float:
        """Mean over latents that ever fired of Var_l(p_f)."""
        return aggregated_layer_var(self.totals)

    def state_dict(self) -> dict[str, Tensor]:
        return {"counts": self.counts, "totals": self.totals}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> LayerDistribution:
        counts, totals = state["counts"], state["totals"]
        out = cls(*counts.shape, device=counts.device)
        out.counts.copy_(counts)
        out.totals.copy_(totals)
        return out


def std_histogram(std: Tensor, n_layers: int, n_bins: int = 50) -> tuple[Tensor, Tensor]:
    """Histogram of layer stds on fixed bins over [0, (L-1)/2] (the largest possible std).

    Returns (counts [n_bins] int64, edges [n_bins + 1] float64). NaNs are dropped. Using the
    same edges for per-token and per-latent stds makes the two histograms directly comparable.
    """
    hi = max((n_layers - 1) / 2, 1e-12)
    std = std.double()
    std = std[~std.isnan()]
    edges = torch.linspace(0, hi, n_bins + 1, dtype=torch.float64)
    b = (std.cpu() / hi * n_bins).floor().long().clamp_(0, n_bins - 1)
    return torch.bincount(b, minlength=n_bins), edges


def prompt_distribution(
    top_idx: Tensor, top_acts: Tensor, n_latents: int, mask: Tensor | None = None
) -> Tensor:
    """Activations summed over a prompt's tokens: [layer, *tok, k] -> totals [layer, n] float64.

    Feed it to layer_probs / layer_moments / layer_entropy for the per-latent prompt stats.
    """
    idx, acts = flatten_codes(top_idx, top_acts, mask)
    layer, _, latent, a = active_entries(idx, acts)
    totals = torch.zeros(idx.shape[0] * n_latents, dtype=torch.float64, device=a.device)
    return totals.index_add_(0, layer * n_latents + latent, a).view(idx.shape[0], n_latents)


def normalize_over_layers(totals: Tensor) -> Tensor:
    """Each latent (column) of totals [layer, n] divided by its sum over layers (NaN if 0)."""
    return layer_probs(totals)


def heatmap_latents(totals: Tensor, n_top: int = 32) -> tuple[Tensor, Tensor]:
    """Pick latents for a layer x latent heatmap of one prompt.

    Takes the ``n_top`` latents with the largest total activation over the prompt, orders them
    by mean layer (so the heatmap reads as a diagonal), and returns (latent ids [n_top'],
    normalized distributions [layer, n_top'] where each column sums to 1). n_top' <= n_top
    (only latents that fired).
    """
    total = totals.double().sum(0)
    n_top = min(n_top, int((total > 0).sum()))
    ids = total.topk(n_top).indices
    p = layer_probs(totals[:, ids])
    order = layer_moments(p)[0].argsort(stable=True)
    return ids[order], p[:, order]


def weak_firings(idx: Tensor, acts: Tensor, n_latents: int,
                 fractions: tuple[float, ...] = (0.01, 0.05)) -> dict[str, float]:
    """Share of the active (acts > 0) activations below `fraction` x their latent's mean
    active activation, from every active entry `idx, acts [...]` of a token set (the weak
    firings a fixed per-vector budget forces at layers where a feature is absent)."""
    on = acts > 0
    i, a = idx[on].long(), acts[on].double()
    if len(a) == 0:
        return {f"frac_weak_{round(f * 100)}pct": math.nan for f in fractions}
    mean = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, i, a) / torch.bincount(
        i, minlength=n_latents).clamp_min(1)
    return {f"frac_weak_{round(f * 100)}pct": (a < f * mean[i]).double().mean().item()
            for f in fractions}

"""Pure-tensor statistics for the MLSAE analyses (SPEC §5). No model loading, no I/O except SQLite.

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

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from os import PathLike

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_FRAC",
    "LayerDistribution",
    "PerTokenLayerVariance",
    "ResidSimilarity",
    "TopExamples",
    "aggregated_layer_var",
    "example_locations",
    "heatmap_latents",
    "layer_entropy",
    "layer_moments",
    "layer_probs",
    "max_cosine_between",
    "max_cosine_within",
    "mmcs_between",
    "mmcs_within",
    "n_active_layers",
    "normalize_over_layers",
    "prompt_distribution",
    "query_examples",
    "std_histogram",
    "update_contexts",
]

# Threshold for "layer l is active for latent f": counts[l, f] >= max(min_count,
# min_frac * sum_l counts[l, f]). Why: one stray firing should not make a latent "multi-layer",
# so a layer must carry at least 1% of the latent's firings. 1% is below the uniform share 1/L
# for any L <= 100, so a genuinely spread-out latent keeps all its layers. min_count = 1 keeps
# rare latents (fewer than 100 firings) counted at every layer where they fired at all.
DEFAULT_MIN_COUNT = 1
DEFAULT_MIN_FRAC = 0.01


def _flatten(top_idx: Tensor, top_acts: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
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


def _active_entries(idx: Tensor, acts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Active entries of [layer, token, k] as flat (layer [m], token [m], latent [m], act [m])."""
    layer, token, slot = (acts > 0).nonzero(as_tuple=True)
    return layer, token, idx[layer, token, slot], acts[layer, token, slot].double()


# --------------------------------------------------------------------------------------------
# Per-latent layer distributions (dataset-level and prompt-level share these functions)
# --------------------------------------------------------------------------------------------


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
        idx, acts = _flatten(top_idx.to(dev), top_acts.to(dev), mask)
        if idx.shape[0] != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {idx.shape[0]}")
        layer, _, latent, a = _active_entries(idx, acts)
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


# --------------------------------------------------------------------------------------------
# Per-token layer variance
# --------------------------------------------------------------------------------------------


class PerTokenLayerVariance:
    """Streaming per-token layer variance (SPEC §5 "single token").

    For token t and latent f active at >= 1 layer, q_tf(l) = a_l(t)_f / sum_l a_l(t)_f.
    ``compute()["per_token_var"]`` = mean over ACTIVE (t, f) pairs of Var_l(q_tf) (module
    docstring's variance). Work per batch is O(L * T * k): the (token, latent) pairs are grouped
    by the key t * n + f with torch.unique; no [T, n] or [L, T, n] tensor is built.

    Also kept (bounded memory):
      * a histogram of per-pair layer std on ``std_histogram`` bins, and a histogram of the
        number of layers each active pair fires at (``n_layers_hist [L + 1]``);
      * the seed paper's code variant (tim-lawson/mlsae ``analysis/variances.py``), which
        densifies per batch, sets q_tf = 0 for inactive (t, f) and then, per batch b of T_b
        tokens, averages over ALL n latents:
          seed_var_tf_b = (1 / (T_b n)) sum_{active (t,f)} Var(q_tf)  (inactive pairs count 0);
          seed_var_f_b  = (1 / n) sum_f [sum_l l^2 qbar_f(l) - (sum_l l qbar_f(l))^2],
            with qbar_f(l) = (1 / T_b) sum_t q_tf(l), NOT renormalised: its mass is the firing
            rate rho_f, so the bracket is rho_f Var(r_f) + rho_f (1 - rho_f) mean(r_f)^2 with
            r_f = qbar_f / rho_f; the second part is the "squared-mean term";
        and reports the mean over batches of seed_var_tf_b, seed_var_f_b and of their ratio
        (seed ``exp_var_l_tf``, ``exp_var_l_f``, ``rel_var_t``), plus the same two quantities
        over all tokens at once (``*_global``), which do not depend on the batch size.
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        n_bins: int = 50,
        device: torch.device | str = "cpu",
    ):
        self.n_layers, self.n_latents, self.n_bins = n_layers, n_latents, n_bins
        self.var_sum, self.std_sum, self.n_pairs, self.n_tokens = 0.0, 0.0, 0, 0
        self.std_hist = torch.zeros(n_bins, dtype=torch.int64)
        self.n_layers_hist = torch.zeros(n_layers + 1, dtype=torch.int64)
        # seed variant: sum_t q_tf(l) over all tokens [L, n], and per-batch sums
        self.qsum = torch.zeros(n_layers, n_latents, dtype=torch.float64, device=device)
        self.seed_tf_sum, self.seed_f_sum, self.seed_ratio_sum, self.n_batches = 0.0, 0.0, 0.0, 0

    def update(self, top_idx: Tensor, top_acts: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch: top_idx, top_acts [layer, *tok, k]; mask [*tok] (optional)."""
        dev = self.qsum.device
        idx, acts = _flatten(top_idx.to(dev), top_acts.to(dev), mask)
        n_layers, n_tok, n = self.n_layers, idx.shape[1], self.n_latents
        if idx.shape[0] != n_layers:
            raise ValueError(f"expected {n_layers} layers, got {idx.shape[0]}")
        if n_tok == 0:
            return
        layer, token, latent, a = _active_entries(idx, acts)  # each [m]
        pos = layer.double()
        _, g, n_at = torch.unique(token * n + latent, return_inverse=True, return_counts=True)
        n_groups = n_at.shape[0]  # active (t, f) pairs in this batch

        def gsum(x: Tensor) -> Tensor:  # per-(t, f) sum of x [m] -> [n_groups]
            return torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(0, g, x)

        w = gsum(a)  # sum_l a_l(t)_f
        q = a / w[g]  # q_tf(l) for the active entries [m]
        mean = gsum(q * pos)
        var = gsum(q * (pos - mean[g]) ** 2)
        std = var.sqrt()

        self.var_sum += var.sum().item()
        self.std_sum += std.sum().item()
        self.n_pairs += n_groups
        self.n_tokens += n_tok
        self.std_hist += std_histogram(std, n_layers, self.n_bins)[0]
        self.n_layers_hist += torch.bincount(n_at.cpu(), minlength=n_layers + 1)

        # seed variant for this batch (qbar over this batch's tokens), then global accumulator
        qb = torch.zeros(n_layers * n, dtype=torch.float64, device=a.device)
        qb = qb.index_add_(0, layer * n + latent, q).view(n_layers, n)
        self.qsum += qb
        seed_f = _unnormalised_var(qb / n_tok).mean().item()
        seed_tf = var.sum().item() / (n_tok * n)
        self.seed_tf_sum += seed_tf
        self.seed_f_sum += seed_f
        self.seed_ratio_sum += seed_tf / seed_f if seed_f > 0 else math.nan
        self.n_batches += 1

    def compute(self) -> dict[str, float | Tensor]:
        """Results. Floats: per_token_var (mean over active (t, f) of Var_l(q_tf)),
        per_token_std_mean (mean of its sqrt), n_pairs, n_tokens, frac_single_layer (share of
        active pairs at exactly one layer), seed_var_tf / seed_var_f / seed_ratio (batch means,
        see class docstring), seed_var_tf_global / seed_var_f_global. Tensors: std_hist
        [n_bins], std_edges [n_bins + 1], n_layers_hist [L + 1]."""
        nan = math.nan
        npairs, nb, ntok = self.n_pairs, self.n_batches, self.n_tokens
        return {
            "per_token_var": self.var_sum / npairs if npairs else nan,
            "per_token_std_mean": self.std_sum / npairs if npairs else nan,
            "n_pairs": npairs,
            "n_tokens": ntok,
            "frac_single_layer": self.n_layers_hist[1].item() / npairs if npairs else nan,
            "std_hist": self.std_hist.clone(),
            "std_edges": std_histogram(torch.zeros(0), self.n_layers, self.n_bins)[1],
            "n_layers_hist": self.n_layers_hist.clone(),
            "seed_var_tf": self.seed_tf_sum / nb if nb else nan,
            "seed_var_f": self.seed_f_sum / nb if nb else nan,
            "seed_ratio": self.seed_ratio_sum / nb if nb else nan,
            "seed_var_tf_global": self.var_sum / (ntok * self.n_latents) if ntok else nan,
            "seed_var_f_global": _unnormalised_var(self.qsum / ntok).mean().item() if ntok else nan,
        }


def _unnormalised_var(m: Tensor) -> Tensor:
    """sum_l l^2 m(l) - (sum_l l m(l))^2 for columns of m [L, n] that need not sum to 1 (seed)."""
    pos = torch.arange(m.shape[0], dtype=m.dtype, device=m.device)[:, None]
    return (m * pos**2).sum(0) - (m * pos).sum(0) ** 2


# --------------------------------------------------------------------------------------------
# Single prompt
# --------------------------------------------------------------------------------------------


def prompt_distribution(
    top_idx: Tensor, top_acts: Tensor, n_latents: int, mask: Tensor | None = None
) -> Tensor:
    """Activations summed over a prompt's tokens: [layer, *tok, k] -> totals [layer, n] float64.

    Feed it to layer_probs / layer_moments / layer_entropy for the per-latent prompt stats.
    """
    idx, acts = _flatten(top_idx, top_acts, mask)
    layer, _, latent, a = _active_entries(idx, acts)
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


# --------------------------------------------------------------------------------------------
# Residual-stream similarity (exact, two passes)
# --------------------------------------------------------------------------------------------


class ResidSimilarity:
    """Mean over tokens of cos(x_l(t) - xbar_l, x_{l+1}(t) - xbar_{l+1}) per adjacent pair.

    Exact two-pass API (the cosine is not linear, so centring needs the final means first)::

        sim = ResidSimilarity(n_layers, d_model)
        for x in batches: sim.update_mean(x)     # pass 1, x [layer, *tok, d_model]
        sim.finalize_means()
        for x in batches: sim.update(x)          # pass 2, the SAME tokens again
        cos, mean_cos = sim.compute()            # [L - 1] float64, float

    A centred vector of norm 0 gives cosine 0 (denominator clamped to ``eps``).
    """

    def __init__(self, n_layers: int, d_model: int, eps: float = 1e-12):
        self.n_layers, self.d_model, self.eps = n_layers, d_model, eps
        self.sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.n_mean = 0
        self.mean: Tensor | None = None  # [layer, d_model] float64 after finalize_means()
        self.cos_sum = torch.zeros(max(n_layers - 1, 0), dtype=torch.float64)
        self.n_cos = 0

    def _tokens(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if x.shape[0] != self.n_layers or x.shape[-1] != self.d_model:
            raise ValueError(f"expected [{self.n_layers}, *tok, {self.d_model}], got {x.shape}")
        x = x.reshape(self.n_layers, -1, self.d_model)
        if mask is not None:
            x = x[:, mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
        return x.double()

    def update_mean(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Pass 1: x [layer, *tok, d_model], mask [*tok] (optional)."""
        if self.mean is not None:
            raise RuntimeError("update_mean() after finalize_means()")
        x = self._tokens(x, mask)
        self.sum += x.sum(1).cpu()
        self.n_mean += x.shape[1]

    def finalize_means(self) -> Tensor:
        """End pass 1; returns xbar [layer, d_model]."""
        if self.n_mean == 0:
            raise RuntimeError("no tokens seen in pass 1")
        self.mean = self.sum / self.n_mean
        return self.mean

    def update(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Pass 2: x [layer, *tok, d_model], mask [*tok] (optional)."""
        if self.mean is None:
            raise RuntimeError("call finalize_means() before update()")
        x = self._tokens(x, mask)
        u = x - self.mean.to(x.device)[:, None]  # [layer, token, d]
        norm = u.norm(dim=-1)  # [layer, token]
        dot = (u[:-1] * u[1:]).sum(-1)  # [layer - 1, token]
        self.cos_sum += (dot / (norm[:-1] * norm[1:]).clamp_min(self.eps)).sum(1).cpu()
        self.n_cos += x.shape[1]

    def compute(self, strict: bool = True) -> tuple[Tensor, float]:
        """(cos per adjacent pair [L - 1], mean over pairs). ``strict`` checks that pass 2 saw as
        many tokens as pass 1 (the caller must re-stream the same tokens)."""
        if self.n_cos == 0:
            raise RuntimeError("no tokens seen in pass 2")
        if strict and self.n_cos != self.n_mean:
            raise RuntimeError(f"pass 2 saw {self.n_cos} tokens, pass 1 saw {self.n_mean}")
        cos = self.cos_sum / self.n_cos
        return cos, (cos.mean().item() if cos.numel() else math.nan)


# --------------------------------------------------------------------------------------------
# Decoder geometry (MMCS), chunked over rows: never an n x m matrix
# --------------------------------------------------------------------------------------------


def _unit(w: Tensor) -> Tensor:
    w = w.float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def max_cosine_within(w_dec: Tensor, chunk: int = 256) -> Tensor:
    """For each row of w_dec [n, d], the max cosine with any OTHER row -> [n] float32."""
    w = _unit(w_dec)
    n = w.shape[0]
    if n < 2:
        return torch.full((n,), math.nan)
    out = torch.empty(n, device=w.device)
    for s in range(0, n, chunk):
        sims = w[s : s + chunk] @ w.T  # [c, n]
        r = torch.arange(sims.shape[0], device=w.device)
        sims[r, s + r] = -math.inf  # exclude self
        out[s : s + chunk] = sims.max(1).values
    return out


def max_cosine_between(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """For each row of a [n, d], the max cosine with any row of b [m, d] -> [n] float32."""
    a, b = _unit(a), _unit(b)
    return torch.cat([(a[s : s + chunk] @ b.T).max(1).values for s in range(0, a.shape[0], chunk)])


def mmcs_within(w_dec: Tensor, chunk: int = 256) -> float:
    """Mean max cosine similarity within one dictionary w_dec [n, d] (self excluded)."""
    return max_cosine_within(w_dec, chunk).mean().item()


def mmcs_between(a: Tensor, b: Tensor, chunk: int = 256) -> float:
    """Mean over rows of a [n, d] of the max cosine with rows of b [m, d] (not symmetric)."""
    return max_cosine_between(a, b, chunk).mean().item()


# --------------------------------------------------------------------------------------------
# Max-activating examples: bounded top-N per (latent, layer), SQLite storage
# --------------------------------------------------------------------------------------------


class TopExamples:
    """For every (latent, layer), the ``n_top`` largest activations seen while streaming.

    State (key = latent * L + layer): ``values [n * L, n_top]`` float32 (0 = empty slot; real
    activations are > 0), ``seq`` and ``pos`` int32 (-1 when empty), sorted by value descending
    within a key. Memory 12 * n * L * n_top bytes, independent of the tokens streamed. Each
    update drops candidates not above the key's current n_top-th value, then re-sorts only the
    touched keys' rows together with the surviving candidates (two stable sorts + segment
    ranks). Ties keep the example seen first.
    """

    def __init__(
        self, n_latents: int, n_layers: int, n_top: int = 16, device: torch.device | str = "cpu"
    ):
        self.n_latents, self.n_layers, self.n_top = n_latents, n_layers, n_top
        n_keys = n_latents * n_layers
        self.values = torch.zeros(n_keys, n_top, dtype=torch.float32, device=device)
        self.seq = torch.full((n_keys, n_top), -1, dtype=torch.int32, device=device)
        self.pos = torch.full((n_keys, n_top), -1, dtype=torch.int32, device=device)

    def update(
        self,
        top_idx: Tensor,
        top_acts: Tensor,
        seq_offset: int = 0,
        seq_ids: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add one batch.

        top_idx, top_acts: [layer, batch, seq, k]. A batch row's sequence id is
        ``seq_ids[b]`` if given ([batch] int), else ``seq_offset + b``; ``pos`` is the index
        along ``seq``. mask [batch, seq] (optional) drops excluded positions.
        """
        n_layers, n_batch, n_seq, k = top_idx.shape
        if n_layers != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {n_layers}")
        dev, n_top = self.values.device, self.n_top
        top_idx, top_acts = top_idx.to(dev), top_acts.to(dev)
        layer_pos = torch.arange(n_layers, device=dev).view(-1, 1, 1, 1)
        keys = top_idx * n_layers + layer_pos  # [layer, batch, seq, k]
        # only candidates that beat the current n_top-th value of their key can enter
        # (the threshold is >= 0, so this also drops inactive slots)
        cand = top_acts.float() > self.values[:, -1][keys]
        if mask is not None:
            cand &= mask.to(device=dev, dtype=torch.bool)[None, :, :, None]
        _, b, s, _ = cand.nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        c_keys, c_vals = keys[cand], top_acts[cand].float()
        if seq_ids is None:
            seq_ids = torch.arange(seq_offset, seq_offset + n_batch)
        c_seq = seq_ids.to(dev)[b].int()
        c_pos = s.int()

        touched = torch.unique(c_keys)  # [U], sorted
        all_keys = torch.cat([touched.repeat_interleave(n_top), c_keys])
        all_vals = torch.cat([self.values[touched].reshape(-1), c_vals])
        all_seq = torch.cat([self.seq[touched].reshape(-1), c_seq])
        all_pos = torch.cat([self.pos[touched].reshape(-1), c_pos])
        # one stable sort by (key ascending, value descending): the bits of a float32 >= 0 read
        # as int32 are monotonic in its value, so pack key * 2^31 + (2^31 - 1 - bits) in int64
        bits = all_vals.view(torch.int32).long()
        order = (all_keys * 2**31 + (2**31 - 1 - bits)).argsort(stable=True)
        all_keys = all_keys[order]
        counts = torch.unique_consecutive(all_keys, return_counts=True)[1]  # [U], >= n_top each
        starts = counts.cumsum(0) - counts
        rank = torch.arange(all_keys.numel(), device=dev) - starts.repeat_interleave(counts)
        keep = rank < n_top  # every touched row gets all n_top slots rewritten
        k_keys, k_rank, k_ord = all_keys[keep], rank[keep], order[keep]
        self.values[k_keys, k_rank] = all_vals[k_ord]
        self.seq[k_keys, k_rank] = all_seq[k_ord]
        self.pos[k_keys, k_rank] = all_pos[k_ord]

    def get(self, latent: int, layer: int) -> list[tuple[float, int, int]]:
        """[(activation, seq, pos)] for one (latent, layer position), best first."""
        key = latent * self.n_layers + layer
        v, sq, p = self.values[key], self.seq[key], self.pos[key]
        return [(v[i].item(), int(sq[i]), int(p[i])) for i in range(self.n_top) if v[i] > 0]

    def to_sqlite(
        self,
        db_path: str | PathLike[str],
        layer_ids: Sequence[int] | None = None,
        chunk: int = 1 << 20,
    ) -> int:
        """Write the examples to table ``examples`` (replacing it); returns the row count.

        Columns: latent, layer, rank (0 = largest), activation, seq, pos, and nullable
        context_tokens (JSON list of token ids), context_acts (JSON list of floats),
        context_start (position of context_tokens[0] in the sequence), filled later with
        ``update_contexts``. ``layer`` is the layer position, or ``layer_ids[position]`` when
        given (e.g. the LM block numbers). Index on (latent, layer).
        """
        layer_map = torch.tensor(
            list(layer_ids) if layer_ids is not None else range(self.n_layers), dtype=torch.int64
        )
        con = sqlite3.connect(db_path)
        try:
            con.execute("DROP TABLE IF EXISTS examples")
            con.execute(
                "CREATE TABLE examples(latent INTEGER NOT NULL, layer INTEGER NOT NULL,"
                " rank INTEGER NOT NULL, activation REAL NOT NULL, seq INTEGER NOT NULL,"
                " pos INTEGER NOT NULL, context_tokens TEXT, context_acts TEXT,"
                " context_start INTEGER)"
            )
            values, seq, pos = self.values.cpu(), self.seq.cpu(), self.pos.cpu()
            n_rows = 0
            rows_per_chunk = max(chunk // self.n_top, 1)
            for s in range(0, values.shape[0], rows_per_chunk):
                v = values[s : s + rows_per_chunk]
                key, rank = (v > 0).nonzero(as_tuple=True)
                key_g = key + s
                lat, lay = key_g // self.n_layers, layer_map[key_g % self.n_layers]
                cols = (lat, lay, rank, v[key, rank].double(), seq[key_g, rank], pos[key_g, rank])
                rows = list(zip(*(c.tolist() for c in cols)))
                con.executemany(
                    "INSERT INTO examples(latent, layer, rank, activation, seq, pos)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                n_rows += len(rows)
            con.execute("CREATE INDEX examples_latent_layer ON examples(latent, layer)")
            con.commit()
        finally:
            con.close()
        return n_rows


def example_locations(db_path: str | PathLike[str]) -> list[tuple[int, int, int, int, int]]:
    """All (latent, layer, rank, seq, pos) rows ordered by (seq, pos), so a caller can re-stream
    the needed sequences once to build context windows."""
    con = sqlite3.connect(db_path)
    try:
        return con.execute(
            "SELECT latent, layer, rank, seq, pos FROM examples ORDER BY seq, pos"
        ).fetchall()
    finally:
        con.close()


def update_contexts(
    db_path: str | PathLike[str],
    updates: Iterable[tuple[int, int, int, Sequence[int], Sequence[float], int]],
) -> None:
    """Fill context columns: each update is (latent, layer, rank, context_tokens, context_acts,
    context_start), with context_acts the (latent, layer) activation at each context token."""
    con = sqlite3.connect(db_path)
    try:
        con.executemany(
            "UPDATE examples SET context_tokens = ?, context_acts = ?, context_start = ?"
            " WHERE latent = ? AND layer = ? AND rank = ?",
            (
                (
                    json.dumps([int(t) for t in toks]),
                    json.dumps([float(a) for a in acts]),
                    int(start),
                    int(lat),
                    int(lay),
                    int(rank),
                )
                for lat, lay, rank, toks, acts, start in updates
            ),
        )
        con.commit()
    finally:
        con.close()


def query_examples(db_path: str | PathLike[str], latent: int, layer: int) -> list[dict]:
    """Examples for one (latent, layer) ordered by rank, as dicts with the table's columns
    (context_tokens / context_acts decoded from JSON, None when not filled yet)."""
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute(
            "SELECT * FROM examples WHERE latent = ? AND layer = ? ORDER BY rank",
            (latent, layer),
        ).fetchall()
    finally:
        con.close()
    out = []
    for r in rows:
        d = dict(r)
        for c in ("context_tokens", "context_acts"):
            d[c] = json.loads(d[c]) if d[c] is not None else None
        out.append(d)
    return out

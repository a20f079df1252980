"""Per-token layer variance (SPEC §5 "single token"): for each active (token, latent) pair the
variance over layers of q_tf(l) = a_l(t)_f / sum_l a_l(t)_f, averaged, against the aggregated
layer variance; also the seed paper's convention (inactive tokens counted as zeros), so both
numbers can be reported. Conventions as in `mlsae.analysis.layer_dist`. Pure tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlsae.analysis.layer_dist import active_entries, flatten_codes, std_histogram


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
        idx, acts = flatten_codes(top_idx.to(dev), top_acts.to(dev), mask)
        n_layers, n_tok, n = self.n_layers, idx.shape[1], self.n_latents
        if idx.shape[0] != n_layers:
            raise ValueError(f"expected {n_layers} layers, got {idx.shape[0]}")
        if n_tok == 0:
            return
        layer, token, latent, a = active_entries(idx, acts)  # each [m]
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

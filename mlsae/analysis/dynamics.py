"""Latent dynamics across layers (SPEC §5 "dynamics"): how a latent that is active for one
token moves through the layer list. Persistence, contiguity, entry / exit layer and lifespan,
pooled and per latent, streamed with bounded memory. Pure tensors; uses torch and the input
conventions of `mlsae.analysis.layer_dist`.

Definitions. ``i = 0..L-1`` are the POSITIONS in the run's layer list. For token t and latent f,
``S_tf`` = the positions where f is active (activation > 0) at t; (t, f) is an active pair when
S_tf is not empty.

* persistence = pooled P(i + 1 in S_tf | i in S_tf) over active pairs and i < L - 1:
  sum_tf #{i in S_tf : i + 1 in S_tf} / sum_tf #{i in S_tf : i < L - 1}.
  NaN when the denominator is 0 (e.g. L = 1, or every pair active at the last layer only).
* frac_pairs_contiguous: share of active pairs whose S_tf is one contiguous run
  (max - min + 1 == |S_tf|; a single layer is contiguous).
* entry = min S_tf, exit = max S_tf, lifespan = exit - entry + 1 (in layer positions; gaps are
  inside the lifespan).
* Per latent f: entry_layer / exit_layer = the mean over its active pairs of entry / exit;
  persistence = the same ratio as above restricted to f's pairs (NaN when f never fired or its
  denominator is 0); n_pairs, frac_contiguous.

Work per batch is O(m log m) for m active (layer, token, slot) entries: pairs are grouped by the
key t * n + f and adjacency is read from the entries sorted by (pair, layer). No [T, n] or
[L, T, n] tensor is built; the state is O(n + L).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlsae.analysis.layer_dist import active_entries, flatten_codes

PER_LATENT_KEYS = ("n_pairs", "entry_layer", "exit_layer", "lifespan", "persistence",
                   "frac_contiguous")


class LayerDynamics:
    """Streaming persistence / contiguity / entry / exit / lifespan (module docstring).

    ``update(top_idx, top_acts, mask)`` with top_idx, top_acts ``[layer, *tok, k]`` and the
    optional include mask ``[*tok]``; ``compute()`` for the pooled numbers and histograms,
    ``per_latent()`` for the per-latent tensors.
    """

    def __init__(self, n_layers: int, n_latents: int, device: torch.device | str = "cpu"):
        self.n_layers, self.n_latents = n_layers, n_latents

        def zeros(n: int, dtype=torch.int64) -> Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        # per latent: active pairs, sum of entry / exit positions, persistence numerator and
        # denominator, contiguous pairs
        self.pairs, self.entry_sum, self.exit_sum = zeros(n_latents), zeros(n_latents), \
            zeros(n_latents)
        self.next_active, self.can_continue = zeros(n_latents), zeros(n_latents)
        self.contiguous = zeros(n_latents)
        # histograms over active pairs: entry / exit position [L], lifespan 1..L at [1..L]
        self.entry_hist, self.exit_hist = zeros(n_layers), zeros(n_layers)
        self.lifespan_hist = zeros(n_layers + 1)
        self.n_tokens = 0

    def update(self, top_idx: Tensor, top_acts: Tensor, mask: Tensor | None = None) -> None:
        """Add one batch: top_idx, top_acts [layer, *tok, k]; mask [*tok] (optional)."""
        dev = self.pairs.device
        idx, acts = flatten_codes(top_idx.to(dev), top_acts.to(dev), mask)
        n_layers, n = self.n_layers, self.n_latents
        if idx.shape[0] != n_layers:
            raise ValueError(f"expected {n_layers} layers, got {idx.shape[0]}")
        self.n_tokens += idx.shape[1]
        layer, token, latent, _ = active_entries(idx, acts)  # each [m]
        if layer.numel() == 0:
            return
        keys, g = torch.unique(token * n + latent, return_inverse=True)  # pair id per entry
        n_groups = keys.shape[0]
        f = keys % n  # latent of each pair [n_groups]
        # entries sorted by (pair, layer): consecutive entries of one pair one layer apart are
        # an "i and i + 1 both active" event (a latent occupies at most one top-k slot)
        order = torch.argsort(g * n_layers + layer)
        gs, ls = g[order], layer[order]
        step = (gs[1:] == gs[:-1]) & (ls[1:] - ls[:-1] == 1)
        nxt = torch.zeros(n_groups, dtype=torch.int64, device=dev)
        nxt.index_add_(0, gs[:-1], step.long())

        def gsum(x: Tensor) -> Tensor:
            return torch.zeros(n_groups, dtype=torch.int64, device=dev).index_add_(0, g, x)

        size = gsum(torch.ones_like(layer))
        not_last = gsum((layer < n_layers - 1).long())
        lo = torch.full((n_groups,), n_layers, dtype=torch.int64, device=dev)
        lo = lo.scatter_reduce_(0, g, layer, "amin")
        hi = torch.full((n_groups,), -1, dtype=torch.int64, device=dev)
        hi = hi.scatter_reduce_(0, g, layer, "amax")
        span = hi - lo + 1
        contiguous = (span == size).long()

        self.pairs.index_add_(0, f, torch.ones_like(f))
        self.entry_sum.index_add_(0, f, lo)
        self.exit_sum.index_add_(0, f, hi)
        self.next_active.index_add_(0, f, nxt)
        self.can_continue.index_add_(0, f, not_last)
        self.contiguous.index_add_(0, f, contiguous)
        self.entry_hist += torch.bincount(lo, minlength=n_layers)
        self.exit_hist += torch.bincount(hi, minlength=n_layers)
        self.lifespan_hist += torch.bincount(span, minlength=n_layers + 1)

    def per_latent(self) -> dict[str, Tensor]:
        """Per latent, each [n]: n_pairs (int64), entry_layer, exit_layer, lifespan (mean of
        exit - entry + 1), persistence, frac_contiguous (float64, NaN for latents that never
        fired; persistence also NaN when no active layer of f had a next layer)."""
        pairs = self.pairs.double()
        nan = torch.tensor(math.nan, dtype=torch.float64, device=pairs.device)

        def ratio(a: Tensor, b: Tensor) -> Tensor:
            b = b.double()
            return torch.where(b > 0, a.double() / b.clamp_min(1), nan)

        entry, exit_ = ratio(self.entry_sum, pairs), ratio(self.exit_sum, pairs)
        return {
            "n_pairs": self.pairs.clone(),
            "entry_layer": entry,
            "exit_layer": exit_,
            "lifespan": exit_ - entry + 1,
            "persistence": ratio(self.next_active, self.can_continue),
            "frac_contiguous": ratio(self.contiguous, pairs),
        }

    def compute(self) -> dict[str, float | int | list[int]]:
        """Pooled numbers (plain Python, JSON-ready): persistence, frac_pairs_contiguous,
        mean_entry_layer, mean_exit_layer, mean_lifespan, active_pairs, and the histograms
        entry_layer_hist [L], exit_layer_hist [L], lifespan_hist [L + 1] (index = lifespan,
        index 0 always 0) over active pairs."""
        n_pairs = int(self.pairs.sum())
        den = int(self.can_continue.sum())
        nan = math.nan

        def mean(s: Tensor) -> float:
            return int(s.sum()) / n_pairs if n_pairs else nan

        mean_entry, mean_exit = mean(self.entry_sum), mean(self.exit_sum)
        return {
            "persistence": int(self.next_active.sum()) / den if den else nan,
            "frac_pairs_contiguous": mean(self.contiguous),
            "mean_entry_layer": mean_entry,
            "mean_exit_layer": mean_exit,
            "mean_lifespan": mean_exit - mean_entry + 1 if n_pairs else nan,
            "active_pairs": n_pairs,
            "entry_layer_hist": self.entry_hist.cpu().tolist(),
            "exit_layer_hist": self.exit_hist.cpu().tolist(),
            "lifespan_hist": self.lifespan_hist.cpu().tolist(),
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("pairs", "entry_sum", "exit_sum", "next_active",
                                               "can_continue", "contiguous", "entry_hist",
                                               "exit_hist", "lifespan_hist")}


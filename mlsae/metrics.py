"""Streaming reconstruction metrics per layer (SPEC §4): FVU, MSE, L0, dead/alive latents, and
the centred sum of squares that every FVU denominator uses. Uses torch only.

Sums are kept in float64 so memory is O(layers x (d_model + n_latents)), not O(tokens).
FVU_l = sum_t ||x^ - x||^2 / sum_t ||x - xbar_l||^2 with xbar_l the per-component mean over
all evaluated tokens, computed exactly as sum ||x||^2 - N ||xbar||^2.
"""

from __future__ import annotations

import torch
from torch import Tensor


def f64(t: Tensor) -> Tensor:
    """`t` (detached) as float64 for exact sums: on its own device where that has float64
    (CPU, CUDA), else on the host (Apple MPS has no float64). Every float64 statistic of
    training and evaluation is made here (tests/test_devices.py checks that)."""
    t = t.detach()
    if t.device.type == "mps":
        t = t.cpu()
    return t.double()


def centred_sum_sq(sum_x: Tensor, sum_sq: Tensor, n: Tensor | float) -> Tensor:
    """sum_t ||x_t - xbar||^2 from `sum_x = sum_t x_t [..., d]`, `sum_sq = sum_t ||x_t||^2
    [...]` and the count `n`. The difference cancels: pass float64 sums."""
    return sum_sq - sum_x.pow(2).sum(-1) / n


class ReconstructionStats:
    def __init__(self, n_layers: int, d_model: int, n_latents: int):
        dt = torch.float64  # host tensors
        self.n = 0  # tokens per layer
        self.sq_err = torch.zeros(n_layers, dtype=dt)  # sum ||x^ - x||^2
        self.sum_x = torch.zeros(n_layers, d_model, dtype=dt)
        self.sum_sq = torch.zeros(n_layers, dtype=dt)  # sum ||x||^2
        self.l0_sum = torch.zeros(n_layers, dtype=dt)
        self.fired = torch.zeros(n_layers, n_latents, dtype=torch.bool)
        self.d_model = d_model

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor, idx: Tensor) -> None:
        """x, x_hat `[layer, token, d_model]`; acts, idx `[layer, token, k]`."""
        for i in range(x.shape[0]):
            self.update_layer(i, x[i], x_hat[i], acts[i], idx[i])
        self.n += x.shape[1]

    @torch.no_grad()
    def update_layer(self, i: int, x: Tensor, x_hat: Tensor, acts: Tensor, idx: Tensor) -> None:
        """Layer position `i`: x, x_hat `[token, d_model]`; acts, idx `[token, k]`. The caller
        adds the token count to `n` once per batch (every layer sees the same tokens). The
        float64 copies are one layer's, so memory is bounded by `[token, d_model]`."""
        err = torch.linalg.vector_norm(x_hat - x, dim=-1)  # [token], input dtype
        xd = f64(x.cpu())
        self.sq_err[i] += f64(err.cpu()).square().sum()
        self.sum_x[i] += xd.sum(dim=0)
        self.sum_sq[i] += xd.square().sum()
        active = (acts > 0).cpu()
        self.l0_sum[i] += active.sum().item()
        self.fired[i, idx.cpu()[active]] = True

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        total_var = centred_sum_sq(self.sum_x, self.sum_sq, self.n)
        fvu = (self.sq_err / total_var).tolist()
        mse = (self.sq_err / (self.n * self.d_model)).tolist()
        l0 = (self.l0_sum / self.n).tolist()
        alive = self.fired.sum(dim=1).tolist()
        dead_fraction = 1.0 - self.fired.any(dim=0).float().mean().item()
        return {
            "tokens": self.n,
            "per_layer": {"fvu": fvu, "mse": mse, "l0": l0, "alive": alive},
            "mean": {"fvu": _mean(fvu), "mse": _mean(mse), "l0": _mean(l0)},
            "dead_fraction": dead_fraction,
        }


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)

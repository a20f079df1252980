"""`jumprelu`: a = z * H(z - theta) with a learned threshold per latent (Rajamanoharan et al.
2024), the inference form BatchTopK and Matryoshka export to.

Training. H has no useful derivative, so theta learns through straight-through estimators
with a rectangle kernel K of `bandwidth` eps: d a / d theta = -(theta / eps) K((z - theta)/eps)
and d H / d theta = -(1 / eps) K((z - theta) / eps); d a / d z = H(z - theta) (DeepMind's
form: the penalty trains theta, not the encoder). The loss adds `l0_coef` x the mean L0 per
vector, the coefficient rising linearly over the first `l0_warmup` fraction of the steps.
Only entries with z > theta - eps / 2 can have a gradient in theta, so training keeps those
(the active ones and the band below the threshold) and never the dense pre-activations.
theta starts at the first batch's BatchTopK threshold (the k x N-th largest z+), so the run
starts at L0 ~ k instead of L0 ~ n_latents / 2; it is kept >= 0 (SAELens does the same).
Dead latents: AuxK, as for every architecture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlsae.sae.arch import ThresholdInference, register
from mlsae.sae.ops import Selection, above_threshold, group_topk


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpGate(torch.autograd.Function):
    """a = z * H(z - theta) with the straight-through gradient in theta."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = g * (z > theta)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * g
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta), with d/d theta = -(1/eps) K((z - theta)/eps) and no gradient in z."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return None, -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * g, None


def jump_gate(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return _JumpGate.apply(z, theta, eps)


def step(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return _Step.apply(z, theta, eps)


@register
class JumpReLU(ThresholdInference):
    """A learned threshold per latent."""

    name = "jumprelu"
    options = {"bandwidth": 0.05, "l0_coef": 2e-3, "l0_warmup": 0.1}

    def setup(self, sae) -> None:
        sae.threshold = nn.Parameter(torch.zeros(sae.n_latents))

    def select(self, sae, xc, *, train, n_layers, matmul_dtype, dead, auxk) -> Selection:
        theta = sae.threshold.detach().clamp_min(0)
        if train:  # the band below theta too: its entries carry theta's gradient
            theta = theta - self.opts["bandwidth"] / 2
        return above_threshold(xc, sae.W_enc, sae.b_enc, theta, matmul_dtype, dead, auxk)

    def activate(self, sae, sel: Selection, train: bool) -> Tensor:
        theta = sae.threshold.clamp_min(0)[sel.idx]
        return jump_gate(sel.vals, theta, self.opts["bandwidth"]) * sel.mask

    def penalty(self, sae, sel: Selection) -> Tensor:
        theta = sae.threshold.clamp_min(0)[sel.idx]
        return (step(sel.vals, theta, self.opts["bandwidth"]) * sel.mask).sum(1)

    @torch.no_grad()
    def init_from_batch(self, sae, xt: Tensor) -> None:
        xc = xt[:4096] - sae.b_dec
        sel = group_topk(xc, sae.W_enc, sae.b_enc, sae.k, None)
        kept = sel.vals[sel.mask & (sel.vals > 0)]
        sae.threshold.fill_(float(kept.min()) if len(kept) else 0.0)

    @torch.no_grad()
    def after_step(self, sae, min_kept: float) -> None:
        sae.threshold.clamp_(min=0)

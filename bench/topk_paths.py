"""The two top-k paths agree: after 6 training steps with dead latents (AuxK active), weights
trained on the C kernel path vs the torch.topk path (what CUDA and MPS use); and the SAE's
input gradient against a dense autograd reference. Prints the measured relative errors.

    python bench/topk_paths.py
"""

from __future__ import annotations

import os

import torch

from mlsae.sae import MLSAE
from mlsae.train.loss import loss

D, N, K, LAYERS, TOKENS, STEPS = 64, 512, 8, 4, 256, 6


def train_weights(no_kernel: bool) -> dict[str, torch.Tensor]:
    os.environ["MLSAE_NO_KERNELS"] = "1" if no_kernel else "0"
    g = torch.Generator().manual_seed(0)
    sae = MLSAE(D, N, K)
    sae.reset_parameters(g)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, eps=6.25e-10)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::2] = True  # half the latents dead: AuxK picks among them every step
    for _ in range(STEPS):
        x = torch.randn(LAYERS, TOKENS, D, generator=g)
        out = loss(sae, x, dead, auxk=D // 2)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
    return {n: p.detach().clone() for n, p in sae.named_parameters()}


def input_grad_error() -> float:
    g = torch.Generator().manual_seed(1)
    sae = MLSAE(D, N, K)
    sae.reset_parameters(g)
    x = (torch.randn(200, D, generator=g) * 2 + 1).requires_grad_()
    (got,) = torch.autograd.grad(sae(x).x_hat.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    mu, std = x2.mean(-1, keepdim=True), x2.std(-1, keepdim=True, unbiased=False)
    xt = (x2 - mu) / (std + sae.eps)
    pre = (xt - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    ref_x_hat = (acts @ sae.W_dec + sae.b_dec) * (std + sae.eps) + mu
    (ref,) = torch.autograd.grad(ref_x_hat.sum(), x2)
    return ((got - ref).norm() / ref.norm()).item()


def main() -> None:
    a, b = train_weights(False), train_weights(True)
    rel = max(((a[n] - b[n]).abs().max() / a[n].abs().max()).item() for n in a)
    print(f"kernel vs torch top-k path, {STEPS} steps with dead latents: relative max weight "
          f"difference {rel:.2e}")
    print(f"input gradient vs dense autograd: relative error {input_grad_error():.2e}")


if __name__ == "__main__":
    main()

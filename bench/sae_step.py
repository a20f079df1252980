"""SAE step throughput: mlsae vs a naive dense TopK SAE vs the encoder-matmul floor.

Shapes: d_model 576, k 32, 30 layers x 2048 tokens = 61440 vectors per step, n_latents 4608
and 36864. One step = forward + backward + Adam + decoder constraints. Figures are ratios
taken in this process on the same random inputs (peak memory: see bench/train_e2e.py).
MLSAE_NO_KERNELS=1 measures mlsae with torch.topk instead of the compiled top-k kernel.

    .venv/bin/python bench/sae_step.py [--vectors 61440] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

from mlsae.runtime import keep_freed_memory
from mlsae.sae import MLSAE

D, K = 576, 32


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mlsae_step(sae: MLSAE, opt, x: torch.Tensor, matmul_dtype=None):
    """What Trainer.sae_step does, without the bookkeeping: the fused training forward."""
    def step():
        out = sae.forward_train(x, matmul_dtype=matmul_dtype)
        loss = out.err.sum() / x.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
    return step


def naive_step(W_enc, b_enc, W_dec, b_dec, opt, x: torch.Tensor):
    """Dense TopK SAE: dense code [N, n_latents], dense decode, dense encoder backward."""
    def step():
        pre = F.relu((x - b_dec) @ W_enc + b_enc)
        top = pre.topk(K, dim=-1)
        code = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        x_hat = code @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum() / x.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=int, default=30 * 2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latents", default="4608,36864")
    args = ap.parse_args()
    keep_freed_memory()  # as `mlsae train` does; applies to every variant in this process
    torch.manual_seed(0)
    x = torch.randn(args.vectors, D)
    print(f"threads={torch.get_num_threads()} vectors/step={args.vectors} d={D} k={K}")
    print(f"{'n_latents':>9} {'variant':<22} {'s/step':>8} {'vectors/s':>10} {'vs floor':>9}")
    for n in map(int, args.latents.split(",")):
        W = torch.randn(D, n) / D**0.5
        floor = timed(lambda w=W: x @ w, args.repeats)
        Wb, xb = W.bfloat16(), x.bfloat16()
        floor_bf16 = timed(lambda a=xb, w=Wb: a @ w, args.repeats)
        rows = [("encoder matmul fp32", floor), ("encoder matmul bf16", floor_bf16)]
        for dtype in (torch.bfloat16, None):
            sae = MLSAE(D, n, K)
            opt = torch.optim.Adam(sae.parameters(), lr=1e-3, eps=6.25e-10)
            gc.collect()
            rows.append((f"mlsae ({'bf16' if dtype else 'fp32'} select)",
                         timed(mlsae_step(sae, opt, x, dtype), args.repeats)))
            del sae, opt
        params = [torch.nn.Parameter(t) for t in (W.clone(), torch.zeros(n), W.T.clone(),
                                                   torch.zeros(D))]
        opt = torch.optim.Adam(params, lr=1e-3)
        gc.collect()
        rows.append(("naive dense TopK", timed(naive_step(*params, opt, x), args.repeats)))
        del params, opt
        for name, sec in rows:
            print(f"{n:>9} {name:<22} {sec:>8.3f} {args.vectors / sec:>10.0f} "
                  f"{sec / floor:>8.2f}x")
        naive = rows[-1][1]
        best = min(r[1] for r in rows if r[0].startswith("mlsae"))
        print(f"{n:>9} mlsae speed-up over naive dense: {naive / best:.2f}x; "
              f"mlsae step / fp32 encoder-matmul floor: {best / floor:.2f}x")


if __name__ == "__main__":
    main()

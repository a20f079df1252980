"""Per-step cost of each SAE architecture against `topk`, in one process on the same inputs.

One step = what Trainer.sae_step does: the loss (`mlsae.train.loss.loss`: the architecture's
training rule, Matryoshka's prefix losses, JumpReLU's L0 penalty, AuxK with 5% of the latents
dead), backward, decoder-gradient projection, Adam, decoder renormalisation and the
architecture's after-step update (the running threshold). Shapes: d_model 576, n_latents 4608,
k 32, `--layers` x `--tokens` vectors per step (SmolLM2's default run: 30 x 2048). Steps are
interleaved across architectures (round-robin) so that load on a shared machine hits all
alike; the median of `--repeats` is reported. MLSAE_NO_KERNELS=1 measures the torch.topk path.

    .venv/bin/python bench/arch_step.py [--layers 8] [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mlsae.runtime import keep_freed_memory
from mlsae.sae import ARCHITECTURES, MLSAE
from mlsae.train.loss import loss

D, N, K = 576, 4608, 32


def make_step(arch: str, x: torch.Tensor, dead: torch.Tensor):
    torch.manual_seed(0)
    sae = MLSAE(D, N, K, architecture=arch)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, eps=6.25e-10)
    xt, _, _ = sae.preprocess(x.reshape(-1, D))
    sae.arch.init_from_batch(sae, xt)
    coef = 2e-3 if arch == "jumprelu" else 0.0

    def step() -> None:
        out = loss(sae, x, dead, auxk=D // 2, matmul_dtype=torch.bfloat16, penalty_coef=coef)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        sae.arch.after_step(sae, out.min_kept)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    args = ap.parse_args()
    keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    # a low-rank-plus-noise stand-in for residual vectors: random Gaussian vectors would
    # give every latent the same pre-activation scale
    basis = torch.randn(64, D, generator=g)
    x = (torch.randn(args.layers, args.tokens, 64, generator=g) @ basis
         + 0.3 * torch.randn(args.layers, args.tokens, D, generator=g))
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::20] = True
    archs = args.archs.split(",")
    steps = {a: make_step(a, x, dead) for a in archs}
    times: dict[str, list[float]] = {a: [] for a in archs}
    for a in archs:
        steps[a]()  # warm-up
    for _ in range(args.repeats):
        for a in archs:
            t0 = time.perf_counter()
            steps[a]()
            times[a].append(time.perf_counter() - t0)
    print(f"threads={torch.get_num_threads()} vectors/step={args.layers * args.tokens} "
          f"d={D} n_latents={N} k={K} repeats={args.repeats} (median)")
    base = statistics.median(times["topk"]) if "topk" in times else None
    for a in archs:
        med = statistics.median(times[a])
        ratio = f"{med / base:.2f}x topk" if base else ""
        print(f"{a:<11} {med:>7.3f} s/step  {ratio}")


if __name__ == "__main__":
    main()

"""Peak memory of one mlsae SAE training step vs vectors per step and vs n_latents.

Each point runs in a fresh subprocess (peak RSS is per process). Expected scaling: the
parameters and Adam state are O(n_latents x d_model); the activations and sparse codes are
O(vectors x (d_model + k)); the encoder's pre-activations are computed one chunk of rows at
a time (bf16, 2 bytes per entry), so nothing is O(vectors x n_latents).

    .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

D, K = 576, 32


def one(vectors: int, n_latents: int) -> dict:
    import torch

    from mlsae.runtime import keep_freed_memory
    from mlsae.sae import MLSAE, _rows_per_chunk

    keep_freed_memory()  # as `mlsae train` does
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    sae = MLSAE(D, n_latents, K)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(vectors, D)
    for _ in range(2):
        loss = sae.forward_train(x, matmul_dtype=torch.bfloat16).err.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"vectors": vectors, "n_latents": n_latents, "peak_gb": peak,
            "step_gb": peak - base,
            "pre_activations_bf16_gb": vectors * n_latents * 2 / 2**30,
            "chunk_pre_activations_gb": min(vectors, _rows_per_chunk(x.device)) * n_latents * 2
            / 2**30}


def main() -> None:
    if len(sys.argv) == 3:
        print("RESULT " + json.dumps(one(int(sys.argv[1]), int(sys.argv[2]))))
        return
    points = [(v, 4608) for v in (8192, 30720, 61440)] + [(30720, n) for n in (9216, 36864)] \
        + [(61440, 36864)]
    print(f"{'vectors':>8} {'n_latents':>9} {'peak GB':>8} {'step GB':>8} "
          f"{'all pre-acts GB':>15} {'one chunk GB':>12}")
    for v, n in points:
        out = subprocess.run([sys.executable, __file__, str(v), str(n)], capture_output=True,
                             text=True).stdout
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        print(f"{v:>8} {n:>9} {r['peak_gb']:>8.2f} {r['step_gb']:>8.2f} "
              f"{r['pre_activations_bf16_gb']:>15.2f} {r['chunk_pre_activations_gb']:>12.3f}")


if __name__ == "__main__":
    main()

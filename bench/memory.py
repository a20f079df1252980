"""Peak memory of one mlsae SAE training step vs vectors per step and vs n_latents, and of
`mlsae eval` on a model with a large vocabulary.

Each point runs in a fresh subprocess (peak RSS is per process). Expected scaling: the
parameters and Adam state are O(n_latents x d_model); the activations and sparse codes are
O(vectors x (d_model + k)); the encoder's pre-activations are computed one chunk of rows at
a time (bf16, 2 bytes per entry), so nothing is O(vectors x n_latents).

Eval (`--eval`): a tiny random Gemma 3 (2 blocks, d_model 64) with Gemma 3's 262,144-token
vocabulary, an x4 k8 MLSAE on both blocks, one batch of 4 x 512 random tokens through
`mlsae.evaluate.evaluate_batches` (what `mlsae eval` runs per batch), and a 64k-vocabulary
case for the scaling. The subprocess runs under `ulimit -v` (20 GB of address space) so a
regression cannot take the machine down; it then reports "out of memory".

    .venv/bin/python bench/memory.py            # SAE training steps
    .venv/bin/python bench/memory.py --eval     # eval, 262k and 64k vocabularies
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

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


def one_eval(vocab: int, batch: int, ctx: int) -> dict:
    """Peak RSS of evaluating one [batch, ctx] batch on a tiny random Gemma 3 with `vocab`."""
    from types import SimpleNamespace

    import torch
    import transformers as T

    from mlsae.config import DataConfig
    from mlsae.evaluate import evaluate_batches
    from mlsae.lm import wrap_model
    from mlsae.sae import MLSAE

    torch.manual_seed(0)
    d = 64
    cfg = T.Gemma3TextConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, sliding_window=64, bos_token_id=2, eos_token_id=1,
                             pad_token_id=0)
    tok = SimpleNamespace(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    lm = wrap_model(T.Gemma3ForCausalLM(cfg), tok, "tiny-gemma3")
    sae = MLSAE(d, 4 * d, 8)
    ids = torch.randint(3, vocab, (batch, ctx))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    rec, ce, _ = evaluate_batches(sae, lm, [0, 1], [ids], DataConfig(ctx_len=ctx),
                                  torch.zeros(2, d), progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"vocab": vocab, "batch": batch, "ctx": ctx, "peak_gb": peak,
            "eval_gb": peak - base, "seconds": seconds,
            "ce_clean": ce.result()["ce_clean"][0],
            "one_logits_tensor_gb": batch * ctx * vocab * 4 / 2**30}


def main_eval() -> None:
    print(f"{'vocab':>7} {'batch x ctx':>11} {'peak GB':>8} {'eval GB':>8} "
          f"{'one [pos, vocab] fp32 GB':>24} {'s':>6}")
    for vocab, batch, ctx in ((262_144, 4, 512), (65_536, 4, 512), (262_144, 1, 512)):
        cmd = (f"ulimit -v {20 * 2**20}; exec {sys.executable} {__file__} --eval-one "
               f"{vocab} {batch} {ctx}")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"{vocab:>7} {f'{batch} x {ctx}':>11} out of memory (or failed): "
                  f"{out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[0][7:])
        print(f"{vocab:>7} {f'{batch} x {ctx}':>11} {r['peak_gb']:>8.2f} {r['eval_gb']:>8.2f} "
              f"{r['one_logits_tensor_gb']:>24.2f} {r['seconds']:>6.1f}")


def main() -> None:
    if sys.argv[1:2] == ["--eval-one"]:
        print("RESULT " + json.dumps(one_eval(*map(int, sys.argv[2:5]))))
        return
    if sys.argv[1:2] == ["--eval"]:
        main_eval()
        return
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

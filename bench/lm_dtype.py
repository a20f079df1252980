"""Should the LM run in bfloat16 on this CPU? Speed and quality, measured in one run.

Speed: the W1 LM forward (SmolLM2-135M, 8 x 256 tokens, all 30 layers) in float32 and in
bfloat16, median of --repeats.
Quality: two MLSAEs (W1: all 30 layers, x8, k32) trained on the same --tokens with the LM in
float32 and in bfloat16, both scored on the same held-out tokens with FLOAT32 activations. The
bar (issue 15): bf16-trained held-out FVU within 1% (relative) of the fp32-trained one.

    python bench/lm_dtype.py [--tokens 65536] [--repeats 5] [--skip-quality]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mlsae import DataConfig, RunConfig, SAEConfig, TrainConfig
from mlsae.lm import load_lm
from mlsae.runtime import cpu_has_native_bf16


def forward_seconds(lm, repeats: int) -> float:
    ids = torch.randint(0, 40000, (8, 256))
    layers = list(range(lm.n_layers))
    lm.resid_post(ids, layers)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lm.resid_post(ids, layers)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def heldout_fvu(sae_run: Path, lm32, tokens: int) -> float:
    from mlsae.data import TokenSource
    from mlsae.train.loop import heldout_summaries
    from mlsae.train.plan import read_run_config
    from mlsae.train.trainer import Trainer

    cfg = read_run_config(sae_run)
    tr = Trainer(cfg, lm32.d_model, list(range(lm32.n_layers)), sae_run, torch.device("cpu"))
    tr.load()
    src = TokenSource(cfg.data, lm32.tokenizer, lm32.eos_id, seed=cfg.train.seed)
    return heldout_summaries([tr], lm32, src, tokens, progress=False)[0]["mean"]["fvu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    print(f"CPU bf16 units (avx512_bf16 / amx_bf16): {cpu_has_native_bf16()}")
    lm32 = load_lm("smollm2-135m", "cpu", "float32")
    lm16 = load_lm("smollm2-135m", "cpu", "bfloat16")
    s32, s16 = forward_seconds(lm32, args.repeats), forward_seconds(lm16, args.repeats)
    print(f"LM forward, 8 x 256 tokens, 30 layers: float32 {s32:.2f} s, bfloat16 {s16:.2f} s "
          f"({s32 / s16:.2f}x)", flush=True)
    if args.skip_quality:
        return
    from mlsae.train import train

    fvu = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lm in (("float32", lm32), ("bfloat16", lm16)):
            cfg = RunConfig(SAEConfig(expansion_factor=8, k=32), DataConfig(ctx_len=256),
                            TrainConfig(tokens=args.tokens, dtype=name, eval_tokens=0,
                                        out=f"{tmp}/{name}"))
            train(cfg, lm=lm, progress=False)
            fvu[name] = heldout_fvu(Path(tmp) / name, lm32, args.eval_tokens)
            print(f"trained with the LM in {name}: held-out FVU on float32 activations "
                  f"{fvu[name]:.4f}", flush=True)
    rel = (fvu["bfloat16"] - fvu["float32"]) / fvu["float32"]
    print(f"bf16-trained vs fp32-trained held-out FVU: {rel:+.2%} relative "
          f"({'within' if abs(rel) <= 0.01 else 'outside'} the 1% bar)")


if __name__ == "__main__":
    main()

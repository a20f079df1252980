"""W1 training throughput on one accelerator, mlsae against EleutherAI sparsify in one run.

W1: SmolLM2-135M, all 30 layers, expansion 8, k 32, ctx 256, 8 sequences per step, pydoc text.
Both trainers get the same LM (bfloat16 on CUDA devices that support it, else float32) on the
same device; sparsify uses its Triton kernels when triton is installed (it is with CUDA torch).
Each runs in its own subprocess; the first step is a warm-up and is not timed.

    python bench/gpu_w1.py --device cuda --steps 20
    python bench/gpu_w1.py --device cpu --steps 2      # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CTX, BATCH, LAYERS = 256, 8, list(range(30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lm(device: str):
    from mlsae.lm import load_lm
    from mlsae.runtime import auto_dtype

    dev = torch.device(device)
    return load_lm("smollm2-135m", device, auto_dtype(dev)), dev


def _sequences(lm, n: int) -> list[torch.Tensor]:
    from mlsae.config import DataConfig
    from mlsae.data import TokenSource

    src = TokenSource(DataConfig(ctx_len=CTX), lm.tokenizer, lm.eos_id)
    return [s for _, s in zip(range(n), src.train_sequences(0))]


def run_mlsae(device: str, steps: int) -> dict:
    from mlsae import DataConfig, RunConfig, SAEConfig, TrainConfig
    from mlsae.activations import batch_activations
    from mlsae.data import batches
    from mlsae.train import Trainer

    lm, dev = _lm(device)
    cfg = RunConfig(SAEConfig(expansion_factor=8, k=32), DataConfig(ctx_len=CTX),
                    TrainConfig(batch_size=BATCH, tokens=1e9, device=device))
    seqs = _sequences(lm, (steps + 1) * BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, lm.d_model, LAYERS, Path(tmp), dev)
        t0 = None
        for step, ids in enumerate(batches(iter(seqs), BATCH)):
            if step == 1:
                _sync(dev)
                t0 = time.perf_counter()
            x, _ = batch_activations(lm, ids, LAYERS, cfg.data, dev)
            tr.sae_step(x)
        _sync(dev)
        sec = time.perf_counter() - t0
    return {"tokens_per_s": steps * BATCH * CTX / sec, "lm_dtype": str(lm.model.dtype)}


def run_sparsify(device: str, steps: int) -> dict:
    from datasets import Dataset
    from sparsify import SaeConfig, Trainer
    from sparsify import TrainConfig as SpTrainConfig

    lm, dev = _lm(device)
    seqs = [s.tolist() for s in _sequences(lm, (steps + 1) * BATCH)]
    ds = Dataset.from_dict({"input_ids": seqs}).with_format("torch", columns=["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SpTrainConfig(SaeConfig(k=32, expansion_factor=8), batch_size=BATCH,
                            layers=LAYERS, log_to_wandb=False, save_dir=tmp, save_every=10**9)
        trainer = Trainer(cfg, ds, lm.model)
        _sync(dev)
        t0 = time.perf_counter()
        trainer.fit()  # steps + 1 steps, the first one included (no hook to skip it)
        _sync(dev)
        sec = time.perf_counter() - t0
    return {"tokens_per_s": (steps + 1) * BATCH * CTX / sec, "lm_dtype": str(lm.model.dtype),
            "note": "fit() incl. its first step and final save"}


VARIANTS = {"mlsae": run_mlsae, "sparsify": run_sparsify}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(VARIANTS[args.variant](args.device, args.steps)))
        return
    res = {}
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--variant", name, "--device",
                               args.device, "--steps", str(args.steps)], capture_output=True,
                              text=True)
        if proc.returncode:
            res[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:9s} {res[name]}", flush=True)
    ok = all("tokens_per_s" in r for r in res.values())
    if ok:
        ratio = res["mlsae"]["tokens_per_s"] / res["sparsify"]["tokens_per_s"]
        print(f"W1 on {args.device}: mlsae {res['mlsae']['tokens_per_s']:.0f} tokens/s, "
              f"sparsify {res['sparsify']['tokens_per_s']:.0f} tokens/s, ratio {ratio:.2f}x")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

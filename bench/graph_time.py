"""Time and memory of `mlsae graph` on a trained run: one prompt of exactly --tokens tokens
(including the leading EOS), every phase timed, peak resident memory of the process (the LM
and the SAE included). Goal for the 30-layer SmolLM2 default run, 32 tokens: under 2 minutes
and 6 GB on 2 CPU cores.

    OMP_NUM_THREADS=2 python bench/graph_time.py runs/default-150k --tokens 32 \\
        --mode jacobian --mode frozen-mlp

Prints one line per mode; the means for mean ablation are computed once (first mode) and
reported on their own line.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pydoc_data.topics import topics

import torch

from mlsae.circuits.command import GraphConfig, GraphSession


def prompt_of(session: GraphSession, n_tokens: int) -> str:
    """A prompt of exactly n_tokens - 1 tokens (+ the EOS) cut from CPython's own prose."""
    text = topics["function"]
    ids = session.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    for cut in range(n_tokens - 1, len(ids)):
        prompt = session.lm.tokenizer.decode(ids[:cut])
        got = session.lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(got) == n_tokens - 1:
            return prompt
    raise SystemExit("could not cut a prompt of that length")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--mode", action="append", default=None)
    ap.add_argument("--means-tokens", type=int, default=1024)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, cpus {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f}")
    t = time.perf_counter()
    session = GraphSession(args.run, GraphConfig(prompt="x", means_tokens=args.means_tokens))
    print(f"load run + LM: {time.perf_counter() - t:.1f} s, peak RSS {peak_gb():.2f} GB")
    prompt = prompt_of(session, args.tokens)
    t = time.perf_counter()
    _, info = session.means()
    print(f"means over {info['tokens']} held-out tokens: {time.perf_counter() - t:.1f} s")
    for mode in args.mode or ["jacobian", "frozen-mlp"]:
        session.cfg.mode = mode
        g, data = session.build(prompt)
        m = data["metadata"]["mlsae"]
        tm = m["timing"]
        print(f"{mode}: {args.tokens} tokens, {len(g.layers)} layers: total {tm['total_s']:.1f} s "
              f"(capture+edges {tm['capture_and_edges_s']:.1f}, of which edges "
              f"{tm['edges_s']:.1f}; prune {tm['prune_s']:.1f}; causal {tm['causal_s']:.1f}; "
              f"checks {tm['checks_total_s']:.1f}); full graph {m['full_graph']['nodes']} "
              f"nodes / {m['full_graph']['edges']} edges; pruned {m['pruned_graph']['nodes']} "
              f"nodes; peak RSS {peak_gb():.2f} GB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

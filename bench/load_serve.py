"""Load script for `mlsae serve` (not a test): N mixed API requests at concurrency C against a
server started in this process on 127.0.0.1 (a free port), then p50/p99 latency and the count
of non-2xx answers (every request sent is valid, so that count should be 0).

    .venv/bin/python bench/load_serve.py                  # tiny random LM, tiny run trained here
    .venv/bin/python bench/load_serve.py --run RUN [--model M] [--device cpu]

The default trains a tiny run (the test suite's random 4-layer Llama, d_model 32) in a
temporary folder and writes its analysis files, so the latent requests read SQLite too.
The mix: prompt heatmap, token, latent, logits (clean / spliced), steer, info.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from mlsae.server.app import create_app
from mlsae.server.runner import background

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1",
           "In 1492 Columbus sailed", "Hello, world!", "for i in range(10): print(i)",
           "The capital of France is"]


def tiny_run(root: Path):
    """A tiny random LM and a run trained on it, with dists.safetensors and examples.sqlite."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_lm

    from mlsae import DataConfig, SAEConfig, TrainConfig
    from mlsae.analysis.analyze import analyze
    from mlsae.analysis.examples import collect_examples
    from mlsae.options import TextOptions
    from mlsae.train import RunConfig, train

    lm = make_tiny_lm("llama", n_layers=4, d=32)
    run = root / "run"
    cfg = RunConfig(SAEConfig(expansion_factor=4, k=8), DataConfig(ctx_len=32),
                    TrainConfig(out=str(run), model="tiny", tokens=4 * 32 * 20, batch_size=4,
                                eval_tokens=512, dead_tokens=1000))
    train(cfg, lm=lm, progress=False)
    opts = TextOptions(tokens=4096, batch_size=8)
    analyze(run, opts, lm=lm, progress=False)
    collect_examples(run, opts, top=8, window=4, lm=lm, progress=False)
    return run, lm


def make_requests(info: dict, n: int, seed: int = 0) -> list[tuple[str, str, str, dict | None]]:
    """(kind, method, path, body): a random valid mix."""
    rng = random.Random(seed)
    layers, n_latents = info["layers"], info["n_latents"]
    kinds = {
        "prompt": lambda p: ("POST", "/api/prompt", {"prompt": p}),
        "token": lambda p: ("POST", "/api/token", {"prompt": p, "position": rng.randint(0, 3)}),
        "latent": lambda p: ("GET", f"/api/latents/{rng.randrange(n_latents)}", None),
        "logits": lambda p: ("POST", "/api/logits", {"prompt": p, "layer": rng.choice(
            [None, *layers])}),
        "steer": lambda p: ("POST", "/api/steer", {"prompt": p, "layer": rng.choice(layers),
                                                   "latent": rng.randrange(n_latents),
                                                   "factor": rng.uniform(-20, 20)}),
        "info": lambda p: ("GET", "/api/info", None),
    }
    names = list(kinds)
    out = []
    for _ in range(n):
        kind = rng.choice(names)
        out.append((kind, *kinds[kind](rng.choice(PROMPTS))))
    return out


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q / 100 * (len(sorted_ms) - 1)))]


def load(url: str, requests: list, concurrency: int) -> tuple[list, float]:
    """Send all requests, `concurrency` at a time -> [(kind, status, ms)], wall seconds."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as http:
        def send(req):
            kind, method, path, body = req
            t0 = time.perf_counter()
            status = http.request(method, path, json=body).status_code
            return kind, status, 1000 * (time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(send, requests))
        return results, time.perf_counter() - t0


def report(results: list, wall: float, concurrency: int) -> None:
    ms = sorted(r[2] for r in results)
    statuses = Counter(r[1] for r in results)
    bad = sum(v for k, v in statuses.items() if not 200 <= k < 300)
    print(f"requests {len(results)}  concurrency {concurrency}  wall {wall:.1f} s  "
          f"throughput {len(results) / wall:.1f} req/s")
    print(f"latency p50 {percentile(ms, 50):.1f} ms  p99 {percentile(ms, 99):.1f} ms  "
          f"max {ms[-1]:.1f} ms")
    print(f"non-2xx {bad}  (status counts: {dict(sorted(statuses.items()))})")
    by_kind = defaultdict(list)
    for kind, _, t in results:
        by_kind[kind].append(t)
    for kind, times in sorted(by_kind.items()):
        times.sort()
        print(f"  {kind:<7} n {len(times):>4}  p50 {percentile(times, 50):7.1f} ms  "
              f"p99 {percentile(times, 99):7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run folder (default: a tiny run trained here)")
    ap.add_argument("--model", help="language model of --run (default: the run's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            app = create_app(args.run, model=args.model, device=args.device)
        else:
            run, lm = tiny_run(Path(tmp))
            app = create_app(run, lm=lm)
        with background(app) as url:
            info = httpx.get(f"{url}/api/info").json()
            print(f"server {url}  run {info['run']}  model {info['model']}  "
                  f"layers {len(info['layers'])}  latents {info['n_latents']}")
            reqs = make_requests(info, args.requests)
            results, wall = load(url, reqs, args.concurrency)
    report(results, wall, args.concurrency)


if __name__ == "__main__":
    main()

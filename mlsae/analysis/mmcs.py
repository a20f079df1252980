"""`mlsae mmcs A [B]`: mean max cosine similarity of decoder rows (SPEC §5).
Uses runs (to load SAEs) only.

Within one SAE: for each row of W_dec the largest cosine with any OTHER row, averaged over
rows. Between two: for each row of A's W_dec the largest cosine with any row of B's, averaged
over A's rows (not symmetric: swap A and B for the other direction). Computed in row chunks
so memory is `chunk x n_latents`, never `n_latents^2`.

Prints the number; writes nothing unless --out FILE (JSON: a, b, mmcs, n_latents_a,
n_latents_b, d_model).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from mlsae.errors import UserError
from mlsae.lm import resolve_device
from mlsae.runs import load_sae


def _unit(w: Tensor) -> Tensor:
    w = w.float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def max_cosine_within(w_dec: Tensor, chunk: int = 256) -> Tensor:
    """For each row of w_dec [n, d], the max cosine with any OTHER row -> [n] float32."""
    w = _unit(w_dec)
    n = w.shape[0]
    if n < 2:
        return torch.full((n,), math.nan)
    out = torch.empty(n, device=w.device)
    for s in range(0, n, chunk):
        sims = w[s : s + chunk] @ w.T  # [c, n]
        r = torch.arange(sims.shape[0], device=w.device)
        sims[r, s + r] = -math.inf  # exclude self
        out[s : s + chunk] = sims.max(1).values
    return out


def max_cosine_between(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """For each row of a [n, d], the max cosine with any row of b [m, d] -> [n] float32."""
    a, b = _unit(a), _unit(b)
    return torch.cat([(a[s : s + chunk] @ b.T).max(1).values for s in range(0, a.shape[0], chunk)])


def mmcs_within(w_dec: Tensor, chunk: int = 256) -> float:
    """Mean max cosine similarity within one dictionary w_dec [n, d] (self excluded)."""
    return max_cosine_within(w_dec, chunk).mean().item()


def mmcs_between(a: Tensor, b: Tensor, chunk: int = 256) -> float:
    """Mean over rows of a [n, d] of the max cosine with rows of b [m, d] (not symmetric)."""
    return max_cosine_between(a, b, chunk).mean().item()

DEFAULT_CHUNK = 1024


def load_decoder(checkpoint: str | Path, device: str = "cpu") -> Tensor:
    """W_dec [n_latents, d_model] of a checkpoint folder or hub id."""
    return load_sae(checkpoint, device=device, lens_ok=True).W_dec.detach()


def mmcs(a: str | Path, b: str | Path | None = None, chunk: int = DEFAULT_CHUNK,
         device: str = "cpu") -> dict:
    """MMCS within `a`, or of `a`'s rows against `b`'s. Returns the --out JSON dict."""
    if chunk <= 0:
        raise UserError("--chunk must be positive")
    dev = str(resolve_device(device))
    wa = load_decoder(a, dev)
    if b is None:
        if wa.shape[0] < 2:
            raise UserError(f"{str(a)!r} has one latent: no other row to compare with")
        value, wb = mmcs_within(wa, chunk), None
    else:
        wb = load_decoder(b, dev)
        if wb.shape[1] != wa.shape[1]:
            raise UserError(f"d_model differs: {str(a)!r} has {wa.shape[1]}, {str(b)!r} "
                            f"{wb.shape[1]}")
        value = mmcs_between(wa, wb, chunk)
    return {"a": str(a), "b": None if b is None else str(b), "mmcs": value,
            "n_latents_a": wa.shape[0], "n_latents_b": None if wb is None else wb.shape[0],
            "d_model": wa.shape[1]}


def _cmd_mmcs(args: argparse.Namespace) -> int:
    res = mmcs(args.a, args.b, args.chunk, args.device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['mmcs']:.6f}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae mmcs` on the subparsers object `sub`."""
    p = sub.add_parser(
        "mmcs", help="mean max cosine similarity of decoder rows, within one SAE or A vs B",
        description="Print the MMCS of A's decoder rows: with B, each A row's best cosine "
        "with B's rows, averaged; without, each row's best cosine with another A row.")
    p.add_argument("a", metavar="A", help="checkpoint or run folder (or hub id)")
    p.add_argument("b", metavar="B", nargs="?", help="second checkpoint (optional)")
    p.add_argument("--out", help="also write the result as JSON to this file")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"rows per similarity block (default: {DEFAULT_CHUNK})")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, mps (default: cpu)")
    p.set_defaults(func=_cmd_mmcs)

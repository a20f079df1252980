"""Activation cache: resid_post of the chosen layers written once, trained on many times.

`mlsae cache` writes DIR/manifest.json and numbered shards DIR/shard_00000.safetensors,
DIR/shard_00001.safetensors, ..., each holding
`acts [layer, tokens, d_model]` (float16/bfloat16/float32; included positions only, in
stream order) and `seq_lens [sequences]` (included tokens of each packed sequence), so a
reader can regroup tokens into exactly the batches a streaming run would see. Sequences come
from the same train stream (`TokenSource.train_sequences`) as `mlsae train` with the same
seed: training from the cache without shuffling equals streaming (bit-identical with float32).
Also the `mlsae cache` command. Uses the LM adapter, data and options.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mlsae import config as C
from mlsae.activations.capture import batch_activations
from mlsae.config import DataConfig, resolve_layers
from mlsae.data import TokenSource, batches
from mlsae.errors import UserError
from mlsae.lm import load_lm, resolve_dtype
from mlsae.options import add_dataclass_options, build_config, number

MANIFEST = "manifest.json"


def write_cache(model: str, out: str | Path, tokens: int, layers: str = "all",
                data: DataConfig | None = None, store_dtype: str = "float16",
                batch_size: int = 8, seed: int = 0, shard_sequences: int = 64,
                device: str = "auto", dtype: str = "float32", progress: bool = True,
                revision: str | None = None, blocks: str | None = None) -> Path:
    """Stream `tokens` packed positions of training text through `model` (at hub `revision`,
    decoder blocks at module path `blocks`: as for `mlsae train`) into DIR."""
    data = data or DataConfig()
    out = Path(out)
    if (out / MANIFEST).exists():
        raise UserError(f"{str(out)!r} already holds an activation cache")
    store = resolve_dtype(store_dtype, "--store-dtype")
    lm = load_lm(model, device, dtype, revision, blocks)
    layer_list = resolve_layers(layers, lm.n_layers)
    source = TokenSource(data, lm.tokenizer, lm.eos_id, seed=seed)
    n_seq_total = max(1, int(tokens) // data.ctx_len)
    seqs = (s for _, s in zip(range(n_seq_total), source.train_sequences(0)))
    out.mkdir(parents=True, exist_ok=True)
    shards, acts, lens, n_done = [], [], [], 0
    bar = tqdm(total=n_seq_total * data.ctx_len, unit="tok", unit_scale=True, desc="cache",
               disable=not progress)
    try:
        for ids in batches(seqs, batch_size):
            x, mask = batch_activations(lm, ids, layer_list, data)
            try:
                check_storable(x, store, layer_list)
            except UserError:
                _remove_shards(out, shards)
                raise
            acts.append(x.to(store))
            lens.extend(mask.sum(1).tolist())
            n_done += len(ids)
            bar.update(ids.numel())
            if len(lens) >= shard_sequences:
                shards.append(_write_shard(out, len(shards), acts, lens))
                acts, lens = [], []
        if lens:
            shards.append(_write_shard(out, len(shards), acts, lens))
    finally:
        bar.close()  # ends the bar's line, so an error message starts a line of its own
    manifest = {"format_version": 1, "model": model, "revision": revision, "blocks": blocks,
                "layers": layer_list,
                "d_model": lm.d_model, "n_lm_layers": lm.n_layers, "store_dtype": store_dtype,
                "sequences": n_done, "tokens": n_done * data.ctx_len,
                "included_tokens": sum(s["tokens"] for s in shards), "seed": seed,
                "data": asdict(data), "hook_point": "resid_post",
                "exclude_first": data.exclude_first, "exclude_special": data.exclude_special,
                "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def check_storable(x: Tensor, store: torch.dtype, layers: list[int]) -> None:
    """Refuse activations `x [layer, token, d_model]` that `store` cannot hold: float16 tops
    out at 65504, and the massive activations of Gemma and Llama models exceed it (they would
    be stored as inf, and training would stop at step 0 far from the cause)."""
    if not x.isfinite().all():
        raise UserError("the model produced non-finite activations; nothing was cached")
    top = torch.finfo(store).max
    peak = x.abs().amax(dim=(1, 2))  # [layer]
    if (peak > top).any():
        i = int(peak.argmax())
        raise UserError(f"--store-dtype {str(store).removeprefix('torch.')} cannot hold "
                        f"activation {peak[i].item():.4g} at layer {layers[i]} (largest "
                        f"{top:.6g}): use --store-dtype bfloat16 or float32; nothing was cached")


def _remove_shards(out: Path, shards: list[dict]) -> None:
    for shard in shards:
        (out / shard["file"]).unlink(missing_ok=True)


def _write_shard(out: Path, i: int, acts: list[Tensor], lens: list[int]) -> dict:
    name = f"shard_{i:05d}.safetensors"
    x = torch.cat(acts, dim=1).contiguous()  # [layer, tokens, d_model]
    save_file({"acts": x, "seq_lens": torch.tensor(lens, dtype=torch.long)}, str(out / name))
    return {"file": name, "sequences": len(lens), "tokens": int(x.shape[1])}


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise UserError(f"--activations {str(path)!r}: not an activation cache (no {MANIFEST})")
    return json.loads(p.read_text())


class CachedActivations:
    """Batches of `[layer, token, d_model]` float32 from a cache, by packed sequence."""

    def __init__(self, path: str | Path, shuffle: bool, seed: int = 0):
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.shuffle, self.seed = shuffle, seed
        # Each sequence: (shard index, first token, included tokens)
        self.index: list[tuple[int, int, int]] = []
        self.files = []
        for s, shard in enumerate(self.manifest["shards"]):
            f = safe_open(str(self.path / shard["file"]), "pt")
            self.files.append(f)
            start = 0
            for n in f.get_tensor("seq_lens").tolist():
                self.index.append((s, start, n))
                start += n

    def batches(self, batch_size: int, start: int = 0, rank: int = 0,
                world: int = 1) -> Iterator[tuple[Tensor, int]]:
        """Endless (x of this rank's sequences, sequences in the global batch) from global
        sequence position `start`; with shuffling, a fresh permutation of all sequences
        (across shards) every epoch."""
        n = len(self.index)
        epoch, pos = divmod(start, n)
        buf: list[int] = []
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            for i in order[pos:]:
                buf.append(i)
                if len(buf) == batch_size:
                    yield self._gather(buf[rank::world]), len(buf)
                    buf = []
            epoch, pos = epoch + 1, 0

    def _gather(self, seq_ids: list[int]) -> Tensor:
        parts = []
        for i in seq_ids:
            s, first, n = self.index[i]
            if n:
                parts.append(self.files[s].get_slice("acts")[:, first:first + n])
        return torch.cat(parts, dim=1).float()  # [layer, tokens, d_model]


# ---- CLI ---------------------------------------------------------------------------------
def _cmd_cache(args: argparse.Namespace) -> int:
    out = write_cache(args.model, args.out, args.tokens, layers=args.layers,
                      data=build_config(C.DataConfig, vars(args)),
                      store_dtype=args.store_dtype, batch_size=args.batch_size, seed=args.seed,
                      shard_sequences=args.shard_sequences, device=args.device,
                      dtype=args.dtype, revision=getattr(args, "revision", None),
                      blocks=getattr(args, "blocks", None))
    print(f"activation cache: {out}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae cache` on the subparsers object `sub`."""
    p = sub.add_parser("cache", help="write resid_post activations to disk for training",
                       description="Stream training text through the LM once and store the "
                       "resid_post of the chosen layers (included positions only) in shards; "
                       "train on it with `mlsae train --activations DIR`.")
    p.add_argument("--out", required=True, help="cache folder (must not hold a cache)")
    p.add_argument("--model", default=C.TrainConfig.model, help="language model (default: "
                   f"{C.TrainConfig.model})")
    p.add_argument("--layers", default="all", help="layers, as for train (default: all)")
    p.add_argument("--tokens", type=number(int), default=100_000,
                   help="packed tokens to cache (default: 100000)")
    p.add_argument("--store-dtype", default="float16",
                   help="float16, bfloat16 or float32 (default: float16)")
    p.add_argument("--batch-size", type=int, default=C.TrainConfig.batch_size,
                   help="sequences per LM forward; use the training --batch-size to "
                   f"reproduce a streaming run exactly (default: {C.TrainConfig.batch_size})")
    p.add_argument("--seed", type=int, default=0, help="data-order seed, as for train "
                   "(default: 0)")
    p.add_argument("--shard-sequences", type=int, default=64,
                   help="sequences per shard file (default: 64)")
    p.add_argument("--device", default="auto", help="torch device (default: auto)")
    p.add_argument("--dtype", default="float32", help="LM dtype (default: float32)")
    add_dataclass_options(p, C.TrainConfig, only=("revision", "blocks"))
    add_dataclass_options(p, C.DataConfig)
    p.set_defaults(func=_cmd_cache)

"""`mlsae resid-sim`: residual-stream similarity of adjacent layers, per model (SPEC §5).
Uses data, the LM adapter and plots.

For each model, over the same text (default `pydoc`, read from its start, every position
excluded as in training: position 0 and special tokens), with `xbar_l` the mean resid_post of
block l over the included tokens:

    cos_l = mean_t cos(x_l(t) - xbar_l, x_{l+1}(t) - xbar_{l+1}),  l = 0..L-2,

exactly, in two passes over the same tokens (means first). A model's number is the mean of
cos_l over its L - 1 pairs. The relative depth of pair (l, l+1) is its midpoint
(l + 0.5) / (L - 1), so models of different depths share one x axis from 0 to 1.

Writes to `--out` (default `resid_sim/`; use `<run>/analysis` to have `mlsae report` show it):
  resid_sim.csv         model,layer,next_layer,relative_depth,cosine (one row per pair)
  resid_sim.json        {"dataset", "ctx_len", "models": {name: {"mean", "n_layers",
                        "tokens", "included_tokens"}}}
  resid_sim.{png,pdf}   cos_l against relative depth, one line per model
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.analysis.codes import stats_device
from mlsae.config import DataConfig
from mlsae.data import TokenSource, batches, include_mask
from mlsae.errors import UserError
from mlsae.evaluate import check_text_options
from mlsae.lm import LanguageModel, load_lm, peek_shape
from mlsae.options import TextOptions, add_text_options, text_options


class ResidSimilarity:
    """Mean over tokens of cos(x_l(t) - xbar_l, x_{l+1}(t) - xbar_{l+1}) per adjacent pair.

    Exact two-pass API (the cosine is not linear, so centring needs the final means first)::

        sim = ResidSimilarity(n_layers, d_model)
        for x in batches: sim.update_mean(x)     # pass 1, x [layer, *tok, d_model]
        sim.finalize_means()
        for x in batches: sim.update(x)          # pass 2, the SAME tokens again
        cos, mean_cos = sim.compute()            # [L - 1] float64, float

    A centred vector of norm 0 gives cosine 0 (denominator clamped to ``eps``).
    """

    def __init__(self, n_layers: int, d_model: int, eps: float = 1e-12):
        self.n_layers, self.d_model, self.eps = n_layers, d_model, eps
        self.sum = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.n_mean = 0
        self.mean: Tensor | None = None  # [layer, d_model] float64 after finalize_means()
        self.cos_sum = torch.zeros(max(n_layers - 1, 0), dtype=torch.float64)
        self.n_cos = 0

    def _tokens(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if x.shape[0] != self.n_layers or x.shape[-1] != self.d_model:
            raise ValueError(f"expected [{self.n_layers}, *tok, {self.d_model}], got {x.shape}")
        x = x.reshape(self.n_layers, -1, self.d_model)
        if mask is not None:
            x = x[:, mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
        return x.double()

    def update_mean(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Pass 1: x [layer, *tok, d_model], mask [*tok] (optional)."""
        if self.mean is not None:
            raise RuntimeError("update_mean() after finalize_means()")
        x = self._tokens(x, mask)
        self.sum += x.sum(1).cpu()
        self.n_mean += x.shape[1]

    def finalize_means(self) -> Tensor:
        """End pass 1; returns xbar [layer, d_model]."""
        if self.n_mean == 0:
            raise RuntimeError("no tokens seen in pass 1")
        self.mean = self.sum / self.n_mean
        return self.mean

    def update(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Pass 2: x [layer, *tok, d_model], mask [*tok] (optional)."""
        if self.mean is None:
            raise RuntimeError("call finalize_means() before update()")
        x = self._tokens(x, mask)
        u = x - self.mean.to(x.device)[:, None]  # [layer, token, d]
        norm = u.norm(dim=-1)  # [layer, token]
        dot = (u[:-1] * u[1:]).sum(-1)  # [layer - 1, token]
        self.cos_sum += (dot / (norm[:-1] * norm[1:]).clamp_min(self.eps)).sum(1).cpu()
        self.n_cos += x.shape[1]

    def compute(self, strict: bool = True) -> tuple[Tensor, float]:
        """(cos per adjacent pair [L - 1], mean over pairs). ``strict`` checks that pass 2 saw as
        many tokens as pass 1 (the caller must re-stream the same tokens)."""
        if self.n_cos == 0:
            raise RuntimeError("no tokens seen in pass 2")
        if strict and self.n_cos != self.n_mean:
            raise RuntimeError(f"pass 2 saw {self.n_cos} tokens, pass 1 saw {self.n_mean}")
        cos = self.cos_sum / self.n_cos
        return cos, (cos.mean().item() if cos.numel() else math.nan)

DEFAULT_OUT = "resid_sim"


def text_config(opts: TextOptions) -> DataConfig:
    """The text every model reads: --dataset (default pydoc) as a whole, the usual exclusions."""
    over = {k: getattr(opts, k) for k in ("split", "text_column", "ctx_len")
            if getattr(opts, k) is not None}
    cfg = replace(DataConfig(), eval_dataset=opts.dataset or "pydoc", **over)
    if cfg.ctx_len <= cfg.exclude_first:
        raise UserError(f"--ctx-len must exceed the excluded leading positions "
                        f"({cfg.exclude_first})")
    return cfg


@torch.inference_mode()
def model_resid_sim(lm: LanguageModel, opts: TextOptions, progress: bool = True) -> dict:
    """{"cos": [L - 1] per adjacent pair, "mean", "n_layers", "tokens", "included_tokens"}."""
    if lm.n_layers < 2:
        raise UserError(f"model {lm.name!r} has {lm.n_layers} block: no adjacent pair")
    cfg = text_config(opts)
    seqs = TokenSource(cfg, lm.tokenizer, lm.eos_id).eval_sequences(opts.tokens)
    if len(seqs) == 0:
        raise UserError(f"--dataset {cfg.eval_dataset!r} gives no sequence of {cfg.ctx_len} "
                        f"tokens for {lm.name!r}")
    batch_list = list(batches(iter(seqs), opts.batch_size))
    layers = list(range(lm.n_layers))
    sim = ResidSimilarity(lm.n_layers, lm.d_model)
    with tqdm(total=2 * seqs.numel(), desc=f"resid-sim {lm.name}", unit="tok", unit_scale=True,
              disable=not progress, dynamic_ncols=True) as bar:

        def one_pass(update) -> None:
            for ids in batch_list:
                mask = include_mask(ids, lm.special_ids, cfg)  # [batch, seq]
                resid = lm.resid_post(ids, layers)  # [layer, batch, seq, d_model]
                update(resid.to(stats_device(resid.device)), mask)
                bar.update(ids.numel())

        one_pass(sim.update_mean)
        if sim.n_mean == 0:
            raise UserError("every position of the text is excluded (special tokens / "
                            "exclude_first)")
        sim.finalize_means()  # the cosine needs the final means: a second pass
        one_pass(sim.update)
    cos, mean = sim.compute()
    return {"cos": cos.tolist(), "mean": mean, "n_layers": lm.n_layers,
            "tokens": int(seqs.numel()), "included_tokens": sim.n_mean}


def relative_depth(n_layers: int) -> np.ndarray:
    """Midpoint (l + 0.5) / (L - 1) of each adjacent pair (l, l + 1) -> [L - 1]."""
    return (np.arange(n_layers - 1) + 0.5) / (n_layers - 1)


def _label(name: str) -> str:
    return Path(name).name if Path(name).expanduser().exists() else name


def resid_sim(models: Sequence[str | LanguageModel], opts: TextOptions,
              out_dir: str | Path = DEFAULT_OUT, progress: bool = True) -> dict:
    """Residual similarity of each model (a name for `load_lm`, or a loaded model) over the
    same text; writes the files of the module docstring and returns resid_sim.json's dict."""
    from mlsae.plots import analysis as plots  # matplotlib loads only to draw

    check_text_options(opts)
    if not models:
        raise UserError("name at least one model")
    if opts.model is not None:
        raise UserError("resid-sim takes its models as arguments, not --model")
    cfg = text_config(opts)
    for m in models:  # fail on a missing model before spending time on the others
        if not isinstance(m, LanguageModel):
            peek_shape(m)
    results = {}
    for m in models:
        lm = m if isinstance(m, LanguageModel) else load_lm(m, opts.device, opts.dtype)
        results[lm.name] = model_resid_sim(lm, opts, progress)
        del lm  # one model in memory at a time
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "resid_sim.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "layer", "next_layer", "relative_depth", "cosine"])
        for name, r in results.items():
            for layer, (x, c) in enumerate(zip(relative_depth(r["n_layers"]), r["cos"])):
                w.writerow([name, layer, layer + 1, f"{x:.6g}", f"{c:.6g}"])
    plots.resid_sim_figure({_label(name): (relative_depth(r["n_layers"]), np.array(r["cos"]))
                            for name, r in results.items()}, out / "resid_sim")
    summary = {"dataset": cfg.eval_dataset, "ctx_len": cfg.ctx_len, "models": {
        name: {k: r[k] for k in ("mean", "n_layers", "tokens", "included_tokens")}
        for name, r in results.items()}}
    (out / "resid_sim.json").write_text(json.dumps(summary, indent=2) + "\n")
    return dict(summary, out=str(out))


def _cmd_resid_sim(args: argparse.Namespace) -> int:
    res = resid_sim(args.models, text_options(args), args.out)
    for name, r in res["models"].items():
        print(f"{name}: mean adjacent-layer cosine {r['mean']:.4f} over {r['n_layers'] - 1} "
              f"pairs ({r['included_tokens']} tokens)")
    print(f"wrote {res['out']}/resid_sim.{{csv,json,png,pdf}}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae resid-sim` on the subparsers object `sub`."""
    p = sub.add_parser(
        "resid-sim", help="cosine similarity of adjacent layers' residual streams per model",
        description="For each model, the mean over tokens of the cosine between adjacent "
        "layers' centred resid_post (every block, exact two-pass means), over the same text.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="smollm2-135m, gemma3-270m, a hub id, a model folder or a .gguf file")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder; <run>/analysis puts the "
                   f"plot in that run's report (default: {DEFAULT_OUT})")
    add_text_options(p)
    p.set_defaults(func=_cmd_resid_sim)

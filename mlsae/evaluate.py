"""`mlsae eval`: per-layer reconstruction and spliced downstream loss of a checkpoint (SPEC §4).
Uses runs, data, the LM adapter, the SAE and metrics.

Positions. Reconstruction metrics (FVU, MSE, L0, alive) use the included positions (SPEC §2).
The downstream loss is next-token cross-entropy at the "CE positions": positions t that are
included AND have a next token in the same sequence (t < ctx_len - 1); the target is the token
at t+1, whatever it is (EOS included). CE_clean, CE_recon, CE_zero and KL all use exactly these
positions, so the three losses are comparable number for number.

Splice. For layer l, resid_post x_l is replaced at the included positions only (excluded
positions keep their clean x_l), and the model continues from block l+1 to the logits.
- recon: x_l -> x^_l, the SAE's reconstruction;
- ablation `zero` (default): x_l -> 0;
- ablation `mean`: x_l -> xbar_l, the mean of x_l over the included evaluation tokens (one extra
  forward pass over the text computes it first).
`ce_zero` in the results is the CE under whichever ablation `ablation` names.
dCE_l = CE_recon - CE_clean; CE recovered = (CE_zero - CE_recon) / (CE_zero - CE_clean) (null
when the denominator is 0); KL_l = mean over CE positions of KL(p_clean || p_recon).

Cost per batch: one forward up to the last SAE layer captures every layer; the clean logits
come from continuing after the last SAE layer with its own resid_post (bit-identical to a
full forward, see `LanguageModel.logits_from`); then two continuations per layer (recon and
ablation). Sums stream in float64: memory is bounded by the batch, not by --tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae import config as C
from mlsae.activations.capture import exclude_outliers, outlier_tally
from mlsae.config import DataConfig
from mlsae.data import include_mask
from mlsae.errors import UserError
from mlsae.lm import LanguageModel
from mlsae.metrics import ReconstructionStats
from mlsae.options import TextOptions, add_text_options, text_options
from mlsae.runs import check_lm_matches, eval_batches, load_run_lm, load_sae, sae_layers
from mlsae.sae import MLSAE

ABLATIONS = ("zero", "mean")


# ---- small pieces (public: tests check them directly) ----------------------------------------
def select_layers(spec: str | Sequence[int] | None, available: list[int]) -> list[int]:
    """`spec` (None / `all`, a list of ints, or a --layers string) as a subset of `available`."""
    if spec is None or spec == "all":
        return list(available)
    # Any block index parses here; membership in the checkpoint is what is checked below.
    wanted = C.resolve_layers(spec, 2**31) if isinstance(spec, str) else sorted(set(spec))
    bad = [v for v in wanted if v not in available]
    if bad:
        raise UserError(f"--layers: layer {bad[0]} is not in the checkpoint (its layers: "
                        f"{format_layers(available)})")
    return wanted


def check_text_options(opts: TextOptions) -> None:
    if opts.tokens <= 0 or opts.batch_size <= 0:
        raise UserError("--tokens and --batch-size must be positive")


def format_layers(layers: Sequence[int]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(v) for v in layers)


def kl_div(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities `[n, vocab]` -> `[n]` (nats)."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def next_token_logprobs(logits: Tensor, pos: Tensor) -> Tensor:
    """Log-softmax of `logits [batch, seq, vocab]` at CE positions `pos [batch, seq-1]` ->
    `[n_pos, vocab]` float32."""
    return logits[:, :-1][pos].float().log_softmax(dim=-1)


def cross_entropy(logp: Tensor, targets: Tensor) -> Tensor:
    """`-log p(target)` per row: `logp [n, vocab]`, `targets [n]` -> `[n]`."""
    return -logp.gather(1, targets[:, None]).squeeze(1)


@torch.inference_mode()
def reconstruct(sae: MLSAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SAE forward on `x [layer, token, d_model]`, one layer at a time (bounds the dense
    pre-activations to one layer) -> x_hat `[layer, token, d_model]`, acts, idx `[layer, token, k]`.
    """
    outs = [sae(x[i]) for i in range(x.shape[0])]
    return (torch.stack([o.x_hat for o in outs]), torch.stack([o.code.acts for o in outs]),
            torch.stack([o.code.idx for o in outs]))


class SpliceStats:
    """Streaming float64 sums over CE positions: clean CE once, and per layer the CE with x_l
    reconstructed, the CE with x_l ablated, and KL(p_clean || p_recon)."""

    def __init__(self, n_layers: int):
        f64 = torch.float64
        self.n = 0
        self.ce_clean = torch.zeros((), dtype=f64)
        self.ce_recon = torch.zeros(n_layers, dtype=f64)
        self.ce_zero = torch.zeros(n_layers, dtype=f64)
        self.kl = torch.zeros(n_layers, dtype=f64)

    def result(self) -> dict[str, list]:
        if self.n == 0:
            raise UserError("no CE position in the evaluation text (every position excluded)")
        clean = (self.ce_clean / self.n).item()
        recon = (self.ce_recon / self.n).tolist()
        zero = (self.ce_zero / self.n).tolist()
        recovered = [(z - r) / (z - clean) if z != clean else None for r, z in zip(recon, zero)]
        return {"ce_clean": [clean] * len(recon), "ce_recon": recon, "ce_zero": zero,
                "dce": [r - clean for r in recon], "ce_recovered": recovered,
                "kl": (self.kl / self.n).tolist()}


# ---- the evaluation loop ---------------------------------------------------------------------
@torch.inference_mode()
def layer_means(lm: LanguageModel, layers: list[int], batches: Iterable[Tensor],
                data_cfg: DataConfig) -> Tensor:
    """Mean resid_post over the included tokens, `[layer, d_model]` (for the mean ablation)."""
    total, n = torch.zeros(len(layers), lm.d_model, dtype=torch.float64), 0
    for ids in batches:
        mask = include_mask(ids, lm.special_ids, data_cfg)
        resid = lm.resid_post(ids, layers)  # [layer, batch, seq, d_model]
        mask = exclude_outliers(resid, mask, data_cfg)
        total += resid[:, mask.to(resid.device)].double().sum(dim=1).cpu()
        n += int(mask.sum())
    return (total / max(n, 1)).float()


def _splice(resid: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """Copy of `resid [batch, seq, d]` with the included positions set to `values`
    (`[token, d]`, or `[d]` broadcast to every included position)."""
    out = resid.clone()
    out[mask] = values.to(out.dtype)
    return out


@torch.inference_mode()
def evaluate_batches(sae: MLSAE, lm: LanguageModel, layers: list[int],
                     batches: Sequence[Tensor], data_cfg: DataConfig, ablation: Tensor,
                     progress: bool = True) -> tuple[ReconstructionStats, SpliceStats]:
    """Stream `[batch, seq]` token batches; `ablation [layer, d_model]` is what x_l becomes."""
    rec = ReconstructionStats(len(layers), sae.d_model, sae.n_latents)
    ce = SpliceStats(len(layers))
    for ids in tqdm(batches, desc="eval", disable=not progress, dynamic_ncols=True):
        mask = include_mask(ids, lm.special_ids, data_cfg).to(lm.device)  # [batch, seq]
        if not mask.any():
            continue
        resid = lm.resid_post(ids, layers)  # [layer, batch, seq, d_model]
        mask = exclude_outliers(resid, mask, data_cfg)  # --exclude-outliers, as in training
        x = resid[:, mask].float()  # [layer, token, d_model]
        x_hat, acts, idx = reconstruct(sae, x)
        rec.update(x, x_hat, acts, idx)

        pos = mask[:, :-1]  # [batch, seq-1]: included and has a next token
        targets = ids.to(lm.device)[:, 1:][pos]  # [n_pos]
        clean = next_token_logprobs(lm.logits_from(ids, layers[-1], resid[-1]), pos)
        ce.n += int(pos.sum())
        ce.ce_clean += cross_entropy(clean, targets).double().sum().cpu()
        for i, layer in enumerate(layers):
            recon = next_token_logprobs(
                lm.logits_from(ids, layer, _splice(resid[i], mask, x_hat[i])), pos)
            ce.ce_recon[i] += cross_entropy(recon, targets).double().sum().cpu()
            ce.kl[i] += kl_div(clean, recon).double().sum().cpu()
            del recon  # [n_pos, vocab] is the largest tensor here: free it before the next
            ablated = next_token_logprobs(
                lm.logits_from(ids, layer, _splice(resid[i], mask, ablation[i])), pos)
            ce.ce_zero[i] += cross_entropy(ablated, targets).double().sum().cpu()
    return rec, ce


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def default_out(checkpoint: str | Path) -> Path:
    """`<checkpoint>/eval.json` for a local folder; `<owner>_<name>.eval.json` here for a
    hub id (never inside the download cache)."""
    path = Path(checkpoint).expanduser()
    return path / "eval.json" if path.is_dir() else Path(f"{str(checkpoint).replace('/', '_')}"
                                                         ".eval.json")


def shortfall_note(opts: TextOptions, ctx_len: int, tokens: int) -> str | None:
    """A note when the text ran out before --tokens (eval_sequences takes whole sequences,
    so only fewer sequences than tokens // ctx_len is a shortfall)."""
    if tokens // ctx_len < max(1, opts.tokens // ctx_len):
        return (f"asked for {opts.tokens} tokens; the evaluation text gives only {tokens} "
                f"({tokens // ctx_len} sequences of {ctx_len}): used all of it")
    return None


def evaluate(checkpoint: str | Path, opts: TextOptions, out: str | Path | None = None,
             ablation: str = "zero", lm: LanguageModel | None = None, progress: bool = True,
             layers: str | Sequence[int] | None = None) -> dict:
    """Evaluate a checkpoint on held-out (or --dataset) text; writes and returns the results.

    `layers`: a subset of the checkpoint's layers (default: all). `lm`: an already loaded
    model (checked against the checkpoint). See the module docstring for the definitions.
    """
    if ablation not in ABLATIONS:
        raise UserError(f"--ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
    check_text_options(opts)
    t0 = time.perf_counter()
    sae = load_sae(checkpoint)
    chosen = select_layers(layers, sae_layers(sae))
    if lm is None:
        lm = load_run_lm(sae, opts)
    else:
        check_lm_matches(sae, lm)
    sae.to(lm.device)
    data_cfg, batch_list, tokens = eval_batches(sae, lm, opts)
    if ablation == "mean":
        values = layer_means(lm, chosen, batch_list, data_cfg).to(lm.device)
    else:
        values = torch.zeros(len(chosen), lm.d_model, device=lm.device)
    with outlier_tally() as tally:
        rec, ce = evaluate_batches(sae, lm, chosen, batch_list, data_cfg, values, progress)
    if rec.n == 0:
        raise UserError("every position of the evaluation text is excluded (special tokens "
                        "/ exclude_first)")
    r, splice = rec.result(), ce.result()
    per_layer = dict(r["per_layer"], **splice)
    result = {
        "checkpoint": str(checkpoint), "model": lm.name, "tokens": tokens, "layers": chosen,
        "ablation": ablation, "included_tokens": rec.n, "ce_positions": ce.n,
        "per_layer": per_layer,
        "mean": {key: _mean(v) for key, v in per_layer.items()},
        "dead_fraction": r["dead_fraction"],
        "dataset": data_cfg.eval_dataset or f"{data_cfg.dataset} (held-out split)",
        "options": {k: v for k, v in asdict(opts).items() if k != "device"},
    }
    note = shortfall_note(opts, data_cfg.ctx_len, tokens)
    if note:
        result["note"] = note
        print(f"note: {note}", file=sys.stderr)
    result["outliers"] = tally.result(chosen)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    path = Path(out) if out is not None else default_out(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["out"] = str(path)
    return result


# ---- CLI ---------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def outlier_line(o: dict) -> str:
    """One line: the per-layer outlier counts (and what --exclude-outliers removed)."""
    counts = " ".join(f"{layer}:{c}" for layer, c in zip(o["layers"], o["per_layer"]) if c)
    line = (f"outliers (norm > {o['factor_reported']:g}x layer median) among "
            f"{o['included_tokens']} included tokens: {counts or 'none'}")
    if o.get("exclude_outliers"):
        line += (f"; --exclude-outliers {o['exclude_outliers']:g} removed "
                 f"{o['excluded_tokens']} tokens")
    return line


def format_eval_table(res: dict) -> str:
    pl, m = res["per_layer"], res["mean"]
    head = (f"{'layer':>5} {'FVU':>7} {'MSE':>9} {'L0':>6} {'alive':>6} {'CE_clean':>8} "
            f"{'CE_recon':>8} {'CE_' + res['ablation']:>8} {'dCE':>7} {'recov':>6} {'KL':>7}")
    lines = [f"{res['checkpoint']} on {res['model']}: {res['tokens']} tokens "
             f"({res['included_tokens']} included, {res['ce_positions']} CE positions), "
             f"ablation {res['ablation']}, dead fraction {res['dead_fraction']:.3f}", head]
    rows = [(str(layer), {k: v[i] for k, v in pl.items()}) for i, layer in enumerate(res["layers"])]
    for name, v in rows + [("mean", dict(m, alive=None))]:
        lines.append(f"{name:>5} {v['fvu']:>7.4f} {v['mse']:>9.3g} {v['l0']:>6.2f} "
                     f"{_fmt(v['alive'], 'd'):>6} {v['ce_clean']:>8.4f} {v['ce_recon']:>8.4f} "
                     f"{v['ce_zero']:>8.4f} {v['dce']:>7.4f} {_fmt(v['ce_recovered'], '.3f'):>6} "
                     f"{v['kl']:>7.4f}")
    if "outliers" in res:
        lines.append(outlier_line(res["outliers"]))
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    res = evaluate(args.checkpoint, text_options(args), out=args.out, ablation=args.ablation,
                   layers=args.layers)
    print(format_eval_table(res))
    print(f"wrote {res['out']} ({res['seconds']:.1f} s)")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae eval` on the subparsers object `sub`."""
    p = sub.add_parser(
        "eval", help="per-layer FVU, L0 and spliced downstream loss of a checkpoint",
        description="Per layer and averaged: FVU, MSE, L0, alive latents, and the next-token "
        "CE with resid_post replaced by the reconstruction (and by an ablation), dCE, CE "
        "recovered and KL. Default text: the run's held-out split.")
    p.add_argument("checkpoint", help="checkpoint or run folder (config.json + "
                   "model.safetensors)")
    p.add_argument("--out", help="JSON file to write (default: <checkpoint>/eval.json)")
    p.add_argument("--ablation", choices=ABLATIONS, default="zero",
                   help="what x_l becomes for CE_zero: zeros, or its mean over the evaluation "
                   "tokens (default: zero)")
    p.add_argument("--layers", help="evaluate only these of the checkpoint's layers "
                   "(all, 0,3,7, 0-29:2; default: all)")
    add_text_options(p)
    p.set_defaults(func=_cmd_eval)

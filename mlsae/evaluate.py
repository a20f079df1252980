"""`mlsae eval`: per-layer reconstruction and spliced downstream loss of a checkpoint (SPEC §4).
Uses runs, data, the LM adapter, the SAE, the tuned lens and metrics.

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

Lens runs (`mlsae train --lens`, SPEC §7). The SAE encodes translated vectors, so every
reconstruction here (FVU / MSE / L0, the recon splice, the multi-layer replacement) is
x_l -> h' = lens.translate(x_l) -> SAE -> lens.inverse (the exact solve) -> x^_l, and is
scored and spliced in the ORIGINAL space; the ablations are of x_l itself, as without a lens.
eval.json then names the lens (`lens`).

Multi-layer replacement (`--replace`, SPEC §4). The chosen layers S (depth order) are all
replaced at once, free-running: the forward runs to S[0], x_S[0] is replaced by the SAE's
reconstruction at the included positions, the model continues to S[1] from that, where the SAE
encodes what arrives (excluded positions keep what the spliced model computed), and so on; the
model then continues to the logits. CE and KL(p_clean || p_replaced) are taken at the CE
positions. The curve repeats this for the first n layers of S, n = 1..|S|; when |S| is above
--curve-points (default 10), for --curve-points evenly spaced n from 1 to |S| (always 1 and
|S|). One pass computes every point: the spliced stream after n layers is the start of the
stream after n+1, so the blocks run once up to S[-1], plus one continuation per point.

Cost per batch: one forward up to the last needed layer captures every layer; the clean final
hidden states come from continuing after it with its own resid_post (bit-identical to a full
forward, see `LanguageModel.logits_from`); then two continuations per layer (recon and
ablation, run as one batch of twice the sequences: 10-35% faster on CPU than two), each
stopping at the last block's resid_post. The final norm and unembedding run
afterwards on CHUNK_BYTES worth of positions at a time, and each chunk's clean log-probs serve
every layer: no `[positions, vocab]` tensor exists, so memory is bounded by the batch and the
chunk, not by vocabulary x positions. Sums stream in float64: memory is bounded by the batch,
not by --tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
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
from mlsae.lens import TunedLens, sae_lens
from mlsae.lm import LanguageModel
from mlsae.metrics import ReconstructionStats, f64
from mlsae.options import TextOptions, add_text_options, text_options
from mlsae.runs import check_lm_matches, eval_batches, load_run_lm, load_sae, sae_layers
from mlsae.runtime import freed_memory_kept
from mlsae.sae import MLSAE

ABLATIONS = ("zero", "mean")
CHUNK_BYTES = 64 * 2**20  # one float32 [positions, vocab] chunk of log-probabilities
CHUNK_MIN_ROWS = 64  # ... but at least this many positions
HIDDEN_BYTES = 512 * 2**20  # final hidden states kept per batch before their CE/KL is taken
CURVE_POINTS = 10


# ---- small pieces (public: tests check them directly) ----------------------------------------
def select_layers(spec: str | Sequence[int] | None, available: list[int],
                  flag: str = "--layers") -> list[int]:
    """`spec` (None / `all`, a list of ints, or a --layers string) as a subset of `available`."""
    if spec is None or spec == "all":
        return list(available)
    # Any block index parses here; membership in the checkpoint is what is checked below.
    wanted = C.resolve_layers(spec, 2**31) if isinstance(spec, str) else sorted(set(spec))
    bad = [v for v in wanted if v not in available]
    if bad:
        raise UserError(f"{flag}: layer {bad[0]} is not in the checkpoint (its layers: "
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
def reconstruct(sae: MLSAE, x: Tensor, lens: TunedLens | None = None,
                layers: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SAE forward on `x [layer, token, d_model]`, one layer at a time (bounds the dense
    pre-activations to one layer) -> x_hat `[layer, token, d_model]`, acts, idx `[layer, token, k]`.
    With a `lens` (a lens run; `layers`: the LM blocks of x's slices) the SAE encodes the
    translated x and x_hat is mapped back with the exact inverse: x_hat is in x's space."""
    outs, xs = [], []
    for i in range(x.shape[0]):
        xi = x[i] if lens is None else lens.translate(x[i][None], [layers[i]])[0]
        out = sae(xi)
        x_hat = out.x_hat if lens is None else lens.inverse(out.x_hat[None], [layers[i]])[0]
        outs.append(out)
        xs.append(x_hat)
    return (torch.stack(xs), torch.stack([o.code.acts for o in outs]),
            torch.stack([o.code.idx for o in outs]))


class SpliceStats:
    """Streaming float64 sums over CE positions: clean CE once, and per layer the CE with x_l
    reconstructed, the CE with x_l ablated, and KL(p_clean || p_recon)."""

    def __init__(self, n_layers: int):
        dt = torch.float64  # host tensors
        self.n = 0
        self.ce_clean = torch.zeros((), dtype=dt)
        self.ce_recon = torch.zeros(n_layers, dtype=dt)
        self.ce_zero = torch.zeros(n_layers, dtype=dt)
        self.kl = torch.zeros(n_layers, dtype=dt)

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
        total += f64(resid[:, mask.to(resid.device)].cpu()).sum(dim=1)
        n += int(mask.sum())
    return (total / max(n, 1)).float()


def _splice(resid: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """Copy of `resid [batch, seq, d]` with the included positions set to `values`
    (`[token, d]`, or `[d]` broadcast to every included position)."""
    out = resid.clone()
    out[mask] = values.to(out.dtype)
    return out


def curve_counts(n_layers: int, points: int = CURVE_POINTS) -> list[int]:
    """The n of the replacement curve: 1..n_layers, or `points` evenly spaced ones (1 and
    n_layers included) when there are more layers than that; points <= 0: every n."""
    if points <= 0 or n_layers <= points:
        return list(range(1, n_layers + 1))
    if points == 1:
        return [n_layers]
    return sorted({round(1 + i * (n_layers - 1) / (points - 1)) for i in range(points)})


class ReplacementStats:
    """Streaming float64 sums over CE positions for the multi-layer replacement curve."""

    def __init__(self, layers: list[int], counts: list[int]):
        self.layers, self.counts = layers, counts
        self.n = 0
        self.ce_clean = torch.zeros((), dtype=torch.float64)
        self.ce = torch.zeros(len(counts), dtype=torch.float64)
        self.kl = torch.zeros(len(counts), dtype=torch.float64)

    def result(self) -> dict:
        if self.n == 0:
            raise UserError("no CE position in the evaluation text (every position excluded)")
        clean = (self.ce_clean / self.n).item()
        ce, kl = (self.ce / self.n).tolist(), (self.kl / self.n).tolist()
        return {"layers": self.layers, "ce_clean": clean, "ce_replaced": ce[-1],
                "dce": ce[-1] - clean, "kl": kl[-1],
                "curve": [{"n_layers": n, "layers": self.layers[:n], "ce": c, "kl": k}
                          for n, c, k in zip(self.counts, ce, kl)]}


class _Head:
    """The final norm and unembedding, run on a few positions at a time (`lm.unembed`).

    Checked once on 8 tokens: unembedding the last block's resid_post must give the model's
    own logits. A model where it does not (an unknown final norm) gets its full logits from
    `hidden_from` and an identity `logits`: correct, but memory as before the split."""

    def __init__(self, lm: LanguageModel, ids: Tensor):
        self.lm = lm
        probe = ids[:1, :8]
        want = lm.logits(probe).float()
        try:
            got = lm.unembed(lm.final_hidden_from(probe)).float()
            fp32 = next(lm.model.parameters()).dtype == torch.float32
            tol = (1e-4 if fp32 else 3e-2) * (1 + want.abs().max().item())
            self.split = got.shape == want.shape and (got - want).abs().max().item() <= tol
        except Exception:  # noqa: BLE001 - any failure means: do not split the head
            self.split = False
        self.vocab = want.shape[-1]
        self.rows = max(CHUNK_MIN_ROWS, CHUNK_BYTES // (4 * self.vocab))

    def hidden_from(self, ids: Tensor, layer: int, resid: Tensor) -> Tensor:
        if self.split:
            return self.lm.final_hidden_from(ids, layer, resid)
        return self.lm.logits_from(ids, layer, resid)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm.unembed(hidden) if self.split else hidden

    def losses(self, clean: Tensor, targets: Tensor, others: Sequence[Tensor],
               with_kl: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
        """Sums over rows (CE positions) of the clean CE, and for each of `others` (final
        hidden states `[n, d]` like `clean`) its CE and, where `with_kl`, KL(p_clean || p)."""
        dt = torch.float64  # host tensors
        ce_clean = torch.zeros((), dtype=dt)
        ce, kl = torch.zeros(len(others), dtype=dt), torch.zeros(len(others), dtype=dt)
        for r0 in range(0, clean.shape[0], self.rows):
            rows, t = slice(r0, r0 + self.rows), targets[r0:r0 + self.rows]
            logp = self.logits(clean[rows]).float().log_softmax(dim=-1)
            ce_clean += f64(cross_entropy(logp, t).cpu()).sum()  # float64 on the host
            p = logp.exp() if any(with_kl) else None
            for j, (h, want_kl) in enumerate(zip(others, with_kl)):
                logq = self.logits(h[rows]).float().log_softmax(dim=-1)
                ce[j] += f64(cross_entropy(logq, t).cpu()).sum()
                if want_kl:
                    kl[j] += f64((p * (logp - logq)).sum(dim=-1).cpu()).sum()
                del logq
        return ce_clean, ce, kl


Recon = Callable[[int, Tensor], Tensor]  # (layer, x [token, d_model]) -> x_hat [token, d_model]


def sae_recon(sae: MLSAE, lens: TunedLens | None = None) -> Recon:
    """The reconstruction of one SAE, whatever the layer; with a `lens` (a lens run):
    translate, SAE, exact inverse, so the result is in the original space."""
    if lens is None:
        return lambda _layer, x: sae(x).x_hat
    return lambda layer, x: reconstruct(sae, x[None], lens, [layer])[0][0]


def saes_recon(saes: dict[int, MLSAE]) -> Recon:
    """Each layer's reconstruction by its own SAE (single-layer baselines)."""
    return lambda layer, x: saes[layer](x).x_hat


def _replace_batch(head: _Head, ids: Tensor, mask: Tensor, first: Tensor, clean: Tensor,
                   pos: Tensor, targets: Tensor, recon: Recon, st: ReplacementStats) -> None:
    """One batch of the free-running replacement; `first` is the clean resid_post of the
    first replaced layer, `clean` the clean final hidden states at the CE positions."""
    lm, layers, wanted = head.lm, st.layers, set(st.counts)
    hidden, r = [], first
    for n, layer in enumerate(layers, start=1):
        if n > 1:
            r = lm.resid_from(ids, layers[n - 2], r, layer)
        r = _splice(r, mask, recon(layer, r[mask].float()))
        if n in wanted:
            hidden.append(head.hidden_from(ids, layer, r)[:, :-1][pos])
    ce_clean, ce, kl = head.losses(clean, targets, hidden, [True] * len(hidden))
    st.n += int(pos.sum())
    st.ce_clean += ce_clean
    st.ce += ce
    st.kl += kl


def _layer_groups(n_layers: int, n_pos: int, d: int) -> list[range]:
    """Layers whose recon and ablation final hidden states (2 x [n_pos, d] float32 each) fit
    in HIDDEN_BYTES together: each group shares one pass of clean log-probs."""
    per = max(1, HIDDEN_BYTES // max(1, 2 * n_pos * d * 4))
    return [range(i, min(i + per, n_layers)) for i in range(0, n_layers, per)]


@torch.inference_mode()
def evaluate_batches(sae: MLSAE, lm: LanguageModel, layers: list[int],
                     batches: Sequence[Tensor], data_cfg: DataConfig, ablation: Tensor,
                     progress: bool = True, replace: list[int] | None = None,
                     curve: list[int] | None = None, recon: Recon | None = None,
                     lens: TunedLens | None = None,
                     ) -> tuple[ReconstructionStats | None, SpliceStats | None,
                                ReplacementStats | None]:
    """Stream `[batch, seq]` token batches; `ablation [layer, d_model]` is what x_l becomes.

    `layers` may be empty (replacement only). `replace`: the layers of the multi-layer
    replacement (None: none), with the curve's `curve` counts (default: every n) and
    `recon` (default: `sae`'s reconstruction at every layer). `lens`: the lens of a lens
    run; every reconstruction of `sae` goes through it (module docstring)."""
    rec = ReconstructionStats(len(layers), sae.d_model, sae.n_latents) if layers else None
    ce = SpliceStats(len(layers)) if layers else None
    rep = None
    if replace:
        rep = ReplacementStats(list(replace), list(curve or range(1, len(replace) + 1)))
        recon = recon or sae_recon(sae, lens)
    need = sorted(set(layers) | set(replace or ()))
    at = {layer: i for i, layer in enumerate(need)}
    head = None
    for ids in tqdm(batches, desc="eval", disable=not progress, dynamic_ncols=True):
        mask = include_mask(ids, lm.special_ids, data_cfg).to(lm.device)  # [batch, seq]
        if not mask.any():
            continue
        head = head or _Head(lm, ids)
        resid = lm.resid_post(ids, need)  # [layer, batch, seq, d_model]
        own = resid if need == layers else resid[[at[v] for v in layers or replace]]
        mask = exclude_outliers(own, mask, data_cfg)  # --exclude-outliers, as in training
        pos = mask[:, :-1]  # [batch, seq-1]: included and has a next token
        targets = ids.to(lm.device)[:, 1:][pos]  # [n_pos]
        clean = head.hidden_from(ids, need[-1], resid[-1])[:, :-1][pos]
        if replace:
            _replace_batch(head, ids, mask, resid[at[replace[0]]], clean, pos, targets, recon,
                           rep)
        if not layers:
            continue
        x = own[:, mask].float()  # [layer, token, d_model]
        x_hat, acts, idx = reconstruct(sae, x, lens, layers)  # x_hat in x's (original) space
        rec.update(x, x_hat, acts, idx)
        ce.n += int(pos.sum())
        n_pos = int(pos.sum())
        both_ids, b = torch.cat([ids, ids]), ids.shape[0]
        for group in _layer_groups(len(layers), n_pos, clean.shape[-1]):
            hidden = []
            for i in group:  # recon and ablation continue as ONE batch of 2 x batch sequences
                both = head.hidden_from(both_ids, layers[i], torch.cat([
                    _splice(own[i], mask, x_hat[i]), _splice(own[i], mask, ablation[i])]))
                hidden += [both[:b, :-1][pos], both[b:, :-1][pos]]
                del both
            ce_clean, ce_sum, kl_sum = head.losses(clean, targets, hidden,
                                                   [True, False] * len(group))
            if group.start == 0:
                ce.ce_clean += ce_clean
            ce.ce_recon[group.start:group.stop] += ce_sum[0::2]
            ce.ce_zero[group.start:group.stop] += ce_sum[1::2]
            ce.kl[group.start:group.stop] += kl_sum[0::2]
    return rec, ce, rep


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
             layers: str | Sequence[int] | None = None,
             replace: str | Sequence[int] | None = None,
             curve_points: int = CURVE_POINTS) -> dict:
    """Evaluate a checkpoint on held-out (or --dataset) text; writes and returns the results.

    `layers`: a subset of the checkpoint's layers (default: all). `replace`: also the
    multi-layer replacement of these layers (`all` or a layer spec; None: not), with
    `curve_points` points on its curve. `lm`: an already loaded model (checked against the
    checkpoint). See the module docstring for the definitions.
    """
    if ablation not in ABLATIONS:
        raise UserError(f"--ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
    check_text_options(opts)
    t0 = time.perf_counter()
    sae = load_sae(checkpoint, lens_ok=True)
    lens = sae_lens(checkpoint, sae.config, sae_layers(sae), sae.d_model)  # None: no lens
    chosen = select_layers(layers, sae_layers(sae))
    replaced = None if replace is None else select_layers(replace, sae_layers(sae), "--replace")
    counts = curve_counts(len(replaced), curve_points) if replaced else None
    if lm is None:
        lm = load_run_lm(sae, opts)
    else:
        check_lm_matches(sae, lm)
    sae.to(lm.device)
    if lens is not None:
        lens.to(lm.device)
    data_cfg, batch_list, tokens = eval_batches(sae, lm, opts)
    if ablation == "mean":
        values = layer_means(lm, chosen, batch_list, data_cfg).to(lm.device)
    else:
        values = torch.zeros(len(chosen), lm.d_model, device=lm.device)
    with outlier_tally() as tally, freed_memory_kept():
        rec, ce, rep = evaluate_batches(sae, lm, chosen, batch_list, data_cfg, values, progress,
                                        replace=replaced, curve=counts, lens=lens)
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
    if rep is not None:
        result["replacement"] = rep.result()
    if lens is not None:
        result["lens"] = sae.config["run"]["train"]["lens"]
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
    if "replacement" in res:
        lines.append(format_replacement(res["replacement"]))
    return "\n".join(lines)


def format_replacement(rep: dict) -> str:
    """The multi-layer replacement: totals, then one line per curve point."""
    lines = [f"replacement of layers {format_layers(rep['layers'])} at once (free-running): "
             f"CE {rep['ce_replaced']:.4f} vs clean {rep['ce_clean']:.4f}, dCE "
             f"{rep['dce']:.4f}, KL {rep['kl']:.4f}",
             f"{'n':>5} {'last':>5} {'CE':>8} {'dCE':>8} {'KL':>8}"]
    for pt in rep["curve"]:
        lines.append(f"{pt['n_layers']:>5} {pt['layers'][-1]:>5} {pt['ce']:>8.4f} "
                     f"{pt['ce'] - rep['ce_clean']:>8.4f} {pt['kl']:>8.4f}")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    res = evaluate(args.checkpoint, text_options(args), out=args.out, ablation=args.ablation,
                   layers=args.layers, replace=args.replace, curve_points=args.curve_points)
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
    p.add_argument("--replace", metavar="LAYERS", help="also replace these layers (all, or a "
                   "layer spec) at once, free-running, and report CE, dCE, KL and the curve over "
                   "the first n of them (eval.json 'replacement')")
    p.add_argument("--curve-points", type=int, default=CURVE_POINTS,
                   help="points of the replacement curve when more layers are replaced: evenly "
                   f"spaced n, first and last included; 0: every n (default: {CURVE_POINTS})")
    add_text_options(p)
    p.set_defaults(func=_cmd_eval)

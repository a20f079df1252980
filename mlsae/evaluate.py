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
forward, see `LanguageModel.logits_from`); then per layer the continuations of the splices
(recon and ablation), up to CONT_ITEMS of them run as one batch of several x batch sequences
(no faster on 2 CPU cores: neutral at 2 x 256-token sequences, 19% slower per item at 8;
kept for accelerators, where it was not measured), each stopping at the last block's
resid_post. The final norm and unembedding run afterwards on CHUNK_BYTES worth of positions
at a time, and each chunk's clean log-probs serve every splice: no `[positions, vocab]`
tensor exists, so memory is bounded by the batch and the chunk, not by vocabulary x
positions. Sums stream in float64: memory is bounded by the batch, not by --tokens.

Several checkpoints (`evaluate_many`, `mlsae eval A B C`, a sweep or baselines folder). What
does not depend on the SAE is computed once per batch for all of them: the forward (to the
deepest layer any of them needs), the clean final hidden states and log-probs, and each
(layer, ablation) continuation, shared by every checkpoint that counts the same positions
(the same data settings; with --exclude-outliers the rule is each checkpoint's own). Only the
reconstruction splices (and replacements) are each checkpoint's. Every number of a
continuation or a log-prob row depends on that sequence or row alone (checked bit for bit on
this CPU for SmolLM2), and every sum runs over the same chunks in the same order, so each
checkpoint's eval.json equals its evaluation alone. Checkpoints on other text are evaluated in
one pass per text. For a 30-layer MLSAE the ablations are about half the continuations and
head work, so N checkpoints cost about (N + 1) / 2N of N separate evaluations, plus what N
separate processes spend loading.

The SAE-independent cache (`EvalCache`, on by default; `--no-cache`): the ablation sums of
each batch are kept under `$MLSAE_EVAL_CACHE`, else `$MLSAE_CACHE_DIR/eval` (default
~/.cache/mlsae/eval), keyed by the model as computed (name, dtype, device, the logits of a
probe), the token ids and the counted positions, so a later evaluation of the same text skips
its ablation continuations (about half the work of one checkpoint). Any change of model, text
or settings is another key.

Dtype. `--dtype float32` (the default) is the exact path. `--dtype auto` runs the LM in
bfloat16 where the device computes it natively (as training does: `mlsae.runtime.auto_dtype`),
for the capture, every continuation and the head; the SAE still runs in float32 on the
captured vectors cast to float32, log-softmax, CE and KL are float32 per row and every sum
float64.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae import config as C
from mlsae.activations.capture import OutlierTally, exclude_outliers, outlier_tally
from mlsae.config import DataConfig
from mlsae.data import include_mask
from mlsae.errors import OptionError, UserError
from mlsae.lens import TunedLens, sae_lens
from mlsae.lm import LanguageModel
from mlsae.metrics import ReconstructionStats, f64
from mlsae.options import TextOptions, add_text_options, text_options
from mlsae.runs import (
    check_lm_matches,
    eval_batches,
    expand_checkpoints,
    load_run_lm,
    load_sae,
    own_data_config,
    run_data_config,
    sae_layers,
)
from mlsae.runtime import freed_memory_kept
from mlsae.sae import MLSAE, stack_codes

ABLATIONS = ("zero", "mean")
CHUNK_BYTES = 64 * 2**20  # one float32 [positions, vocab] chunk of log-probabilities
CHUNK_MIN_ROWS = 64  # ... but at least this many positions
HIDDEN_BYTES = 512 * 2**20  # final hidden states kept per batch before their CE/KL is taken
CURVE_POINTS = 10
CONT_ITEMS = 4  # splices of one layer continued together as one batch of <= 4 x batch sequences
EVAL_TOKENS = 2048  # default --tokens of eval and compare: one batch-8 pass of ctx 256
CACHE_VERSION = 1


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
    pre-activations to one layer) -> x_hat `[layer, token, d_model]`, acts, idx `[layer, token,
    width]` (padded with acts == 0 to the widest layer's code).
    With a `lens` (a lens run; `layers`: the LM blocks of x's slices) the SAE encodes the
    translated x and x_hat is mapped back with the exact inverse: x_hat is in x's space."""
    outs, xs = [], []
    for i in range(x.shape[0]):
        xi = x[i] if lens is None else lens.translate(x[i][None], [layers[i]])[0]
        out = sae(xi)
        x_hat = out.x_hat if lens is None else lens.inverse(out.x_hat[None], [layers[i]])[0]
        outs.append(out)
        xs.append(x_hat)
    code = stack_codes([o.code for o in outs])  # widths may differ between layers
    return torch.stack(xs), code.acts, code.idx


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
    `hidden_from` and an identity `logits`: correct, but memory as before the split.
    `fingerprint` names the model as computed here (its name, dtype, device and the probe's
    logits): what the SAE-independent cache is keyed by."""

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
        h = hashlib.sha256()
        for part in (lm.name, str(next(lm.model.parameters()).dtype), lm.device.type,
                     str(self.split), str(self.rows), torch.__version__):
            h.update(part.encode() + b"\0")
        h.update(probe.cpu().numpy().tobytes())
        h.update(want.cpu().numpy().tobytes())
        self.fingerprint = h.hexdigest()

    def hidden_from(self, ids: Tensor, layer: int, resid: Tensor) -> Tensor:
        if self.split:
            return self.lm.final_hidden_from(ids, layer, resid)
        return self.lm.logits_from(ids, layer, resid)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm.unembed(hidden) if self.split else hidden

    def losses(self, clean: Tensor, targets: Tensor, others: Sequence[Tensor],
               with_kl: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
        """Sums over rows (CE positions) of the clean CE, and for each of `others` (final
        hidden states `[n, d]` like `clean`) its CE and, where `with_kl`, KL(p_clean || p).
        Each row's numbers depend on that row alone and every sum runs over the same chunks
        whatever `others` holds: the same hidden state gives the same sums in any company."""
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


class EvalJob:
    """One checkpoint's share of a joint evaluation: its SAE (and lens), its layers, its data
    settings (which positions count), what x_l becomes under ablation (`ablation [layer,
    d_model]`), and its streaming statistics. `replace`/`curve`/`recon`: the multi-layer
    replacement (None: none; `recon` default: the SAE's reconstruction, through `lens`)."""

    def __init__(self, sae: MLSAE, layers: list[int], data_cfg: DataConfig, ablation: Tensor,
                 replace: list[int] | None = None, curve: list[int] | None = None,
                 recon: Recon | None = None, lens: TunedLens | None = None):
        self.sae, self.lens, self.layers, self.data_cfg = sae, lens, list(layers), data_cfg
        self.ablation = ablation
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.replace = list(replace) if replace else None
        self.rec = ReconstructionStats(len(layers), sae.d_model, sae.n_latents) if layers else None
        self.ce = SpliceStats(len(layers)) if layers else None
        self.rep = None
        self.recon = recon
        if self.replace:
            self.rep = ReplacementStats(self.replace, list(curve or range(1, len(replace) + 1)))
            self.recon = recon or sae_recon(sae, lens)
        self.outliers = OutlierTally()

    def reconstruct(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x `[token, d_model]` at `layer` -> x_hat (x's space), acts, idx `[token, width]`:
        the SAE through its public forward, through the lens for a lens run (as
        `reconstruct` does one layer at a time)."""
        if self.lens is None:
            out = self.sae(x)
            return out.x_hat, out.code.acts, out.code.idx
        out = self.sae(self.lens.translate(x[None], [layer])[0])
        return self.lens.inverse(out.x_hat[None], [layer])[0], out.code.acts, out.code.idx

    def count_outliers(self, tally: OutlierTally) -> None:
        if tally.counts is not None:  # [layer] counts: summed over a dummy token axis
            self.outliers.add(tally.counts[:, None], tally.included, tally.excluded,
                              tally.factor)


def eval_cache_dir() -> Path:
    """Where the SAE-independent sums are kept: `$MLSAE_EVAL_CACHE` if set, else
    `$MLSAE_CACHE_DIR/eval` (default ~/.cache/mlsae/eval); one small JSON file per batch."""
    if os.environ.get("MLSAE_EVAL_CACHE"):
        return Path(os.environ["MLSAE_EVAL_CACHE"])
    base = Path(os.environ.get("MLSAE_CACHE_DIR") or Path.home() / ".cache" / "mlsae")
    return base / "eval"


class EvalCache:
    """The SAE-independent sums of a batch: the CE summed over its CE positions with x_l
    ablated (any layer, any ablation value), so that a later evaluation of the same text
    skips those continuations. One JSON file per (model as computed, batch, positions): the
    key hashes the head's fingerprint (model name, dtype, device, the logits of a probe),
    the token ids and the mask of counted positions; an entry is keyed by layer and a hash
    of the ablation vector. A changed model, text, dtype, ablation or position rule is
    another key, so a stale entry is never read. Values are the float64 sums themselves
    (JSON round-trips them exactly): a hit adds the very number the continuation would."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else eval_cache_dir()
        self.hits = self.misses = 0

    def _path(self, head: _Head, ids: Tensor, mask: Tensor) -> Path:
        h = hashlib.sha256(f"{CACHE_VERSION}|{head.fingerprint}|{tuple(ids.shape)}".encode())
        h.update(ids.cpu().numpy().tobytes())
        h.update(mask.cpu().numpy().tobytes())
        return self.root / f"{h.hexdigest()[:40]}.json"

    @staticmethod
    def entry(layer: int, value: Tensor) -> str:
        v = value.detach().float().cpu().contiguous().numpy().tobytes()
        return f"{layer}:{hashlib.sha1(v).hexdigest()[:16]}"

    def get(self, head: _Head, ids: Tensor, mask: Tensor, n_pos: int) -> dict[str, float]:
        try:
            data = json.loads(self._path(head, ids, mask).read_text())
        except (OSError, ValueError):
            return {}
        return data.get("ce", {}) if data.get("n_pos") == n_pos else {}

    def put(self, head: _Head, ids: Tensor, mask: Tensor, n_pos: int,
            new: dict[str, float]) -> None:
        """Add `new` entries (best effort: an unwritable cache only costs the time)."""
        if not new:
            return
        path = self._path(head, ids, mask)
        merged = dict(self.get(head, ids, mask, n_pos), **new)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"n_pos": n_pos, "ce": merged}, f)
            os.replace(tmp, path)
        except OSError:  # the cache only saves time: a read-only or full disk costs none,
            if tmp is not None:  # and leaves no half-written file behind
                Path(tmp).unlink(missing_ok=True)


def _ablations(jobs: list[EvalJob]) -> tuple[list[tuple[int, Tensor]], dict]:
    """The distinct (layer, ablation value) pairs the jobs ask for, and for each job index
    and layer position the pair it uses."""
    pairs: list[tuple[int, Tensor]] = []
    by_layer: dict[int, list[int]] = {}
    use = {}
    for jn, job in enumerate(jobs):
        for i, layer in enumerate(job.layers):
            value = job.ablation[i]
            for e in by_layer.get(layer, []):
                if torch.equal(pairs[e][1], value):
                    break
            else:
                e = len(pairs)
                pairs.append((layer, value))
                by_layer.setdefault(layer, []).append(e)
            use[jn, i] = e
    return pairs, use


def _group_batch(head: _Head, ids: Tensor, resid: Tensor, at: dict[int, int], mask: Tensor,
                 clean_all: Tensor, jobs: list[EvalJob], cache: EvalCache | None) -> None:
    """One batch for jobs that count the same positions (`mask [batch, seq]`): their
    replacements, reconstructions and splices; the clean log-probs and each (layer,
    ablation) continuation are computed once for all of them (or read from `cache`)."""
    lm = head.lm
    pos = mask[:, :-1]  # [batch, seq-1]: included and has a next token
    targets = ids.to(lm.device)[:, 1:][pos]  # [n_pos]
    clean = clean_all[pos]  # [n_pos, d_model]: clean final hidden states
    n_pos, b = int(pos.sum()), ids.shape[0]
    for job in jobs:
        if job.rep is not None:
            _replace_batch(head, ids, mask, resid[at[job.replace[0]]], clean, pos, targets,
                           job.recon, job.rep)
    jobs = [job for job in jobs if job.layers]
    if not jobs:
        return
    pairs, use = _ablations(jobs)
    names = [EvalCache.entry(layer, value) for layer, value in pairs] if cache else []
    known = cache.get(head, ids, mask, n_pos) if cache else {}
    abl_ce: dict[int, Tensor] = {}
    for e, name in enumerate(names):
        if name in known:
            abl_ce[e] = torch.tensor(known[name], dtype=torch.float64)
    if cache:
        cache.hits += len(abl_ce)
        cache.misses += len(pairs) - len(abl_ce)
    fresh = [e for e in range(len(pairs)) if e not in abl_ce]
    rec_ce: dict[tuple[int, int], Tensor] = {}
    rec_kl: dict[tuple[int, int], Tensor] = {}
    clean_ce: list[Tensor] = []
    pending: list[tuple[tuple, Tensor]] = []  # (("abl", e) | ("rec", (job, i)), [n_pos, d])

    def flush() -> None:
        """CE (and KL for reconstructions) of the pending hidden states, sharing one pass of
        clean log-probs per chunk of positions."""
        tags = [t for t, _ in pending]
        ce_clean, ce, kl = head.losses(clean, targets, [h for _, h in pending],
                                       [t[0] == "rec" for t in tags])
        clean_ce.append(ce_clean)
        for k, (kind, key) in enumerate(tags):
            if kind == "abl":
                abl_ce[key] = ce[k]
            else:
                rec_ce[key], rec_kl[key] = ce[k], kl[k]
        pending.clear()

    for layer in sorted({v for job in jobs for v in job.layers}):
        base = resid[at[layer]]  # [batch, seq, d_model]
        x = base[mask].float()  # [token, d_model]
        items = [(("abl", e), _splice(base, mask, pairs[e][1])) for e in fresh
                 if pairs[e][0] == layer]
        for jn, job in enumerate(jobs):
            i = job.index.get(layer)
            if i is None:
                continue
            x_hat, acts, idx = job.reconstruct(layer, x)  # x_hat in x's (original) space
            job.rec.update_layer(i, x, x_hat, acts, idx)
            items.append((("rec", (jn, i)), _splice(base, mask, x_hat)))
        for c in range(0, len(items), CONT_ITEMS):  # several splices continue as ONE batch
            chunk = items[c:c + CONT_ITEMS]
            out = head.hidden_from(torch.cat([ids] * len(chunk)), layer,
                                   torch.cat([r for _, r in chunk]))
            for k, (tag, _) in enumerate(chunk):
                pending.append((tag, out[k * b:(k + 1) * b, :-1][pos]))
            del out
            if sum(h.numel() * h.element_size() for _, h in pending) >= HIDDEN_BYTES:
                flush()
    if pending:
        flush()
    if cache:
        cache.put(head, ids, mask, n_pos, {names[e]: abl_ce[e].item() for e in fresh})
    for jn, job in enumerate(jobs):
        job.rec.n += int(mask.sum())
        job.ce.n += n_pos
        job.ce.ce_clean += clean_ce[0]
        for i in range(len(job.layers)):
            job.ce.ce_recon[i] += rec_ce[jn, i]
            job.ce.ce_zero[i] += abl_ce[use[jn, i]]
            job.ce.kl[i] += rec_kl[jn, i]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@torch.inference_mode()
def evaluate_jobs(lm: LanguageModel, jobs: Sequence[EvalJob], batches: Sequence[Tensor],
                  progress: bool = True, cache: EvalCache | None = None) -> None:
    """Stream `[batch, seq]` token batches through every job at once (module docstring):
    one forward to the deepest layer any job needs, one clean continuation, and per batch
    each (layer, ablation) continuation once for all jobs that count the same positions;
    only the reconstruction splices are each job's own. Each job's statistics equal those of
    evaluating it alone. With `progress`, prints the time of the first batch and an estimate
    of the rest."""
    need = sorted({v for job in jobs for v in (*job.layers, *(job.replace or ()))})
    at = {layer: i for i, layer in enumerate(need)}
    head = None
    t0 = time.perf_counter()
    for nb, ids in enumerate(tqdm(batches, desc="eval", disable=not progress,
                                  dynamic_ncols=True)):
        base = [include_mask(ids, lm.special_ids, job.data_cfg).to(lm.device) for job in jobs]
        live = [j for j, m in enumerate(base) if m.any()]
        if not live:
            continue
        head = head or _Head(lm, ids)
        resid = lm.resid_post(ids, need)  # [layer, batch, seq, d_model]
        clean_all = head.hidden_from(ids, need[-1], resid[-1])[:, :-1]  # [batch, seq-1, d]
        groups: list[tuple[Tensor, list[EvalJob]]] = []  # jobs counting the same positions
        for j in live:
            job = jobs[j]
            own = resid[[at[v] for v in job.layers or job.replace]]
            with outlier_tally() as tally:  # --exclude-outliers, as in training
                mask = exclude_outliers(own, base[j], job.data_cfg)
            job.count_outliers(tally)
            for g_mask, members in groups:
                if torch.equal(g_mask, mask):
                    members.append(job)
                    break
            else:
                groups.append((mask, [job]))
        for mask, members in groups:
            _group_batch(head, ids, resid, at, mask, clean_all, members, cache)
        if nb == 0 and progress and len(batches) > 1:
            took = time.perf_counter() - t0
            tqdm.write(f"first batch took {took:.1f} s: about "
                       f"{_duration(took * (len(batches) - 1))} for the other "
                       f"{len(batches) - 1}", file=sys.stderr)


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
    run; every reconstruction of `sae` goes through it (module docstring). One job of
    `evaluate_jobs`."""
    job = EvalJob(sae, layers, data_cfg, ablation, replace, curve, recon, lens)
    evaluate_jobs(lm, [job], batches, progress)
    return job.rec, job.ce, job.rep


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


class _Checkpoint:
    """A checkpoint about to be evaluated: its SAE, lens, chosen and replaced layers."""

    def __init__(self, checkpoint: str | Path, layers, replace, curve_points: int,
                 several: bool):
        self.name = checkpoint
        self.sae = load_sae(checkpoint, lens_ok=True)
        available = sae_layers(self.sae)
        self.lens = sae_lens(checkpoint, self.sae.config, available, self.sae.d_model)
        try:
            self.layers = select_layers(layers, available)
            self.replace = (None if replace is None
                            else select_layers(replace, available, "--replace"))
        except UserError as e:
            if not several or isinstance(e, OptionError):
                raise
            raise UserError(f"{checkpoint}: {e.cli_message()}") from None
        self.counts = curve_counts(len(self.replace), curve_points) if self.replace else None
        train = (self.sae.config.get("run") or {}).get("train") or {}
        self.model = (self.sae.config.get("model"), train.get("revision"), train.get("blocks"))


def _text_key(sae: MLSAE, opts: TextOptions) -> str:
    """What decides a checkpoint's evaluation text (checkpoints with equal keys share it)."""
    train = (sae.config.get("run") or {}).get("train") or {}
    return json.dumps([asdict(run_data_config(sae, opts)), asdict(own_data_config(sae)),
                       sae.config.get("model"), train.get("revision")], sort_keys=True,
                      default=str)


def _same_text(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y)
                                    for x, y in zip(a, b))


def evaluate_many(checkpoints: Sequence[str | Path], opts: TextOptions,
                  outs: Sequence[str | Path | None] | None = None, ablation: str = "zero",
                  lm: LanguageModel | None = None, progress: bool = True,
                  layers: str | Sequence[int] | None = None,
                  replace: str | Sequence[int] | None = None,
                  curve_points: int = CURVE_POINTS,
                  cache: bool | str | Path | EvalCache = True) -> list[dict]:
    """Evaluate several checkpoints of one model on the same text in one pass per batch;
    writes each one's eval.json (`outs`, default `default_out`) and returns the results.

    Each result equals `evaluate` of that checkpoint alone (float32: exactly; every key but
    `seconds`, here the whole call's). The clean forward, the clean log-probs and every
    ablation continuation are computed once and shared; only each checkpoint's
    reconstruction splices are its own. Checkpoints whose text differs (another dataset or
    held-out split) are evaluated in one pass per text. `cache`: keep and reuse the ablation
    sums (True: under `eval_cache_dir()`; a folder or an `EvalCache`: there; False: neither
    read nor write).
    The other arguments as for `evaluate`, applied to every checkpoint."""
    if ablation not in ABLATIONS:
        raise UserError(f"--ablation {ablation!r}: choose one of {', '.join(ABLATIONS)}")
    check_text_options(opts)
    if not checkpoints:
        raise UserError("no checkpoint to evaluate")
    outs = list(outs) if outs is not None else [None] * len(checkpoints)
    if len(outs) != len(checkpoints):
        raise ValueError("outs: one path (or None) per checkpoint")
    t0 = time.perf_counter()
    several = len(checkpoints) > 1
    cks = [_Checkpoint(c, layers, replace, curve_points, several) for c in checkpoints]
    if opts.model is None and len({c.model for c in cks}) > 1:
        raise UserError("the checkpoints were trained on different models (or revisions): "
                        "evaluate them in separate calls, or name one with --model")
    if lm is None:
        lm = load_run_lm(cks[0].sae, opts)
    for c in cks:
        check_lm_matches(c.sae, lm)
        c.sae.to(lm.device)
        if c.lens is not None:
            c.lens.to(lm.device)
    store = (cache if isinstance(cache, EvalCache) or cache is False or cache is None
             else EvalCache(None if cache is True else Path(cache)))
    store = store or None
    texts: dict[str, tuple] = {}  # text key -> (data_cfg, batches, tokens)
    groups: list[tuple[list[Tensor], list[int]]] = []  # (batches, checkpoint indices)
    setup = {}
    for n, c in enumerate(cks):
        key = _text_key(c.sae, opts)
        if key not in texts:
            texts[key] = eval_batches(c.sae, lm, opts)
        data_cfg, batch_list, tokens = texts[key]
        setup[n] = (data_cfg, tokens)
        for g_batches, members in groups:
            if _same_text(g_batches, batch_list):
                members.append(n)
                break
        else:
            groups.append((batch_list, [n]))
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    jobs: dict[int, EvalJob] = {}
    for batch_list, members in groups:
        if progress:
            cfg, tokens = setup[members[0]]
            many, nb = len(members) > 1, len(batch_list)
            print(f"evaluating {len(members)} checkpoint{'s' if many else ''} on {tokens} "
                  f"tokens: {nb} batch{'es' if nb > 1 else ''} of {batch_list[0].shape[0]} x "
                  f"{cfg.ctx_len} ({cfg.eval_dataset or cfg.dataset}), LM {dtype} on "
                  f"{lm.device.type}", file=sys.stderr)
        means: dict[str, Tensor] = {}
        for n in members:
            c, (data_cfg, _) = cks[n], setup[n]
            if ablation == "mean":
                key = json.dumps([c.layers, asdict(data_cfg)], default=str)
                if key not in means:
                    means[key] = layer_means(lm, c.layers, batch_list, data_cfg).to(lm.device)
                values = means[key]
            else:
                values = torch.zeros(len(c.layers), lm.d_model, device=lm.device)
            jobs[n] = EvalJob(c.sae, c.layers, data_cfg, values, c.replace, c.counts,
                              lens=c.lens)
        with freed_memory_kept():
            evaluate_jobs(lm, [jobs[n] for n in members], batch_list, progress, store)
    seconds = round(time.perf_counter() - t0, 2)
    results = []
    for n, c in enumerate(cks):
        job, (data_cfg, tokens) = jobs[n], setup[n]
        results.append(_result(c, job, lm, opts, ablation, data_cfg, tokens, dtype, seconds,
                               outs[n]))
    if store is not None and progress and (store.hits or store.misses):
        print(f"eval cache {store.root}: {store.hits} ablation sums reused, {store.misses} "
              "computed", file=sys.stderr)
    return results


def _result(c: _Checkpoint, job: EvalJob, lm: LanguageModel, opts: TextOptions,
            ablation: str, data_cfg: DataConfig, tokens: int, dtype: str, seconds: float,
            out: str | Path | None) -> dict:
    """eval.json of one checkpoint, written to `out` (default `default_out`)."""
    rec, ce = job.rec, job.ce
    if rec.n == 0:
        raise UserError("every position of the evaluation text is excluded (special tokens "
                        "/ exclude_first)")
    r, splice = rec.result(), ce.result()
    per_layer = dict(r["per_layer"], **splice)
    result = {
        "checkpoint": str(c.name), "model": lm.name, "tokens": tokens, "layers": c.layers,
        "ablation": ablation, "included_tokens": rec.n, "ce_positions": ce.n,
        "per_layer": per_layer,
        "mean": {key: _mean(v) for key, v in per_layer.items()},
        "dead_fraction": r["dead_fraction"],
        "dataset": data_cfg.eval_dataset or f"{data_cfg.dataset} (held-out split)",
        "options": {k: v for k, v in asdict(opts).items() if k != "device"},
        "lm_dtype": dtype,
    }
    if job.rep is not None:
        result["replacement"] = job.rep.result()
    if c.lens is not None:
        result["lens"] = c.sae.config["run"]["train"]["lens"]
    note = shortfall_note(opts, data_cfg.ctx_len, tokens)
    if note:
        result["note"] = note
        print(f"note: {note}", file=sys.stderr)
    result["outliers"] = job.outliers.result(c.layers)
    result["seconds"] = seconds
    path = Path(out) if out is not None else default_out(c.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["out"] = str(path)
    return result


def evaluate(checkpoint: str | Path, opts: TextOptions, out: str | Path | None = None,
             ablation: str = "zero", lm: LanguageModel | None = None, progress: bool = True,
             layers: str | Sequence[int] | None = None,
             replace: str | Sequence[int] | None = None,
             curve_points: int = CURVE_POINTS, cache: bool | str | Path = True) -> dict:
    """Evaluate a checkpoint on held-out (or --dataset) text; writes and returns the results.

    `layers`: a subset of the checkpoint's layers (default: all). `replace`: also the
    multi-layer replacement of these layers (`all` or a layer spec; None: not), with
    `curve_points` points on its curve. `lm`: an already loaded model (checked against the
    checkpoint). `cache`: as for `evaluate_many`. See the module docstring for the
    definitions.
    """
    return evaluate_many([checkpoint], opts, [out], ablation=ablation, lm=lm,
                         progress=progress, layers=layers, replace=replace,
                         curve_points=curve_points, cache=cache)[0]


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
    checkpoints = expand_checkpoints(args.checkpoint)
    if args.out and len(checkpoints) > 1:
        raise UserError(f"--out names one file, but {len(checkpoints)} checkpoints are "
                        "evaluated: use --out-dir, or let each write <checkpoint>/eval.json")
    outs = [args.out] * len(checkpoints)
    if args.out_dir:
        outs = out_dir_paths(checkpoints, args.out_dir)
    results = evaluate_many(checkpoints, text_options(args), outs,
                            ablation=args.ablation, layers=args.layers, replace=args.replace,
                            curve_points=args.curve_points, cache=args.cache)
    for res in results:
        print(format_eval_table(res))
        print(f"wrote {res['out']} ({res['seconds']:.1f} s)")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae eval` on the subparsers object `sub`."""
    p = sub.add_parser(
        "eval", help="per-layer FVU, L0 and spliced downstream loss of checkpoints",
        description="Per layer and averaged: FVU, MSE, L0, alive latents, and the next-token "
        "CE with resid_post replaced by the reconstruction (and by an ablation), dCE, CE "
        "recovered and KL. Default text: the run's held-out split. Several checkpoints of one "
        "model are evaluated together in one pass per batch (the clean forward and the "
        "ablations are shared), each writing its own eval.json, equal to evaluating it alone.")
    p.add_argument("checkpoint", nargs="+", help="checkpoint or run folder(s) (config.json + "
                   "model.safetensors, or another format mlsae reads); a sweep folder "
                   "(sweep.json) or a folder of checkpoints such as <run>/baselines stands "
                   "for the checkpoints in it")
    p.add_argument("--out", help="JSON file to write, one checkpoint only (default: "
                   "<checkpoint>/eval.json)")
    p.add_argument("--out-dir", help="write each result to DIR/<checkpoint folder name>.json "
                   "instead (the checkpoints stay untouched)")
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
    add_cache_option(p)
    add_text_options(p, tokens=EVAL_TOKENS)
    p.set_defaults(func=_cmd_eval)


def out_dir_paths(checkpoints: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """`out_dir/<name>.json` per checkpoint (`name`: the folder's name, a hub id's with `/` as
    `_`); names that collide get the parent folder's name in front (`run_layer_3`)."""
    def name(c, parts: int) -> str:
        bits = Path(str(c)).expanduser().parts[-parts:]
        return "_".join(bits).replace("/", "_")

    names = [name(c, 1) for c in checkpoints]
    if len(set(names)) < len(names):
        names = [name(c, 2) for c in checkpoints]
    if len(set(names)) < len(names):
        raise UserError("--out-dir: two checkpoints have the same name; evaluate them apart")
    return [Path(out_dir) / f"{n}.json" for n in names]


def add_cache_option(p: argparse.ArgumentParser) -> None:
    """--no-cache: neither read nor write the SAE-independent sums (`EvalCache`)."""
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="do not read or keep the SAE-independent sums (the CE of every "
                   "ablation continuation, per batch of text) under $MLSAE_CACHE_DIR/eval "
                   "(default: ~/.cache/mlsae/eval; kept and reused)")

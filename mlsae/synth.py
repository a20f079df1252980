"""Synthetic ground truth for multi-layer SAEs (`mlsae synth`, `mlsae synth-score`): an
activation cache whose vectors are sparse sums of KNOWN directions with a known layer
structure, and a score of how well a run trained on it recovered them. Uses the activation
cache format, config, the SAE, and the analysis statistics (layer distribution, per-token
layer variance, dynamics).

The generative model (all sizes are options; ``i = 0..L-1`` are layer positions):
  * F true features, each a unit direction ``D_f`` in R^d (Gaussian, normalised), a firing
    probability ``p_f`` (log-uniform over a decade, scaled so that ``active_per_token``
    features fire per token on average), a home layer ``h_f`` (uniform) and a span of layers
    ``[lo_f, hi_f]`` around it of ``S_f`` layers (S_f - 1 ~ Geometric, capped at L): the layers
    where the feature may appear over a dataset.
  * Token t: each feature fires independently with probability p_f. When it does, it is
    active at ONE contiguous window of w_tf layers (w - 1 ~ Geometric(1 - token_continue),
    capped at S_f) placed uniformly inside its span (per-token jitter), with magnitude
    m_tf = exp(N(0, 0.5^2)) times a per-layer factor (1 + 0.1 N(0, 1)) clipped at 0.1.
  * x_i(t) = sum of m D_f over the features active at layer i, plus N(0, noise^2 I).
So, like the latents the MLSAE paper describes, a feature spreads over several layers across
tokens but over fewer for one token. Because a true feature's per-token layer set is the
window, the true statistics (layer distributions, aggregated and per-token layer variance,
persistence, contiguity = 1) are computed exactly by the same streaming classes from the
known codes.

Files written by `mlsae synth --out DIR`:
  manifest.json, shard_*.safetensors  the activation cache format of
                 `mlsae.activations.cache` (model "synthetic", layers 0..L-1, all positions
                 included: exclude_first 0); train with
                 `mlsae train --activations DIR --eval-tokens 0` (no LM exists, so the held-out
                 summary after training is skipped; `mlsae synth-score` is the evaluation).
  truth.safetensors  directions [F, d] float32, home_layer, span_lo, span_hi [F] int64,
                 firing_prob [F] float32; metadata "spec" (the generator's options, JSON) and
                 "stats" (the true statistics over the cached tokens, JSON).

`mlsae synth-score RUN DIR` draws fresh held-out tokens from the same generator (another
seed), encodes them with the run's SAE and writes RUN/synth_score.json: per true direction the
best cosine with a decoder row (directions centred when the SAE standardizes, since a
standardized input has no mean component), the fraction above 0.9 (and 0.7), and the analysis
statistics of the SAE's codes (all latents, and only the latents that matched a direction)
next to the same statistics of the true codes on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlsae.activations.cache import MANIFEST
from mlsae.analysis.analyze import json_safe
from mlsae.analysis.dynamics import LayerDynamics
from mlsae.analysis.layer_dist import LayerDistribution, n_active_layers, weak_firings
from mlsae.analysis.token_variance import PerTokenLayerVariance
from mlsae.config import DataConfig
from mlsae.errors import UserError
from mlsae.options import number
from mlsae.sae import MLSAE

TRUTH = "truth.safetensors"
MODEL_NAME = "synthetic"
MATCH = 0.9  # a true direction counts as recovered when some decoder row has cosine > MATCH


@dataclass
class SynthSpec:
    """Options of the generator (module docstring)."""

    d_model: int = 128
    n_layers: int = 8
    n_features: int = 1024
    active_per_token: float = 48.0  # mean features firing per token
    span_continue: float = 0.5  # P(span grows by one more layer): S_f - 1 ~ Geometric
    token_continue: float = 0.3  # P(per-token window grows by one more layer)
    noise: float = 0.02
    tokens: int = 200_000
    ctx_len: int = 256
    seed: int = 0


SPEC_HELP = {
    "d_model": "width of the vectors",
    "n_layers": "layers of the cache",
    "n_features": "true directions",
    "active_per_token": "mean number of features firing per token",
    "span_continue": "P(a feature's span of layers grows by one more layer)",
    "token_continue": "P(a firing's per-token window grows by one more layer)",
    "noise": "std of the Gaussian noise added to every vector",
    "tokens": "tokens to write (whole sequences of --ctx-len)",
    "ctx_len": "tokens per sequence",
    "seed": "seed of the truth and of the cached tokens",
}


def _geometric(p_continue: float, n: int, cap: Tensor | int, g: torch.Generator) -> Tensor:
    """1 + Geometric failures: 1 + number of successes with prob p_continue before a failure,
    capped at ``cap``; [n] int64."""
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if p_continue <= 0:
        extra = torch.zeros(n, dtype=torch.int64)
    else:
        extra = torch.floor(torch.log1p(-u) / math.log(p_continue)).long()
    return torch.minimum(1 + extra, torch.as_tensor(cap))


def make_truth(spec: SynthSpec) -> dict[str, Tensor]:
    """Directions and layer structure of the F features (module docstring)."""
    if spec.n_layers < 1 or spec.d_model < 2 or spec.n_features < 1:
        raise UserError("synth: need --n-layers >= 1, --d-model >= 2, --n-features >= 1")
    g = torch.Generator().manual_seed(spec.seed)
    F, L = spec.n_features, spec.n_layers
    d = torch.randn(F, spec.d_model, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    rate = torch.exp(torch.rand(F, generator=g) * math.log(10))  # log-uniform over a decade
    prob = (rate / rate.sum() * spec.active_per_token).clamp(max=1.0)
    home = torch.randint(0, L, (F,), generator=g)
    span = _geometric(spec.span_continue, F, L, g)
    lo = (home - (span - 1) // 2).clamp(min=0)
    lo = torch.minimum(lo, L - span)
    return {"directions": d.contiguous(), "home_layer": home, "span_lo": lo,
            "span_hi": lo + span - 1, "firing_prob": prob.float()}


def sample(truth: dict[str, Tensor], spec: SynthSpec, n_tokens: int, g: torch.Generator
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Draw n_tokens tokens: x [L, T, d] float32 and the true codes top_idx, top_acts
    [L, T, kmax] (feature ids, magnitudes; zero-padded), the analysis input convention."""
    L, F = spec.n_layers, spec.n_features
    D, prob = truth["directions"], truth["firing_prob"]
    lo, hi = truth["span_lo"], truth["span_hi"]
    fires = torch.rand(n_tokens, F, generator=g) < prob  # [T, F]
    t, f = fires.nonzero(as_tuple=True)  # active (token, feature) pairs [m]
    m = t.numel()
    span = hi[f] - lo[f] + 1
    w = _geometric(spec.token_continue, m, span, g)
    start = lo[f] + (torch.rand(m, generator=g, dtype=torch.float64) * (span - w + 1)).long()
    mag = torch.exp(0.5 * torch.randn(m, generator=g))
    # expand each pair to its w layers: entries (layer, token, feature, act)
    rep = torch.repeat_interleave(torch.arange(m), w)
    offset = torch.arange(rep.numel()) - torch.repeat_interleave(torch.cumsum(w, 0) - w, w)
    layer, tok, feat = start[rep] + offset, t[rep], f[rep]
    act = mag[rep] * (1 + 0.1 * torch.randn(rep.numel(), generator=g)).clamp(min=0.1)
    x = spec.noise * torch.randn(L * n_tokens, spec.d_model, generator=g)
    x.index_add_(0, layer * n_tokens + tok, act[:, None] * D[feat])
    # true codes as [L, T, kmax]: rank of each entry within its (layer, token) vector
    key = layer * n_tokens + tok
    order = torch.argsort(key, stable=True)
    key_s = key[order]
    counts = torch.bincount(key_s, minlength=L * n_tokens)
    kmax = max(int(counts.max()) if counts.numel() else 0, 1)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key_s.numel()) - first[key_s]
    idx = torch.zeros(L * n_tokens, kmax, dtype=torch.int64)
    acts = torch.zeros(L * n_tokens, kmax)
    idx[key_s, rank], acts[key_s, rank] = feat[order], act[order]
    return (x.view(L, n_tokens, -1), idx.view(L, n_tokens, kmax), acts.view(L, n_tokens, kmax))


class Stats:
    """The analysis statistics compared between truth and SAE, streamed over batches."""

    def __init__(self, n_layers: int, n_latents: int):
        self.dist = LayerDistribution(n_layers, n_latents)
        self.ptv = PerTokenLayerVariance(n_layers, n_latents)
        self.dyn = LayerDynamics(n_layers, n_latents)
        self.n_latents = n_latents
        self.active: list[tuple[Tensor, Tensor]] = []  # every active (id, act), weak firings
        self.vectors = 0

    def update(self, idx: Tensor, acts: Tensor) -> None:
        for st in (self.dist, self.ptv, self.dyn):
            st.update(idx, acts)
        on = acts > 0
        self.active.append((idx[on], acts[on].float()))
        self.vectors += acts[..., 0].numel()

    def compute(self) -> dict[str, float]:
        pt, dy = self.ptv.compute(), self.dyn.compute()
        agg = self.dist.aggregated_layer_var()
        ratio = agg / pt["per_token_var"] if pt["per_token_var"] > 0 else math.nan
        counts = self.dist.counts
        alive = counts.sum(0) > 0
        n_active = n_active_layers(counts)[alive]  # the threshold of `mlsae analyze`
        return {"aggregated_layer_var": agg, "per_token_layer_var": pt["per_token_var"],
                "aggregated_over_per_token_ratio": ratio,
                "persistence": dy["persistence"],
                "frac_pairs_contiguous": dy["frac_pairs_contiguous"],
                "mean_lifespan": dy["mean_lifespan"],
                "frac_pairs_single_layer": pt["frac_single_layer"],
                "frac_latents_multi_layer": (n_active >= 2).double().mean().item()
                if alive.any() else math.nan,
                "alive_latents": int(alive.sum()), "active_pairs": dy["active_pairs"],
                "l0": sum(len(a) for _, a in self.active) / max(self.vectors, 1),
                **weak_firings(torch.cat([i for i, _ in self.active]),
                               torch.cat([a for _, a in self.active]), self.n_latents)}


class Agreement:
    """Where a recovered direction's best-matching latent fires against where its feature
    truly is, per (token, layer): spurious firings (latent on, feature absent) and missed
    ones (feature present, latent off)."""

    def __init__(self, recovered: Tensor, row: Tensor):
        self.f_ids = recovered.nonzero().squeeze(1)  # [m] recovered features
        self.latents = row[self.f_ids]  # [m] their latents
        self.on = self.spurious = self.missed = self.true_on = 0
        self.rel: list[Tensor] = []
        self.sum = torch.zeros(len(self.f_ids), dtype=torch.float64)
        self.count = torch.zeros(len(self.f_ids), dtype=torch.float64)

    def update(self, tidx: Tensor, tacts: Tensor, code, n_features: int, n_latents: int
               ) -> None:
        truth = torch.zeros(*tidx.shape[:-1], n_features).scatter_add_(-1, tidx, tacts)
        a = code.dense(n_latents)[..., self.latents]  # [L, T, m]
        t = truth[..., self.f_ids] > 0
        on = a > 0
        self.on += int(on.sum())
        self.spurious += int((on & ~t).sum())
        self.missed += int((t & ~on).sum())
        self.true_on += int(t.sum())
        self.sum += a.sum((0, 1)).double()
        self.count += on.sum((0, 1)).double()
        self.rel.append(torch.stack([a[on & ~t], (on & ~t).nonzero()[:, 2].float()]))

    def compute(self) -> dict[str, float]:
        mean = (self.sum / self.count.clamp_min(1)).float()
        rel = torch.cat(self.rel, 1) if self.rel else torch.zeros(2, 0)
        ratio = rel[0] / mean[rel[1].long()].clamp_min(1e-12)
        nan = math.nan
        return {"recovered_latents": len(self.f_ids),
                "spurious_share": self.spurious / self.on if self.on else nan,
                "spurious_rel_median": ratio.median().item() if len(ratio) else nan,
                "spurious_rel_p90": ratio.quantile(0.9).item() if len(ratio) else nan,
                "missed_share": self.missed / self.true_on if self.true_on else nan}


def _spec_meta(spec: SynthSpec) -> str:
    return json.dumps(asdict(spec))


def write_synth(out: str | Path, spec: SynthSpec, shard_sequences: int = 64,
                store_dtype: str = "float32") -> Path:
    """Write the synthetic cache and truth.safetensors (module docstring) to ``out``."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise UserError(f"{str(out)!r} already holds an activation cache")
    if spec.ctx_len < 2 or spec.tokens < spec.ctx_len:
        raise UserError("synth: need --ctx-len >= 2 and --tokens >= --ctx-len")
    store = {"float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}.get(store_dtype)
    if store is None:
        raise UserError(f"--store-dtype {store_dtype!r}: use float32, float16 or bfloat16")
    truth = make_truth(spec)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(spec.seed + 1)
    n_seq = spec.tokens // spec.ctx_len
    stats = Stats(spec.n_layers, spec.n_features)
    shards = []
    for s0 in range(0, n_seq, shard_sequences):
        n = min(shard_sequences, n_seq - s0)
        x, idx, acts = sample(truth, spec, n * spec.ctx_len, g)
        stats.update(idx, acts)
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({"acts": x.to(store).contiguous(),
                   "seq_lens": torch.full((n,), spec.ctx_len, dtype=torch.long)},
                  str(out / name))
        shards.append({"file": name, "sequences": n, "tokens": n * spec.ctx_len})
    data = DataConfig(dataset=MODEL_NAME, ctx_len=spec.ctx_len, exclude_first=0,
                      exclude_special=False, holdout_fraction=0.0)
    tokens = n_seq * spec.ctx_len
    manifest = {"format_version": 1, "model": MODEL_NAME, "synthetic": asdict(spec),
                "layers": list(range(spec.n_layers)), "d_model": spec.d_model,
                "n_lm_layers": spec.n_layers, "store_dtype": store_dtype, "sequences": n_seq,
                "tokens": tokens, "included_tokens": tokens, "seed": spec.seed,
                "data": asdict(data), "hook_point": "resid_post", "exclude_first": 0,
                "exclude_special": False, "shards": shards}
    save_file(truth, str(out / TRUTH),
              metadata={"spec": _spec_meta(spec), "stats": json.dumps(stats.compute())})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def load_truth(path: str | Path) -> tuple[dict[str, Tensor], SynthSpec, dict]:
    """(truth tensors, the generator's spec, the true statistics over the cached tokens)."""
    p = Path(path) / TRUTH
    if not p.is_file():
        raise UserError(f"{str(path)!r}: not a synthetic cache (no {TRUTH}; make one with "
                        "`mlsae synth --out DIR`)")
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
        truth = {k: f.get_tensor(k) for k in f.keys()}
    return truth, SynthSpec(**json.loads(meta["spec"])), json.loads(meta["stats"])


@torch.no_grad()
def recovery(directions: Tensor, W_dec: Tensor, centre: bool) -> tuple[Tensor, Tensor]:
    """Per true direction, (best cosine with any decoder row [F], that row's id [F])."""
    d = directions.double()
    if centre:
        d = d - d.mean(1, keepdim=True)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = W_dec.double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best, row = (d @ w.T).max(1)
    return best, row


@torch.no_grad()
def synth_score(run: str | Path, cache: str | Path, tokens: int = 16_384, seed: int = 12345,
                batch_tokens: int = 4096, write: bool = True) -> dict:
    """Score a run trained on a synthetic cache (module docstring); writes RUN/synth_score.json
    when `write`. Returns the same dict."""
    truth, spec, cached_stats = load_truth(cache)
    sae = MLSAE.from_pretrained(run)
    if sae.d_model != spec.d_model:
        raise UserError(f"run d_model {sae.d_model} != synthetic d_model {spec.d_model}")
    best, row = recovery(truth["directions"], sae.W_dec, sae.standardize)
    matched = torch.zeros(sae.n_latents, dtype=torch.bool)
    matched[row[best > MATCH]] = True
    true_st = Stats(spec.n_layers, spec.n_features)
    sae_st, matched_st = Stats(spec.n_layers, sae.n_latents), Stats(spec.n_layers, sae.n_latents)
    agree = Agreement(best > MATCH, row)
    g = torch.Generator().manual_seed(seed)
    fvu_num = fvu_den = 0.0
    done = 0
    while done < tokens:
        n = min(batch_tokens, tokens - done)
        x, tidx, tacts = sample(truth, spec, n, g)
        true_st.update(tidx, tacts)
        code = sae.encode_layers(x)  # acts, idx [L, T, width]
        sae_st.update(code.idx, code.acts)
        matched_st.update(code.idx, code.acts * matched[code.idx])
        x_hat = sae.decode(code)
        fvu_num += (x_hat - x).pow(2).sum().item()
        fvu_den += (x - x.mean(1, keepdim=True)).pow(2).sum().item()
        agree.update(tidx, tacts, code, spec.n_features, sae.n_latents)
        done += n
    out = {
        "run": str(run), "cache": str(cache), "tokens": tokens, "seed": seed,
        "n_features": spec.n_features, "n_latents": sae.n_latents,
        "frac_recovered": (best > MATCH).double().mean().item(),
        "frac_above_0.7": (best > 0.7).double().mean().item(),
        "mean_best_cosine": best.mean().item(), "median_best_cosine": best.median().item(),
        "matched_latents": int(matched.sum()),
        "fvu": fvu_num / fvu_den if fvu_den > 0 else math.nan,
        "true": true_st.compute(), "sae": sae_st.compute(), "sae_matched": matched_st.compute(),
        "firing_agreement": agree.compute(),
        "true_on_cached_tokens": cached_stats,
        "best_cosine_hist": torch.histc(best.float(), bins=20, min=0, max=1).long().tolist(),
        "definitions": {
            "frac_recovered": f"share of true directions whose best decoder-row cosine > {MATCH}",
            "true": "statistics of the known codes on the held-out tokens",
            "sae": "the same statistics of the SAE's codes on the same tokens",
            "sae_matched": "the SAE's codes restricted to latents that are the best match "
                           f"(cosine > {MATCH}) of some true direction",
            "firing_agreement": "for each recovered direction and its best-matching latent, "
                                "per (token, layer): spurious_share = share of the latent's "
                                "firings where the true feature is absent, with their "
                                "activation / the latent's mean active activation (median, "
                                "p90); missed_share = share of the feature's true firings "
                                "where the latent is inactive",
        },
    }
    out = json_safe(out)
    if write:
        (Path(run) / "synth_score.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def format_score(res: dict) -> str:
    keys = ("aggregated_layer_var", "per_token_layer_var", "aggregated_over_per_token_ratio",
            "persistence", "frac_pairs_contiguous", "mean_lifespan", "frac_latents_multi_layer",
            "l0", "frac_weak_1pct", "frac_weak_5pct")

    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"recovered (best cosine > {MATCH}): {res['frac_recovered']:.3f} of "
             f"{res['n_features']} directions; mean best cosine {res['mean_best_cosine']:.3f}; "
             f"held-out FVU {res['fvu']:.4f}",
             f"  {'statistic':<34}{'true':>10}{'sae':>10}{'matched':>10}"]
    for k in keys:
        lines.append(f"  {k:<34}{fmt(res['true'][k]):>10}{fmt(res['sae'][k]):>10}"
                     f"{fmt(res['sae_matched'][k]):>10}")
    agree = res.get("firing_agreement") or {}
    if agree:
        lines.append("  recovered latents vs their features: " + ", ".join(
            f"{k} {fmt(v)}" for k, v in agree.items()))
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------------
def _cmd_synth(args: argparse.Namespace) -> int:
    spec = SynthSpec(**{f.name: getattr(args, f.name) for f in fields(SynthSpec)})
    out = write_synth(args.out, spec, args.shard_sequences, args.store_dtype)
    _, _, stats = load_truth(out)
    print(f"synthetic cache: {out} ({spec.tokens // spec.ctx_len * spec.ctx_len} tokens, "
          f"{spec.n_layers} layers, {spec.n_features} features in d={spec.d_model})")
    print("true statistics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                          f"{k} {v}" for k, v in stats.items()))
    print(f"train: mlsae train --activations {out} --eval-tokens 0 --out RUN; "
          f"score: mlsae synth-score RUN {out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    res = synth_score(args.run, args.cache, tokens=args.tokens, seed=args.seed)
    print(format_score(res))
    print(f"wrote {Path(args.run) / 'synth_score.json'}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae synth` and `mlsae synth-score` on the subparsers object `sub`."""
    p = sub.add_parser("synth", help="write a synthetic activation cache with known features",
                       description="Write an activation cache (the `mlsae cache` format) whose "
                       "vectors are sparse sums of known directions with a home layer, a span "
                       "of layers and per-token jitter, plus truth.safetensors. Train on it "
                       "with `mlsae train --activations DIR --eval-tokens 0`.")
    p.add_argument("--out", required=True, help="cache folder (must not hold a cache)")
    for f in fields(SynthSpec):
        kind = number(int) if f.name == "tokens" else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       help=f"{SPEC_HELP[f.name]} (default: {f.default})")
    p.add_argument("--shard-sequences", type=int, default=64,
                   help="sequences per shard file (default: 64)")
    p.add_argument("--store-dtype", default="float32",
                   help="float32, float16 or bfloat16 (default: float32)")
    p.set_defaults(func=_cmd_synth)

    s = sub.add_parser("synth-score", help="how well a run recovered a synthetic cache's "
                       "features", description="For each true direction the best cosine with "
                       "a decoder row, the fraction above 0.9, and the analysis statistics of "
                       "the SAE's codes against the known truth, on fresh held-out tokens. "
                       "Writes RUN/synth_score.json.")
    s.add_argument("run", help="run folder trained with --activations DIR")
    s.add_argument("cache", help="the synthetic cache folder (DIR)")
    s.add_argument("--tokens", type=int, default=16_384,
                   help="held-out tokens to draw (default: 16384)")
    s.add_argument("--seed", type=int, default=12345, help="held-out seed (default: 12345)")
    s.set_defaults(func=_cmd_score)

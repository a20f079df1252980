"""`mlsae analyze`: how a run's latents spread over layers (SPEC §5), over a token set and over
single prompts. The text is streamed once; statistics stream with bounded memory.
Uses the analysis statistics, codes, evaluate and plots.

Layer convention: statistics use layer POSITIONS 0..L-1 in the SAE's layer list (the summary's
`layers` maps them to LM blocks; they coincide when the SAE reads blocks 0..L-1). Variance over
layers is the population variance of the layer position under a distribution over layers
(`mlsae.analysis.layer_dist`): 0 for one layer, (L^2 - 1) / 12 for uniform.

Writes to `<run>/analysis/` (dataset) and `<run>/analysis/prompts/prompt-<sha1[:8]>/` (each
--prompt; same files plus prompt.json and top_latents.*):
  dists.safetensors   counts [layers, n_latents] int64 (tokens where latent f > 0 at layer l),
                      totals [layers, n_latents] float64 (sum of those activations);
                      metadata: layers (JSON list of blocks), included_tokens
  latents.csv         `#` comment line with the conventions and the active-layer threshold,
                      then latent,count,total,mean_layer,layer_std,entropy,n_active_layers,
                      entry_layer,exit_layer,lifespan,persistence,frac_contiguous
                      (one row per latent; empty float cells for latents that never fired)
  summary.json        the numbers of DEFINITIONS (plus histograms, options, seconds)
  heatmap.{png,pdf}          layers x latents, each latent normalised over layers, sorted by
                             mean layer (dataset: every alive latent; prompt: the 32 largest)
  layer_std_hist.{png,pdf}   per-latent layer std vs per-(token, latent) layer std
  n_active_layers.{png,pdf}  active layers per latent vs per active (token, latent) pair
  dynamics.{png,pdf}         entry / exit layer and lifespan of active (token, latent) pairs
  prompt.json (prompts)      text, tokens, included mask, top latents per token and layer
  top_latents.{png,pdf}      token x layer grid of the top latent (prompts)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlsae.activations.capture import outlier_tally
from mlsae.analysis.codes import RUN_HELP, RunCodes, analysis_dir, open_run, token_strings
from mlsae.analysis.dynamics import LayerDynamics
from mlsae.analysis.layer_dist import (
    DEFAULT_MIN_COUNT,
    DEFAULT_MIN_FRAC,
    LayerDistribution,
    heatmap_latents,
    layer_moments,
    std_histogram,
)
from mlsae.analysis.token_variance import PerTokenLayerVariance
from mlsae.errors import UserError
from mlsae.evaluate import outlier_line, shortfall_note
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions, add_text_options, text_options

PROMPT_TOP_LATENTS = 5  # per token and layer in prompt.json
PROMPT_HEATMAP_LATENTS = 32
ACTIVE_RULE = (f"layer l is active for latent f when counts[l, f] >= max({DEFAULT_MIN_COUNT}, "
               f"{DEFAULT_MIN_FRAC} * sum_l counts[l, f])")

# One line per summary.json number; the report prints these next to the values.
DEFINITIONS = {
    "tokens": "tokens streamed (packed positions, excluded ones included)",
    "included_tokens": "tokens analysed: first position(s) and special tokens excluded as in "
                       "training",
    "alive_latents": "latents active (> 0) at some layer at least once",
    "mean_layer_std": "mean over alive latents of the std over layers of p_f(l) = "
                      "totals[l, f] / sum_l totals[l, f]",
    "frac_latents_multi_layer": "share of alive latents active at 2 or more layers "
                                "(see active_threshold)",
    "per_token_layer_var": "mean over active (token, latent) pairs of the variance over layers "
                           "of q_tf(l) = a_l(t)_f / sum_l a_l(t)_f (active pairs only)",
    "aggregated_layer_var": "mean over alive latents of the variance over layers of p_f",
    "aggregated_over_per_token_ratio": "aggregated_layer_var / per_token_layer_var: how much "
                                       "wider a latent spreads over layers across tokens than "
                                       "within one token",
    "per_token_layer_std_mean": "mean over active (token, latent) pairs of the std over layers "
                                "of q_tf",
    "frac_pairs_single_layer": "share of active (token, latent) pairs active at exactly one "
                               "layer",
    "active_pairs": "number of active (token, latent) pairs",
    "persistence": "pooled P(latent active at layer position i+1 | active at i) over active "
                   "(token, latent) pairs and i < L-1",
    "frac_pairs_contiguous": "share of active (token, latent) pairs whose active layers form "
                             "one contiguous run",
    "mean_entry_layer": "mean over active (token, latent) pairs of the first active layer "
                        "position",
    "mean_exit_layer": "mean over active (token, latent) pairs of the last active layer position",
    "mean_lifespan": "mean over active (token, latent) pairs of exit - entry + 1 (layers)",
}
DYNAMICS_KEYS = ("persistence", "frac_pairs_contiguous", "mean_entry_layer", "mean_exit_layer",
                 "mean_lifespan")
LATENT_DYNAMICS = ("entry_layer", "exit_layer", "lifespan", "persistence", "frac_contiguous")
SEED_DOC = ("Seed paper code (tim-lawson/mlsae analysis/variances.py): q_tf = 0 for inactive "
            "pairs and distributions averaged over ALL tokens and latents, which adds a "
            "squared-mean term. exp_var_l_tf / exp_var_l_f / rel_var_t (= tf / f) are means "
            "over batches of --batch-size sequences as in that code; *_global are the same over "
            "all tokens at once; aggregated_over_per_token_ratio = var_f_global / "
            "var_tf_global.")


# ---- numbers ---------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def empty_stats(codes: RunCodes
                ) -> tuple[LayerDistribution, PerTokenLayerVariance, LayerDynamics]:
    dev, n_layers, n_latents = codes.stats_device, codes.n_layers, codes.sae.n_latents
    return (LayerDistribution(n_layers, n_latents, device=dev),
            PerTokenLayerVariance(n_layers, n_latents, device=dev),
            LayerDynamics(n_layers, n_latents, device=dev))


def collect(codes: RunCodes, batch_list: list[torch.Tensor], progress: bool = True
            ) -> tuple[LayerDistribution, PerTokenLayerVariance, LayerDynamics]:
    """Stream batches once into a layer distribution, the per-token layer variance and the
    layer dynamics."""
    stats = empty_stats(codes)
    for _, _, acts, idx, mask in codes.stream(batch_list, "analyze", progress):
        for st in stats:
            st.update(idx, acts, mask)
    return stats


def per_latent(dist: LayerDistribution) -> dict[str, torch.Tensor]:
    """Per-latent stats [n_latents] each, with the stated active-layer threshold."""
    return dist.per_latent(DEFAULT_MIN_COUNT, DEFAULT_MIN_FRAC)


def distribution_summary(dist: LayerDistribution, ptv: PerTokenLayerVariance,
                         per: dict[str, torch.Tensor], dyn: LayerDynamics | None = None) -> dict:
    """The summary.json numbers of one token set (see DEFINITIONS); `per` = per_latent(dist)."""
    alive = per["count"] > 0
    pt = ptv.compute()
    agg = dist.aggregated_layer_var()
    n_alive = int(alive.sum())
    seed_tf, seed_f = pt["seed_var_tf_global"], pt["seed_var_f_global"]
    latent_std_hist = std_histogram(per["layer_std"], dist.n_layers, ptv.n_bins)[0]
    n_active = per["n_active_layers"][alive].cpu()
    out = {
        "included_tokens": dist.n_tokens,
        "n_latents": dist.n_latents,
        "alive_latents": n_alive,
        "mean_layer_std": per["layer_std"][alive].mean().item() if n_alive else math.nan,
        "frac_latents_multi_layer": (n_active >= 2).double().mean().item() if n_alive
        else math.nan,
        "per_token_layer_var": pt["per_token_var"],
        "aggregated_layer_var": agg,
        "aggregated_over_per_token_ratio": _ratio(agg, pt["per_token_var"]),
        "per_token_layer_std_mean": pt["per_token_std_mean"],
        "frac_pairs_single_layer": pt["frac_single_layer"],
        "active_pairs": pt["n_pairs"],
        "active_threshold": {"min_count": DEFAULT_MIN_COUNT, "min_frac": DEFAULT_MIN_FRAC,
                             "rule": ACTIVE_RULE},
        "seed_code_variant": {
            "exp_var_l_tf": pt["seed_var_tf"], "exp_var_l_f": pt["seed_var_f"],
            "rel_var_t": pt["seed_ratio"], "var_tf_global": seed_tf, "var_f_global": seed_f,
            "aggregated_over_per_token_ratio": _ratio(seed_f, seed_tf), "description": SEED_DOC,
        },
        "histograms": {
            "std_edges": pt["std_edges"].tolist(),
            "latent_layer_std": latent_std_hist.tolist(),
            "pair_layer_std": pt["std_hist"].tolist(),
            "latent_n_active_layers": torch.bincount(n_active, minlength=dist.n_layers + 1)
            .tolist(),
            "pair_n_layers": pt["n_layers_hist"].tolist(),
        },
        "definitions": DEFINITIONS,
    }
    if dyn is not None:
        d = dyn.compute()
        out.update({key: d[key] for key in DYNAMICS_KEYS})
        out["histograms"].update(entry_layer=d["entry_layer_hist"],
                                 exit_layer=d["exit_layer_hist"], lifespan=d["lifespan_hist"])
    return json_safe(out)


def json_safe(obj):
    """NaN / inf -> null, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


# ---- files -----------------------------------------------------------------------------------
def _cell(v: float) -> str:
    return "" if math.isnan(v) else f"{v + 0.0:.6g}"  # + 0.0 turns -0.0 (0 log 0) into 0


def write_latents_csv(path: Path, per: dict[str, torch.Tensor], layers: Sequence[int]) -> None:
    per = {k: v.cpu().tolist() for k, v in per.items()}
    with path.open("w", newline="") as f:
        f.write(f"# layer = position 0..{len(layers) - 1} in the SAE's layers {list(layers)}; "
                f"entropy = H(p_f) / log L; {ACTIVE_RULE}; float cells empty for latents "
                "that never fired\n")
        w = csv.writer(f)
        dyn = [k for k in LATENT_DYNAMICS if k in per]  # per-latent dynamics, when computed
        w.writerow(["latent", "count", "total", "mean_layer", "layer_std", "entropy",
                    "n_active_layers", *dyn])
        for i in range(len(per["count"])):
            w.writerow([i, per["count"][i], _cell(per["total"][i]), _cell(per["layer_mean"][i]),
                        _cell(per["layer_std"][i]), _cell(per["entropy"][i]),
                        per["n_active_layers"][i], *(_cell(per[k][i]) for k in dyn)])


def write_figures(out: Path, dist: LayerDistribution, summary: dict, layers: Sequence[int],
                  what: str, heatmap_top: int | None) -> None:
    """heatmap, layer_std_hist and n_active_layers (PNG + PDF) of one token set."""
    from mlsae.plots import analysis as plots  # matplotlib loads only to draw

    totals = dist.totals.cpu()
    if heatmap_top is None:  # every alive latent, sorted by mean layer
        alive = (totals.sum(0) > 0).nonzero().squeeze(1)
        p = dist.probs().cpu()[:, alive]
        p = p[:, layer_moments(p)[0].argsort(stable=True)]
        ids = None
    else:
        ids, p = heatmap_latents(totals, heatmap_top)
        ids = ids.tolist()
    plots.layer_heatmap_figure(p.numpy(), layers, out / "heatmap",
                               f"Layer distribution of latents ({what})", ids)
    h = summary["histograms"]
    plots.std_hist_figure(np.array(h["std_edges"]), np.array(h["latent_layer_std"]),
                          np.array(h["pair_layer_std"]), out / "layer_std_hist", what)
    plots.n_active_figure(np.array(h["latent_n_active_layers"]), np.array(h["pair_n_layers"]),
                          out / "n_active_layers", what)
    if "lifespan" in h:
        plots.dynamics_figure(np.array(h["entry_layer"]), np.array(h["exit_layer"]),
                              np.array(h["lifespan"]), layers, out / "dynamics",
                              summary.get("persistence"), summary.get("frac_pairs_contiguous"))


def write_distribution(out: Path, dist: LayerDistribution, ptv: PerTokenLayerVariance,
                       layers: Sequence[int], extra: dict, what: str,
                       heatmap_top: int | None = None, dyn: LayerDynamics | None = None) -> dict:
    """dists.safetensors, latents.csv, figures and summary.json of one token set."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in dist.state_dict().items()},
              str(out / "dists.safetensors"),
              metadata={"layers": json.dumps(list(layers)),
                        "included_tokens": str(dist.n_tokens)})
    per = per_latent(dist)
    if dyn is not None:
        dper = dyn.per_latent()
        per.update({k: dper[k] for k in LATENT_DYNAMICS})
    write_latents_csv(out / "latents.csv", per, layers)
    summary = dict(extra, layers=list(layers), **distribution_summary(dist, ptv, per, dyn))
    write_figures(out, dist, summary, layers, what, heatmap_top)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_dists(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """counts, totals [layers, n_latents] and the layers (LM blocks) of a dists.safetensors."""
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
        return f.get_tensor("counts"), f.get_tensor("totals"), layers


# ---- prompts ---------------------------------------------------------------------------------
def prompt_ids(lm: LanguageModel, text: str) -> torch.Tensor:
    """`[1, 1 + T]`: EOS then the prompt's tokens, as a document starts in the packed training
    text (documents are joined with EOS); the EOS is excluded like position 0 in training."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("--prompt: the prompt is empty")
    return torch.tensor([[lm.eos_id, *ids]], dtype=torch.long)


def top_latents_per_token(acts: torch.Tensor, idx: torch.Tensor, n: int
                          ) -> tuple[list[list[list[list]]], np.ndarray, np.ndarray]:
    """acts, idx [layer, token, k] -> ([token][layer] = [[latent, act], ...] best first, up to
    n active), and the top latent / its activation as [layer, token] arrays (-1 / 0: none)."""
    vals, order = acts.sort(-1, descending=True)
    ids = idx.gather(-1, order)
    vals, ids = vals[..., :n].cpu(), ids[..., :n].cpu()  # [layer, token, n]
    per_token = [[[[int(i), round(float(a), 5)] for i, a in zip(ids[layer, t], vals[layer, t])
                   if a > 0] for layer in range(ids.shape[0])] for t in range(ids.shape[1])]
    top1 = torch.where(vals[..., 0] > 0, ids[..., 0], -1)
    return per_token, top1.numpy(), vals[..., 0].numpy()


def analyze_prompt(codes: RunCodes, text: str, root: Path) -> dict:
    """Distributions, heatmap and per-token top latents of one prompt in `root/prompt-<id>/`."""
    from mlsae.plots import analysis as plots  # matplotlib loads only to draw

    ids = prompt_ids(codes.lm, text)
    acts, idx, mask = codes.encode(ids)  # [layer, 1, T, k], mask [1, T]
    dist, ptv, dyn = empty_stats(codes)
    for st in (dist, ptv, dyn):
        st.update(idx, acts, mask)
    if dist.n_tokens == 0:
        raise UserError(f"--prompt {text!r}: every position is excluded (special tokens / "
                        "exclude_first)")
    out = root / f"prompt-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    summary = write_distribution(out, dist, ptv, codes.layers,
                                 {"prompt": text, "tokens": ids.shape[1],
                                  "architecture": codes.sae.architecture,
                                  "active_rule": codes.sae.arch.active_rule(codes.sae, True)},
                                 "prompt",
                                 PROMPT_HEATMAP_LATENTS, dyn)
    strings = token_strings(codes.lm.tokenizer, ids[0].tolist())
    per_token, top1, top1_acts = top_latents_per_token(acts[:, 0], idx[:, 0],
                                                       PROMPT_TOP_LATENTS)
    (out / "prompt.json").write_text(json.dumps({
        "text": text, "token_ids": ids[0].tolist(), "tokens": strings,
        "included": mask[0].tolist(), "layers": codes.layers,
        "top_latents": per_token,
        "top_latents_doc": f"top_latents[token][layer position] = up to {PROMPT_TOP_LATENTS}"
                           " [latent, activation] pairs, largest first (empty: excluded "
                           "position or nothing active)",
    }, indent=1) + "\n")
    plots.top_latents_figure(strings, top1, top1_acts, codes.layers, out / "top_latents")
    return {"text": text, "out": str(out), "summary": summary}


# ---- the command -----------------------------------------------------------------------------
def analyze_dataset(codes: RunCodes, out: Path, progress: bool, t0: float) -> dict:
    """Stream the run's held-out (or --dataset) text once; write and return its summary."""
    batch_list, tokens = codes.text()
    with outlier_tally() as tally:
        dist, ptv, dyn = collect(codes, batch_list, progress)
    if dist.n_tokens == 0:
        raise UserError("every position of the text is excluded (special tokens / "
                        "exclude_first)")
    cfg, opts = codes.data_cfg, codes.opts
    extra = {"tokens": tokens, "dataset": cfg.eval_dataset or f"{cfg.dataset} (held-out split)",
             "architecture": codes.sae.architecture,
             "active_rule": codes.sae.arch.active_rule(codes.sae, per_token=True),
             "ctx_len": cfg.ctx_len, "outliers": tally.result(codes.layers),
             "options": {k: v for k, v in asdict(opts).items() if k != "device"}}
    note = shortfall_note(opts, cfg.ctx_len, tokens)
    if note:
        extra["note"] = note
        print(f"note: {note}", file=sys.stderr)
    extra["seconds"] = round(time.perf_counter() - t0, 2)  # load + stream
    return write_distribution(out, dist, ptv, codes.layers, extra, "dataset", dyn=dyn)


def analyze(run: str | Path, opts: TextOptions, prompts: Sequence[str] = (),
            lm: LanguageModel | None = None, progress: bool = True,
            dataset: bool = True) -> dict:
    """Analyse a run over its held-out (or --dataset) text and over each prompt.

    Returns {"out": analysis folder, "summary": dataset summary (None when `dataset` is
    False), "prompts": [{"text", "out", "summary"}]}. See the module docstring for the files.
    """
    t0 = time.perf_counter()
    if not dataset and not prompts:
        raise UserError("--prompts-only needs at least one --prompt")
    codes = open_run(run, opts, lm)
    out = analysis_dir(codes.run_dir)
    summary = analyze_dataset(codes, out, progress, t0) if dataset else None
    done = [analyze_prompt(codes, text, out / "prompts") for text in prompts]
    return {"out": str(out), "summary": summary, "prompts": done}


HEADLINE = ("included_tokens", "alive_latents", "mean_layer_std", "frac_latents_multi_layer",
            "per_token_layer_var", "aggregated_layer_var", "aggregated_over_per_token_ratio",
            "persistence", "frac_pairs_contiguous")


def format_summary(summary: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    return "\n".join(f"  {key:<32} {fmt(summary.get(key))}" for key in HEADLINE)


def _cmd_analyze(args: argparse.Namespace) -> int:
    res = analyze(args.run, text_options(args), prompts=args.prompt,
                  dataset=not args.prompts_only)
    if res["summary"] is not None:
        print(f"dataset ({res['summary']['tokens']} tokens):")
        print(format_summary(res["summary"]))
        print("  " + outlier_line(res["summary"]["outliers"]))
    for p in res["prompts"]:
        print(f"prompt {p['text']!r} -> {p['out']}")
        print(format_summary(p["summary"]))
    print(f"wrote {res['out']}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae analyze` on the subparsers object `sub`."""
    p = sub.add_parser(
        "analyze", help="layer distributions of the latents over text and prompts",
        description="Stream the run's held-out text (or --dataset) once and write per-latent "
        "layer distributions, the aggregated vs per-token layer variance and figures to "
        "<run>/analysis/; each --prompt gets the same in <run>/analysis/prompts/.")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--prompt", action="append", default=[],
                   help="also analyse this text alone (repeatable)")
    p.add_argument("--prompts-only", action="store_true",
                   help="analyse only the --prompt texts; leave the dataset files as they are")
    add_text_options(p)
    p.set_defaults(func=_cmd_analyze)

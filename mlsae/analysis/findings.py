"""The MLSAE paper's findings, with this run's numbers (issue 14 item 6), and runs side by side
(e.g. with and without a tuned lens). Reads only files that the other commands write:
summary.json (held-out after training), eval.json (`mlsae eval`, incl. `replacement` when
present), analysis/summary.json (`mlsae analyze`), resid_sim.json (`mlsae resid-sim`), and the
run's config.json. Plain data out (rows and sentences); `mlsae report` renders them.
"""

from __future__ import annotations

import json
from pathlib import Path

# (row label, where, key path, meaning) of the side-by-side table
COMPARE_ROWS = (
    ("held-out FVU", "summary", ("mean", "fvu"), "mean over layers, after training"),
    ("eval FVU", "eval", ("mean", "fvu"), "mlsae eval, mean over layers"),
    ("dCE (nats)", "eval", ("mean", "dce"), "mlsae eval, mean over layers"),
    ("aggregated layer var", "analysis", ("aggregated_layer_var",), "mean over latents of "
     "Var_l(p_f)"),
    ("per-token layer var", "analysis", ("per_token_layer_var",), "mean over active "
     "(token, latent) pairs of Var_l(q_tf)"),
    ("ratio (active pairs)", "analysis", ("aggregated_over_per_token_ratio",), "aggregated / "
     "per-token, this project's convention"),
    ("ratio (seed code, global)", "analysis", ("seed_code_variant",
                                               "aggregated_over_per_token_ratio"),
     "the seed paper's convention (inactive pairs as zeros), over all tokens"),
    ("ratio (seed code, per batch)", "analysis", ("seed_code_variant", "rel_var_t"),
     "seed code's rel_var_t inverted: exp_var_l_f / exp_var_l_tf per batch"),
    ("multi-layer latents", "analysis", ("frac_latents_multi_layer",), "share of alive latents "
     "active at 2+ layers"),
    ("persistence", "analysis", ("persistence",), "P(active at i+1 | active at i), per token"),
    ("contiguous pairs", "analysis", ("frac_pairs_contiguous",), "share of active pairs whose "
     "active layers are one run"),
)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _get(d: dict | None, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def run_files(run: Path) -> dict[str, dict | None]:
    return {"config": _read(run / "config.json"), "summary": _read(run / "summary.json"),
            "eval": _read(run / "eval.json"), "analysis": _read(run / "analysis" / "summary.json")}


def run_label(run: Path, cfg: dict | None) -> str:
    lens = _get(cfg, ("run", "train", "lens"))
    return f"{run.name} ({'tuned lens' if lens else 'no lens'})"


def comparison(runs: list[Path]) -> tuple[list[str], list[list]]:
    """Header and rows of the side-by-side table (one column per run)."""
    files = [run_files(r) for r in runs]
    header = ["number", *(run_label(r, f["config"]) for r, f in zip(runs, files)), "meaning"]
    rows = []
    for label, where, keys, meaning in COMPARE_ROWS:
        vals = [_get(f[where], keys) for f in files]
        if where == "analysis" and keys[-1] == "rel_var_t":  # seed reports tf / f: invert
            vals = [1 / v if isinstance(v, (int, float)) and v else None for v in vals]
        if any(v is not None for v in vals):
            rows.append([label, *vals, meaning])
    return header, rows


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def findings(run: Path, others: list[Path] = (), resid_sim_dir: Path | None = None
             ) -> list[str]:
    """One sentence per finding of the paper, with this run's numbers where they exist."""
    f = run_files(run)
    a = f["analysis"] or {}
    out = []
    if a:
        seed = a.get("seed_code_variant") or {}
        out.append(
            "Aggregated vs single-token layer variance (paper: about two orders of magnitude "
            f"larger aggregated): aggregated {_f(a.get('aggregated_layer_var'))} vs per-token "
            f"{_f(a.get('per_token_layer_var'))} over active (token, latent) pairs, ratio "
            f"{_f(a.get('aggregated_over_per_token_ratio'))}; in the seed code's convention "
            f"(inactive pairs as zeros) {_f(seed.get('aggregated_over_per_token_ratio'))} over "
            "all tokens. The seed convention counts inactive pairs as zeros: that shrinks the "
            "per-token term by the share of active pairs and adds a squared-mean term to the "
            "aggregated one, so the two ratios are not comparable; ours averages over active "
            "pairs only.")
        out.append(
            f"Multi-layer latents over a dataset: {_f(a.get('frac_latents_multi_layer'))} of "
            f"{a.get('alive_latents')} alive latents are active at 2+ layers, while per token "
            f"{_f(a.get('frac_pairs_single_layer'))} of active pairs are at one layer only "
            f"(persistence {_f(a.get('persistence'))}, contiguous "
            f"{_f(a.get('frac_pairs_contiguous'))}).")
    else:
        out.append(f"Layer-variance findings: run `mlsae analyze {run}` first.")
    rs = _read((resid_sim_dir or run / "analysis") / "resid_sim.json")
    if rs and rs.get("models"):
        means = ", ".join(f"{m} {_f(r.get('mean'))} ({r.get('n_layers')} layers)"
                          for m, r in rs["models"].items())
        out.append(
            f"Adjacent-layer residual similarity (mean cosine over pairs): {means}. The paper's "
            "claim is about size within one family (Pythia 70M..1B): larger models have more "
            "similar adjacent layers and more multi-layer latents. Models of different families "
            "(tokenizer, data, width, depth, norms) confound size with everything else, so a "
            "difference between them does not test that claim; it only shows how similar "
            "adjacent layers are in each model.")
    for other in others:
        o = run_files(other)
        oa = o["analysis"] or {}
        if oa and a:
            out.append(
                f"Lens comparison, {run_label(run, f['config'])} vs "
                f"{run_label(other, o['config'])}: ratio "
                f"{_f(a.get('aggregated_over_per_token_ratio'))} "
                f"vs {_f(oa.get('aggregated_over_per_token_ratio'))}, multi-layer "
                f"{_f(a.get('frac_latents_multi_layer'))} vs "
                f"{_f(oa.get('frac_latents_multi_layer'))}, held-out FVU "
                f"{_f(_get(f['summary'], ('mean', 'fvu')))} vs "
                f"{_f(_get(o['summary'], ('mean', 'fvu')))} (paper: qualitatively the same with "
                "a tuned lens).")
    rep = _get(f["eval"], ("replacement",))
    if isinstance(rep, dict):
        out.append(
            f"Replacing every chosen layer at once (free-running): CE {_f(rep.get('ce_clean'))} "
            f"-> {_f(rep.get('ce_replaced'))} nats (dCE {_f(rep.get('dce'))}); errors compound "
            "through depth, which no single-layer dCE shows.")
    return out

"""`mlsae report RUN`: one self-contained HTML page of everything known about a run.
Uses the other analysis modules' outputs and plots.

Writes `<run>/report/` (or --out): `index.html` and the PNG images it shows, nothing else; the
page has inline CSS, no script and no external resource, so the folder opens from disk (or
can be moved) anywhere. Sections appear when their inputs exist; a missing one says which
command adds it:
  config         <run>/config.json
  training       <run>/metrics.jsonl (curves), <run>/summary.json (held-out after training)
  evaluation     <run>/eval.json (`mlsae eval`)
  replacement    <run>/eval.json `replacement` (`mlsae eval --replace all`) and the single-layer
                 baselines' curve from <run>/compare_replacement.json (`mlsae compare`)
  layer spread   <run>/analysis/summary.json and figures (`mlsae analyze`)
  prompts        <run>/analysis/prompts/*/ (`mlsae analyze --prompt`)
  resid-sim      resid_sim.{png,json} in --resid-sim DIR, default <run>/analysis
                 (`mlsae resid-sim ... --out <run>/analysis`)
  latents        <run>/analysis/dists.safetensors, examples from <run>/analysis/examples.sqlite
                 (`mlsae examples`)
  matched L0     pareto.png / pareto.json of `mlsae pareto` in the run's parent folder (a run
                 of the grid) or in the run folder itself

Latents shown: among alive latents firing at least as often as the median alive latent (so a
handful of firings cannot look "single-layer"), the --latents most multi-layer (most active
layers, then highest layer entropy) and the --latents most single-layer (lowest layer std,
then most firings). Each: its layer distribution and its top examples at its peak layer.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mlsae.analysis.analyze import DEFINITIONS, SEED_DOC, load_dists
from mlsae.analysis.codes import RUN_HELP, require_run_dir
from mlsae.analysis.examples import DB_NAME, show_examples
from mlsae.analysis.features import feature_html
from mlsae.analysis.findings import comparison, findings
from mlsae.analysis.layer_dist import layer_entropy, layer_moments, layer_probs, n_active_layers
from mlsae.errors import UserError

EXAMPLES_SHOWN = 5
FIGURES = {  # analysis figure stem -> one-line explanation
    "heatmap": "Each column is one latent's share of its total activation at each layer "
               "(columns sum to 1), latents sorted by mean layer.",
    "layer_std_hist": "Std over layers of a latent's activation: per latent over the whole "
                      "token set vs per (token, latent) pair; single tokens sit near 0.",
    "n_active_layers": "Number of layers a latent is active at: per latent over the token set "
                       "(active threshold below) vs per active (token, latent) pair.",
    "dynamics": "Per active (token, latent) pair: the first (entry) and last (exit) layer where "
                "the latent is active, and the lifespan exit - entry + 1 (log scale).",
    "top_latents": "For each token (x) and layer (y): the latent with the largest activation "
                   "(its id) and that activation (colour).",
}
EVAL_COLUMNS = {  # eval.json per_layer key -> (header, explanation)
    "fvu": ("FVU", "fraction of variance unexplained by the reconstruction"),
    "mse": ("MSE", "mean squared reconstruction error per vector component"),
    "l0": ("L0", "mean number of active latents per vector"),
    "alive": ("alive", "latents active at least once at this layer"),
    "ce_clean": ("CE clean", "next-token cross-entropy of the unmodified model (nats)"),
    "ce_recon": ("CE recon", "cross-entropy with this layer replaced by its reconstruction"),
    "ce_zero": ("CE ablated", "cross-entropy with this layer ablated (see eval.json 'ablation')"),
    "dce": ("dCE", "CE recon - CE clean: the downstream cost of the reconstruction"),
    "ce_recovered": ("CE recovered", "(CE ablated - CE recon) / (CE ablated - CE clean)"),
    "kl": ("KL", "mean KL(clean || reconstructed) of the next-token distributions"),
}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1150px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
td.l,th.l{text-align:left}th{background:#f2f2f2}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
figcaption,.note{color:#555;font-size:.9em}.missing{color:#a33}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}
.latent{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap}
.ex span{border-radius:2px}.ex b{outline:2px solid #c00}
.row{display:flex;gap:1.2em;align-items:flex-start}.row img{max-width:420px}
.row>div{flex:1 1 0;min-width:0}
"""


# ---- small HTML pieces ----------------------------------------------------------------------
def esc(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence], left: Sequence[int] = (0,)) -> str:
    """An escaped HTML table; columns `left` are left-aligned text, the others numbers."""
    def cell(tag: str, i: int, v) -> str:
        cls = ' class="l"' if i in left else ""
        return f"<{tag}{cls}>{fmt(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def missing(what: str, command: str) -> str:
    return f'<p class="missing">No {esc(what)}: run <code>{esc(command)}</code> to add it.</p>'


def figure(out: Path, src: Path, name: str, caption: str) -> str:
    """Copy image `src` into the report folder as `name`; an <img> with its caption."""
    shutil.copyfile(src, out / name)
    return (f'<figure><img src="{esc(name)}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{str(path)!r} is not valid JSON ({e})") from None


# ---- sections -------------------------------------------------------------------------------
def config_section(run: Path, cfg: dict) -> str:
    keys = ("model", "layers", "hook_point", "d_model", "n_latents", "k", "expansion_factor",
            "standardize", "exclude_first", "exclude_special", "lr", "auxk", "source_format",
            "converted_from")
    rows = [(k, json.dumps(cfg[k]) if isinstance(cfg[k], list) else cfg[k])
            for k in keys if k in cfg]
    run_cfg = cfg.get("run", {})
    data, train = run_cfg.get("data", {}), run_cfg.get("train", {})
    rows += [(f"data.{k}", data[k]) for k in ("dataset", "eval_dataset", "ctx_len",
                                              "holdout_fraction", "prepend_bos",
                                              "exclude_outliers") if k in data]
    rows += [(f"train.{k}", train[k]) for k in ("tokens", "dtype", "revision", "lens")
             if k in train]
    return ("<h2>Configuration</h2>" + table(["setting", "value"], rows, left=(0, 1))
            + f"<details><summary>config.json</summary><pre>{esc(json.dumps(cfg, indent=2))}"
            "</pre></details>")


def training_section(run: Path, out: Path) -> str:
    from mlsae.plots import analysis as plots  # matplotlib loads only to draw

    parts = ["<h2>Training</h2>"]
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()
            if line.strip()] if path.is_file() else []
    if rows:
        plots.training_curves_figure(rows, out / "training")
        parts.append('<figure><img src="training.png" alt="training curves"><figcaption>'
                     "Training loss (FVU + AuxK), FVU and L0 averaged over layers, and the "
                     "fraction of dead latents, against training tokens (metrics.jsonl)."
                     "</figcaption></figure>")
    else:
        parts.append('<p class="missing">No metrics.jsonl in the run folder.</p>')
    summary = _read_json(run / "summary.json")
    if summary:
        m = summary["mean"]
        parts.append(f'<p>Held-out after training ({summary["tokens"]} tokens): mean FVU '
                     f'{fmt(m.get("fvu"))}, mean L0 {fmt(m.get("l0"))}, dead fraction '
                     f'{fmt(summary.get("dead_fraction"))}.</p>')
    return "".join(parts)


def replacement_section(run: Path, out: Path) -> str:
    """The multi-layer replacement: totals, the curve, and the baselines' curve beside it."""
    from mlsae.plots.eval import replacement_figure

    head = "<h2>Multi-layer replacement</h2>"
    own = (_read_json(run / "eval.json") or {}).get("replacement")
    cmp = _read_json(run / "compare_replacement.json")
    if own is None and cmp is None:  # optional: a hint, not a missing input
        return head + (f"<p class=note>Not computed: run <code>mlsae eval {esc(run)} "
                       "--replace all</code> to add it.</p>")
    curves = {}
    if own is not None:
        curves["MLSAE"] = own
    if cmp is not None:
        if own is None or cmp["mlsae"]["layers"] != own["layers"]:
            curves["MLSAE (baseline layers)"] = cmp["mlsae"]
        curves["single-layer SAEs"] = cmp["baseline"]
    parts = [head, "<p class=note>Every chosen layer's resid_post replaced by its "
             "reconstruction at once, free-running: each SAE encodes what the already-replaced "
             "layers below produced. The curve replaces only the first n chosen layers (depth "
             "order). Single-layer SAEs: each layer replaced by its own SAE, the same way.</p>"]
    rows = [[label, ",".join(map(str, rep["layers"])), rep["ce_clean"], rep["ce_replaced"],
             rep["dce"], rep["kl"]] for label, rep in curves.items()]
    parts.append(table(["SAE", "layers", "CE clean", "CE replaced", "dCE", "KL"], rows,
                       left=(0, 1)))
    if cmp is None:
        parts.append(f"<p class=note>No single-layer curve: run <code>mlsae baselines {esc(run)}"
                     f"</code> and <code>mlsae compare {esc(run)} {esc(run)}/baselines</code> "
                     "to add it.</p>")
    replacement_figure(curves, out / "replacement.png")
    parts.append('<figure><img src="replacement.png" alt="replacement curve"><figcaption>'
                 "dCE and KL after replacing every chosen layer up to the one on the x axis."
                 "</figcaption></figure>")
    return "".join(parts)


def eval_section(run: Path) -> str:
    res = _read_json(run / "eval.json")
    if res is None:
        return "<h2>Evaluation</h2>" + missing("evaluation", f"mlsae eval {run}")
    pl, mean = res["per_layer"], res.get("mean", {})
    cols = [c for c in EVAL_COLUMNS if c in pl]
    rows = [[layer] + [pl[c][i] for c in cols] for i, layer in enumerate(res["layers"])]
    rows.append(["mean"] + [mean.get(c) if c != "alive" else None for c in cols])
    legend = "".join(f"<li><b>{esc(EVAL_COLUMNS[c][0])}</b>: {esc(EVAL_COLUMNS[c][1])}</li>"
                     for c in cols)
    return (f"<h2>Evaluation</h2><p class=note>{esc(res.get('tokens', '?'))} tokens of "
            f"{esc(res.get('dataset', '?'))}; ablation {esc(res.get('ablation', '?'))}.</p>"
            + table(["layer"] + [EVAL_COLUMNS[c][0] for c in cols], rows)
            + f"<ul class=note>{legend}</ul>")


def numbers_table(summary: dict) -> str:
    rows = [(key, summary.get(key), text) for key, text in DEFINITIONS.items()
            if key in summary]
    thr = summary.get("active_threshold")
    if thr:
        rows.append(("active_threshold", f"min_count {thr['min_count']}, min_frac "
                     f"{thr['min_frac']}", thr["rule"]))
    seed = summary.get("seed_code_variant", {})
    rows += [(f"seed_code_variant.{k}", v, "seed paper code's convention (see below)")
             for k, v in seed.items() if k != "description"]
    return (table(["number", "value", "meaning"], rows, left=(0, 2))
            + f"<p class=note>{esc(SEED_DOC)}</p>")


def analysis_figures(out: Path, folder: Path, prefix: str) -> str:
    return "".join(figure(out, folder / f"{stem}.png", f"{prefix}{stem}.png", caption)
                   for stem, caption in FIGURES.items() if (folder / f"{stem}.png").is_file())


def analysis_section(run: Path, out: Path) -> str:
    folder = run / "analysis"
    summary = _read_json(folder / "summary.json")
    head = "<h2>Layer spread of latents</h2>"
    if summary is None:
        return head + missing("analysis", f"mlsae analyze {run}")
    return (head + f"<p class=note>{esc(summary.get('tokens'))} tokens of "
            f"{esc(summary.get('dataset'))}; layers {esc(summary['layers'])}. Layer statistics "
            "use layer positions 0..L-1 in this list.</p>"
            + numbers_table(summary) + analysis_figures(out, folder, "analysis_"))


def prompts_section(run: Path, out: Path) -> str:
    folders = sorted(p for p in (run / "analysis" / "prompts").glob("prompt-*")
                     if (p / "prompt.json").is_file())
    if not folders:
        return ""
    parts = ["<h2>Prompts</h2>"]
    keys = ("mean_layer_std", "per_token_layer_var", "aggregated_layer_var",
            "aggregated_over_per_token_ratio", "frac_latents_multi_layer")
    for folder in folders:
        text = json.loads((folder / "prompt.json").read_text())["text"]
        summary = _read_json(folder / "summary.json") or {}
        parts.append(f"<h3>{esc(text)}</h3>"
                     + table(["number", "value", "meaning"],
                             [(k, summary.get(k), DEFINITIONS[k]) for k in keys], left=(0, 2))
                     + analysis_figures(out, folder, f"{folder.name}_"))
    return "".join(parts)


def findings_section(run: Path, compare: Sequence[Path], resid_sim_dir: Path) -> str:
    """The paper's findings with this run's numbers, and runs side by side (`--compare`)."""
    items = "".join(f"<li>{esc(s)}</li>" for s in findings(run, list(compare), resid_sim_dir))
    header, rows = comparison([run, *compare])
    return ("<h2>Findings</h2><ul>" + items + "</ul>"
            + (table(header, rows, left=(0, len(header) - 1)) if rows else ""))


def resid_sim_section(out: Path, folder: Path) -> str:
    head = "<h2>Residual-stream similarity</h2>"
    if not (folder / "resid_sim.png").is_file():
        return head + missing("residual similarity",
                              f"mlsae resid-sim MODEL... --out {folder}")
    res = _read_json(folder / "resid_sim.json") or {"models": {}}
    rows = [(name, r["mean"], r["n_layers"], r["included_tokens"])
            for name, r in res["models"].items()]
    return (head + figure(out, folder / "resid_sim.png", "resid_sim.png",
                          "Mean over tokens of the cosine between adjacent layers' residual "
                          "streams, each centred on its mean over tokens, by relative depth.")
            + table(["model", "mean cosine", "layers", "tokens"], rows))


def pick_latents(counts: torch.Tensor, totals: torch.Tensor, n: int
                 ) -> tuple[list[int], list[int]]:
    """(most multi-layer, most single-layer) latent ids among the frequent alive latents
    (module docstring); counts, totals [layer, n_latents]."""
    count = counts.sum(0)
    alive = (count > 0).nonzero().squeeze(1)
    if alive.numel() == 0:
        return [], []
    cand = alive[count[alive] >= count[alive].double().median()]
    p = layer_probs(totals[:, cand])
    n_act, ent = n_active_layers(counts[:, cand]), layer_entropy(p)
    std = layer_moments(p)[1].sqrt()
    multi = sorted(range(len(cand)), key=lambda i: (-int(n_act[i]), -float(ent[i])))
    single = sorted(range(len(cand)), key=lambda i: (float(std[i]), -int(count[cand[i]])))
    return [int(cand[i]) for i in multi[:n]], [int(cand[i]) for i in single[:n]]


def example_html(ex: dict) -> str:
    """One example: tokens shaded by the latent's activation, the max token boxed."""
    peak = max(max(ex["context_acts"]), 1e-12)
    spans = []
    for i, (tok, a) in enumerate(zip(ex["tokens"], ex["context_acts"])):
        style = f"background:rgba(255,140,0,{min(a / peak, 1):.2f})"
        body = esc(tok).replace("\n", "\u21b5")
        tag = "b" if i == ex["max_index"] else "span"
        spans.append(f'<{tag} style="{style}" title="{a:.4g}">{body}</{tag}>')
    return f'<div class="ex">{ex["activation"]:.3f} &nbsp; {"".join(spans)}</div>'


def latent_card(run: Path, out: Path, latent: int, counts: torch.Tensor, totals: torch.Tensor,
                layers: list[int], has_examples: bool) -> str:
    from mlsae.plots import analysis as plots  # matplotlib loads only to draw

    p = layer_probs(totals[:, latent : latent + 1])  # [layer, 1]
    mean, var = layer_moments(p)
    c = counts[:, latent]
    peak = int(totals[:, latent].argmax())
    plots.latent_layers_figure(p[:, 0].numpy(), c.numpy(), layers, out / f"latent_{latent}",
                               f"latent {latent}")
    stats = (f"active at {int(c.sum())} (token, layer) pairs; mean layer position "
             f"{float(mean):.2f}, layer std {float(var.sqrt()):.2f}, entropy/log L "
             f"{float(layer_entropy(p)) + 0.0:.2f}, active at "  # + 0.0: no "-0.00"
             f"{int(n_active_layers(counts[:, latent : latent + 1]))} layers; peak layer "
             f"{layers[peak]}")
    parts = [f'<div class="latent"><h3>Latent {latent}</h3><p>{esc(stats)}</p><div class="row">',
             f'<img src="latent_{latent}.png" alt="layer distribution of latent {latent}"><div>']
    if has_examples:
        found = show_examples(run, latent, layers[peak])[:EXAMPLES_SHOWN]
        parts.append(f"<p class=note>Top examples at layer {layers[peak]} (boxed: the max "
                     "token; shading: this latent's activation there):</p>")
        parts += [example_html(ex) for ex in found] or ["<p class=note>none stored</p>"]
    feature_view = feature_html(run, out, latent, has_examples=has_examples)
    return "".join(parts) + "</div></div>" + feature_view + "</div>"


def latents_section(run: Path, out: Path, n: int) -> str:
    head = "<h2>Selected latents</h2>"
    path = run / "analysis" / "dists.safetensors"
    if not path.is_file():
        return head + missing("layer distributions", f"mlsae analyze {run}")
    counts, totals, layers = load_dists(path)
    has_examples = (run / "analysis" / DB_NAME).is_file()
    multi, single = pick_latents(counts, totals, n)
    parts = [head, "<p class=note>Among latents firing at least as often as the median alive "
             "latent. Bars: share of the latent's activation per layer; line: firings per "
             "layer.</p>"]
    if not has_examples:
        parts.append(missing("examples", f"mlsae examples {run}"))
    for title, ids in (("Most multi-layer", multi), ("Most single-layer", single)):
        parts.append(f"<h3>{title}</h3>")
        parts += [latent_card(run, out, f, counts, totals, layers, has_examples) for f in ids]
    return "".join(parts)


# ---- the command ----------------------------------------------------------------------------
def report(run: str | Path, out: str | Path | None = None,
           resid_sim_dir: str | Path | None = None, n_latents: int = 3,
           compare: Sequence[str | Path] = ()) -> Path:
    """Write the report (module docstring); returns the path of index.html."""
    run = require_run_dir(run)
    if n_latents < 0:
        raise UserError("--latents must be non-negative")
    cfg = _read_json(run / "config.json")
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    body = [
        f"<h1>MLSAE report: {esc(run.name)}</h1><p class=note>{esc(run.resolve())} &middot; "
        f"generated {esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
        config_section(run, cfg), training_section(run, out), eval_section(run),
        replacement_section(run, out),
        findings_section(run, [require_run_dir(c) for c in compare],
                         Path(resid_sim_dir) if resid_sim_dir else run / "analysis"),
        pareto_section(run, out),
        analysis_section(run, out), prompts_section(run, out),
        resid_sim_section(out, Path(resid_sim_dir) if resid_sim_dir else run / "analysis"),
        latents_section(run, out, n_latents),
    ]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>MLSAE report: '
            f"{esc(run.name)}</title><style>{CSS}</style></head><body>{''.join(body)}"
            "</body></html>\n")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def pareto_section(run: Path, out: Path) -> str:
    """The matched-L0 comparison of `mlsae pareto` this run belongs to (if any)."""
    folder = next((f for f in (run.parent, run) if (f / "pareto.png").is_file()), None)
    if folder is None:
        return ""
    res = _read_json(folder / "pareto.json") or {}
    rows = [(arch, kind, f"{l0:.2f}", f"{fvu:.4f}", f"{dce:.4f}")
            for arch, kinds in (res.get("curves") or {}).items()
            for kind, pts in kinds.items() for l0, fvu, dce in pts]
    return ("<h2>Architectures at matched L0</h2>"
            + figure(out, folder / "pareto.png", "pareto.png",
                     f"FVU and dCE against L0, {folder}/pareto.csv")
            + table(("architecture", "kind", "L0", "FVU", "dCE"), rows, left=(0, 1)))


def _cmd_report(args: argparse.Namespace) -> int:
    print(f"wrote {report(args.run, args.out, args.resid_sim, args.latents, args.compare)}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae report` on the subparsers object `sub`."""
    p = sub.add_parser(
        "report", help="a self-contained HTML report of a run (config, training, analyses)",
        description="Write <run>/report/index.html and its images from what the run folder "
        "holds: config, training curves, eval.json, the analyze / examples results, and the "
        "resid-sim plot. Opens from disk; no server, no network.")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--out", help="report folder (default: <run>/report)")
    p.add_argument("--resid-sim", metavar="DIR", help="folder with resid_sim.png/json "
                   "(default: <run>/analysis)")
    p.add_argument("--compare", action="append", default=[], metavar="RUN",
                   help="another run shown side by side in the findings (e.g. the same "
                   "setup with --lens); repeatable")
    p.add_argument("--latents", type=int, default=3,
                   help="latents shown per group (most multi-layer, most single-layer; "
                   "default: 3)")
    p.set_defaults(func=_cmd_report)

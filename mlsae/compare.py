"""`mlsae compare`: the MLSAE against single-layer SAEs, layer by layer (FVU, dCE, L0).
Uses evaluate, runs, plots, formats, the tuned lens and the SAE.

The baselines may be SAEs trained elsewhere: any folder `mlsae.formats` reads (a sparsify run
folder, SAELens folders, the seed paper's) counts; those are copied as mlsae checkpoints into
`out_dir/imported_baselines/<name>/` carrying the MLSAE's data settings, so they are scored
on the same held-out text and positions.

Reads `eval.json` of the MLSAE and of every single-layer checkpoint directly under the
baselines folder (e.g. `layer_<l>/` from `mlsae baselines`). A checkpoint without eval.json
is evaluated first (writing its eval.json), with the text options and ablation recorded in the
MLSAE's eval.json, so that every number comes from the same text; when the MLSAE has no
eval.json either, with the given options (default 2,048 tokens). The checkpoints lacking
eval.json are evaluated together, in one pass per batch (`mlsae.evaluate.evaluate_many`: the
clean forward and the ablations are shared; each result equals its evaluation alone). The LM
loads once, only if something is evaluated. Results computed on different text or ablations
are still compared, with a printed note.

Writes in `out_dir` (default: the MLSAE folder):
  compare.csv  layer,mlsae_fvu,baseline_fvu,mlsae_dce,baseline_dce,mlsae_l0,baseline_l0
               one row per layer of either; empty cell where that SAE has no such layer
  compare.png  FVU, dCE and L0 over layers, MLSAE vs single-layer SAEs

A lens run (`mlsae train --lens`) is evaluated through its lens (`mlsae eval`: translate, SAE,
exact inverse; every number in the original space), so it compares with single-layer SAEs of
the untranslated resid_post. Imported baselines never inherit the MLSAE's lens.

Multi-layer replacement (when the MLSAE's eval.json holds `replacement`, or with --replace):
the layers R = the replaced layers that have a single-layer baseline. The baselines' curve
replaces each layer of R by its own SAE, free-running (as `mlsae eval --replace`), on the text
of the MLSAE's eval.json; the MLSAE's curve is its eval.json's when that replaced exactly R,
else it is computed on R too. Writes
  compare_replacement.json  `layers`, `dataset`, `tokens`, `mlsae` and `baseline` (each like
               eval.json's `replacement`: `layers`, `ce_clean`, `ce_replaced`, `dce`, `kl`,
               `curve` [{`n_layers`, `layers`, `ce`, `kl`}])
  replacement.csv  n_layers,last_layer,ce_clean,mlsae_ce,baseline_ce,mlsae_kl,baseline_kl
  replacement.png  dCE and KL of both curves over the deepest replaced layer
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mlsae.errors import UserError
from mlsae.evaluate import (
    CURVE_POINTS,
    EVAL_TOKENS,
    Recon,
    add_cache_option,
    curve_counts,
    evaluate_batches,
    evaluate_many,
    format_layers,
    sae_recon,
    select_layers,
)
from mlsae.formats import detect, read
from mlsae.lens import sae_lens
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions, add_text_options, text_options
from mlsae.runs import eval_batches, load_run_lm, load_sae, sae_layers

METRICS = ("fvu", "dce", "l0")
COLUMNS = ["layer"] + [f"{who}_{m}" for m in METRICS for who in ("mlsae", "baseline")]


def baseline_folders(root: Path) -> dict[int, Path]:
    """{layer: folder} of the single-layer checkpoints directly under `root`: mlsae's own
    (`layer_<l>/` from `mlsae baselines`) or SAEs trained elsewhere (a sparsify run folder,
    a SAELens export), whatever format `mlsae.formats` reads."""
    if not root.is_dir():
        raise UserError(f"baselines folder {str(root)!r}: no such folder")
    found = {}
    for folder in sorted(p for p in root.iterdir() if detect(p)):
        try:  # any format mlsae reads: its own, SAELens, sparsify, the seed paper's
            layers = read(folder, tensors=False).config.get("layers") or []
        except UserError:
            continue  # not a readable SAE checkpoint
        if len(layers) == 1:
            found[int(layers[0])] = folder
    if not found:
        raise UserError(f"{str(root)!r} holds no single-layer SAE checkpoint (run mlsae "
                        "baselines first)")
    return dict(sorted(found.items()))


def imported_baselines(folders: dict[int, Path], mlsae, work: Path) -> dict[int, Path]:
    """Baselines in another format (sparsify, SAELens, the seed paper's) as mlsae checkpoints
    under `work/<name>/` that carry the MLSAE's data settings (`run`, excluded positions), so
    they are evaluated on the MLSAE's own held-out text and positions; mlsae's own baselines
    are used in place. A copy is rewritten (and its eval.json dropped) only when the source's
    weights changed."""
    import filecmp
    import shutil
    import tempfile

    from mlsae.sae import MLSAE

    out = {}
    for layer, folder in folders.items():
        if detect(folder) == "mlsae":
            out[layer] = folder
            continue
        sae = MLSAE.from_pretrained(folder)
        sae.config.update({key: copy.deepcopy(mlsae.config[key]) for key in
                           ("run", "exclude_first", "exclude_special") if key in mlsae.config})
        if (sae.config.get("run") or {}).get("train"):  # the MLSAE's data, never its lens
            sae.config["run"]["train"]["lens"] = None
        sae.config["model"] = sae.config.get("model") or mlsae.config.get("model")
        sae.config["imported_from"] = str(folder)
        dest = work / folder.name
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            sae.save_pretrained(tmp)
            same = (dest / "model.safetensors").is_file() and filecmp.cmp(
                Path(tmp) / "model.safetensors", dest / "model.safetensors", shallow=False)
            if not same:
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(tmp, dest)
        out[layer] = dest
    return out


class _Evaluations:
    """eval.json of checkpoint folders; those without one are evaluated together, in one
    pass per batch (`evaluate_many`), and written."""

    def __init__(self, opts: TextOptions, ablation: str, lm: LanguageModel | None,
                 progress: bool, cache: bool = True):
        self.opts, self.ablation, self.lm, self.progress = opts, ablation, lm, progress
        self.cache = cache

    @staticmethod
    def _read(folder: Path) -> dict | None:
        path = folder / "eval.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{str(path)!r} is not valid JSON ({e}): delete it to "
                            "re-evaluate") from None

    def get(self, folder: Path) -> dict:
        return self.get_all([folder])[0]

    def get_all(self, folders: list[Path]) -> list[dict]:
        found = {f: self._read(f) for f in folders}
        missing = [f for f in folders if found[f] is None]
        if missing:
            print(f"evaluating {len(missing)} checkpoint{'s' if len(missing) > 1 else ''} "
                  f"without eval.json together: {', '.join(str(f) for f in missing)}",
                  file=sys.stderr)
            if self.lm is None:
                self.lm = load_run_lm(load_sae(missing[0], lens_ok=True), self.opts)
            done = evaluate_many(missing, self.opts, ablation=self.ablation, lm=self.lm,
                                 progress=self.progress, cache=self.cache)
            found.update(zip(missing, done))
        return [found[f] for f in folders]

    def follow(self, recorded: dict) -> None:
        """Evaluate from now on with the options recorded in an eval.json."""
        opts = recorded.get("options")
        if opts:
            self.opts = replace(TextOptions(**opts), device=self.opts.device,
                                model=self.opts.model or opts.get("model"))
        self.ablation = recorded.get("ablation", self.ablation)


def _at(res: dict, layer: int) -> dict:
    if layer not in res["layers"]:
        return {}
    i = res["layers"].index(layer)
    return {m: res["per_layer"][m][i] for m in METRICS}


def comparison_rows(mlsae: dict, base: dict[int, dict]) -> list[dict]:
    """One row per layer: {"layer", "mlsae_<metric>", "baseline_<metric>"} (None: absent)."""
    rows = []
    for layer in sorted(set(mlsae["layers"]) | set(base)):
        m, b = _at(mlsae, layer), _at(base.get(layer, {"layers": []}), layer)
        row = {"layer": layer}
        for metric in METRICS:
            row[f"mlsae_{metric}"], row[f"baseline_{metric}"] = m.get(metric), b.get(metric)
        rows.append(row)
    return rows


def _mismatch(results: list[dict]) -> str | None:
    keys = ("dataset", "tokens", "ablation")
    seen = {tuple(r.get(k) for k in keys) for r in results}
    if len(seen) > 1:
        return ("the eval.json files differ in text or ablation "
                f"({', '.join(keys)}: {sorted(map(str, seen))}): compare with care")
    return None


REPLACEMENT_COLUMNS = ["n_layers", "last_layer", "ce_clean", "mlsae_ce", "baseline_ce",
                       "mlsae_kl", "baseline_kl"]


def run_recon(folder: Path, sae, device) -> Recon:
    """The reconstruction of a checkpoint at any of its layers, through its lens when it is a
    lens run (original space either way)."""
    lens = sae_lens(folder, sae.config, sae_layers(sae), sae.d_model)
    return sae_recon(sae, None if lens is None else lens.to(device))


def replacement_comparison(mlsae_dir: Path, mlsae: dict, folders: dict[int, Path],
                           evals: _Evaluations, replace: str | None,
                           curve_points: int) -> dict | None:
    """The MLSAE's and the baselines' replacement curves on the same layers and text (module
    docstring); None when nothing asks for it. Raises UserError when no layer has both."""
    own = mlsae.get("replacement")
    spec = replace if replace is not None else (own or {}).get("layers")
    if spec is None:
        return None
    sae = load_sae(mlsae_dir, lens_ok=True)
    wanted = select_layers(spec, sae_layers(sae), "--replace")
    layers = [v for v in wanted if v in folders]
    if not layers:
        raise UserError(f"--replace: none of the layers {format_layers(wanted)} has a "
                        f"single-layer baseline (they have {format_layers(list(folders))})")
    if evals.lm is None:
        evals.lm = load_run_lm(sae, evals.opts)
    lm = evals.lm
    data_cfg, batch_list, tokens = eval_batches(sae, lm, evals.opts)
    empty = torch.zeros(0, lm.d_model, device=lm.device)
    if own is not None and own["layers"] == layers:
        mine, counts = own, [p["n_layers"] for p in own["curve"]]
    else:
        counts = curve_counts(len(layers), curve_points)
        sae.to(lm.device)
        _, _, st = evaluate_batches(sae, lm, [], batch_list, data_cfg, empty,
                                    evals.progress, replace=layers, curve=counts,
                                    recon=run_recon(mlsae_dir, sae, lm.device))
        mine = st.result()
    saes = {v: load_sae(folders[v], lens_ok=True).to(lm.device) for v in layers}
    recons = {v: run_recon(folders[v], saes[v], lm.device) for v in layers}
    _, _, st = evaluate_batches(saes[layers[0]], lm, [], batch_list, data_cfg, empty,
                                evals.progress, replace=layers, curve=counts,
                                recon=lambda layer, x: recons[layer](layer, x))
    return {"layers": layers, "dataset": mlsae.get("dataset"), "tokens": tokens,
            "mlsae": mine, "baseline": st.result()}


def replacement_rows(rep: dict) -> list[dict]:
    """One row per curve point of `compare_replacement.json`'s two curves."""
    rows = []
    for m, b in zip(rep["mlsae"]["curve"], rep["baseline"]["curve"]):
        rows.append({"n_layers": m["n_layers"], "last_layer": m["layers"][-1],
                     "ce_clean": rep["mlsae"]["ce_clean"], "mlsae_ce": m["ce"],
                     "baseline_ce": b["ce"], "mlsae_kl": m["kl"], "baseline_kl": b["kl"]})
    return rows


def _write_replacement(rep: dict, out: Path) -> dict:
    from mlsae.plots.eval import replacement_figure

    (out / "compare_replacement.json").write_text(json.dumps(rep, indent=2) + "\n")
    with (out / "replacement.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REPLACEMENT_COLUMNS)
        w.writeheader()
        w.writerows(replacement_rows(rep))
    replacement_figure({"MLSAE": rep["mlsae"], "single-layer SAEs": rep["baseline"]},
                       out / "replacement.png")
    return {"json": str(out / "compare_replacement.json"), "csv": str(out / "replacement.csv"),
            "png": str(out / "replacement.png")}


def compare(mlsae_dir: str | Path, baselines_dir: str | Path, out_dir: str | Path | None = None,
            opts: TextOptions | None = None, lm: LanguageModel | None = None,
            progress: bool = True, replace: str | None = None,
            curve_points: int = CURVE_POINTS, cache: bool = True) -> dict:
    """Compare an MLSAE with its single-layer baselines; writes compare.csv and compare.png,
    and the replacement comparison when asked (module docstring).

    Returns {"rows", "csv", "png"}, "replacement" ({"data", "json", "csv", "png"}) when
    computed, and "note" when the evaluations used different text.
    """
    from mlsae.plots.eval import compare_figure

    mlsae_dir, root = Path(mlsae_dir), Path(baselines_dir)
    sae = load_sae(mlsae_dir, lens_ok=True)  # a missing or broken checkpoint fails here
    folders = baseline_folders(root)
    out = Path(out_dir) if out_dir is not None else mlsae_dir
    folders = imported_baselines(folders, sae, out / "imported_baselines")
    evals = _Evaluations(opts or TextOptions(tokens=EVAL_TOKENS), "zero", lm, progress, cache)
    if evals._read(mlsae_dir) is None:  # everything on the given text, in one pass
        mlsae, *others = evals.get_all([mlsae_dir, *folders.values()])
        evals.follow(mlsae)
    else:  # the MLSAE's recorded text and ablation rule; the missing baselines in one pass
        mlsae = evals.get(mlsae_dir)
        evals.follow(mlsae)
        others = evals.get_all(list(folders.values()))
    base = dict(zip(folders, others))
    rows = comparison_rows(mlsae, base)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    compare_figure(rows, out / "compare.png")
    res = {"rows": rows, "csv": str(out / "compare.csv"), "png": str(out / "compare.png")}
    rep = replacement_comparison(mlsae_dir, mlsae, folders, evals, replace, curve_points)
    if rep is not None:
        res["replacement"] = dict(_write_replacement(rep, out), data=rep)
    note = _mismatch([mlsae, *base.values()])
    if note:
        res["note"] = note
    return res


# ---- CLI ---------------------------------------------------------------------------------
def _cell(v: float | None) -> str:
    return f"{'-':>9}" if v is None else f"{v:>9.4f}"


def format_comparison(rows: list[dict]) -> str:
    lines = [f"{'layer':>5} " + " ".join(f"{c:>9}" for c in ("FVU", "FVU_1L", "dCE", "dCE_1L",
                                                               "L0", "L0_1L"))]
    for row in rows:
        lines.append(f"{row['layer']:>5} " + " ".join(_cell(row[c]) for c in COLUMNS[1:]))
    both = [r for r in rows if r["mlsae_fvu"] is not None and r["baseline_fvu"] is not None]
    if both:
        means = [sum(r[c] for r in both) / len(both) for c in COLUMNS[1:]]
        lines.append(f"{'mean':>5} " + " ".join(_cell(v) for v in means)
                     + f"   (over the {len(both)} layers with both)")
    return "\n".join(lines)


def format_replacement_comparison(rep: dict) -> str:
    lines = [f"multi-layer replacement of layers {format_layers(rep['layers'])} (first n, "
             f"free-running); CE clean {rep['mlsae']['ce_clean']:.4f}",
             f"{'n':>4} {'last':>5} {'dCE':>9} {'dCE_1L':>9} {'KL':>9} {'KL_1L':>9}"]
    for r in replacement_rows(rep):
        lines.append(f"{r['n_layers']:>4} {r['last_layer']:>5} "
                     + " ".join(_cell(v) for v in (r["mlsae_ce"] - r["ce_clean"],
                                                   r["baseline_ce"] - r["ce_clean"],
                                                   r["mlsae_kl"], r["baseline_kl"])))
    return "\n".join(lines)


def _cmd_compare(args: argparse.Namespace) -> int:
    res = compare(args.mlsae, args.baselines, out_dir=args.out_dir, opts=text_options(args),
                  replace=args.replace, curve_points=args.curve_points, cache=args.cache)
    print("MLSAE vs single-layer SAEs (_1L)")
    print(format_comparison(res["rows"]))
    if "replacement" in res:
        print(format_replacement_comparison(res["replacement"]["data"]))
    if "note" in res:
        print(f"note: {res['note']}", file=sys.stderr)
    print(f"wrote {res['csv']} and {res['png']}")
    if "replacement" in res:
        r = res["replacement"]
        print(f"wrote {r['json']}, {r['csv']} and {r['png']}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae compare` on the subparsers object `sub`."""
    p = sub.add_parser(
        "compare", help="MLSAE vs single-layer SAEs: FVU, dCE and L0 per layer",
        description="Compare an MLSAE with single-layer SAEs (e.g. <run>/baselines) layer by "
        "layer from their eval.json; checkpoints without one are evaluated first, on the text "
        "recorded in the MLSAE's eval.json (else the options below).")
    p.add_argument("mlsae", help="the MLSAE's checkpoint or run folder")
    p.add_argument("baselines", help="folder holding single-layer checkpoints (layer_<l>/)")
    p.add_argument("--out-dir", help="where compare.csv and compare.png go (default: the "
                   "MLSAE folder)")
    p.add_argument("--replace", metavar="LAYERS", help="compare multi-layer replacement on "
                   "these layers (those with a baseline); default: the layers of the MLSAE's "
                   "eval.json 'replacement', if any")
    p.add_argument("--curve-points", type=int, default=CURVE_POINTS,
                   help="points of the replacement curve (see mlsae eval; default: "
                   f"{CURVE_POINTS})")
    add_cache_option(p)
    add_text_options(p, tokens=EVAL_TOKENS)
    p.set_defaults(func=_cmd_compare)

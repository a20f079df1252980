"""`mlsae pareto`: compare architectures at matched sparsity (SAEBench's rule: metrics track
L0, so compare curves, not points). Uses config, train, evaluate and plots.

One command trains, from ONE LM forward per batch, every (architecture, sparsity knob) of a
grid as an MLSAE on the chosen layers. The knob is k: the budget of topk / batchtopk /
token-topk / matryoshka, and JumpReLU's initial L0 (theta starts at the first batch's
BatchTopK threshold for k); JumpReLU also takes --l0-coefs (its penalty weight; measured on
the synthetic benchmark, a 10x larger weight moved L0 only from 5.1 to 4.9 in a 147-step run,
since Adam moves theta by about the learning rate per step: on short runs its L0 stays near
where k starts it). Then, plus, with --baseline-layers, a single-layer SAE
of every grid point on each of those layers (same width, knob and token budget). Then it
evaluates every checkpoint on the same held-out text in one pass per batch
(`evaluate_many`) and writes into --out:

  <arch>-k<k>/ (jumprelu-k<k>-l0_coef<c>/ with several --l0-coefs)
                                           the MLSAE runs (ordinary run folders, eval.json)
  baselines/<point>/layer_<l>/             the single-layer baselines (same)
  pareto.csv   one row per (run, layer): point, arch, k, l0_coef, kind (mlsae|baseline),
               layer, l0, fvu, dce, kl, ce_recovered, n_latents, params (the run's total
               parameters; a point's baselines together hold len(layers) x as many)
  pareto.png   FVU and dCE against L0 (means over layers), one curve per architecture:
               MLSAE solid, per-layer baselines dashed (the MLSAE then averaged over the
               baseline layers only, so both curves describe the same layers)
  pareto.json  the command's options and the figure's points

An interrupted command continues where it stopped when run again with the same options.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlsae import config as C
from mlsae.errors import UserError
from mlsae.evaluate import evaluate_many
from mlsae.lm import load_lm
from mlsae.options import TextOptions, add_dataclass_options, build_config
from mlsae.train import RunConfig, train_plan
from mlsae.train.checkpoint import find_checkpoint

BUDGET_ARCHS = ("topk", "batchtopk", "token-topk", "matryoshka")


@dataclass
class ParetoConfig:
    """The grid of `mlsae pareto` and its evaluation."""

    out: str = "runs/pareto"
    """Folder for every run, pareto.csv and pareto.png."""

    archs: str = "topk,batchtopk,token-topk,jumprelu,matryoshka"
    """Architectures to compare (comma-separated)."""

    ks: str = "16,32,64"
    """The sparsity knob k: active latents per vector (topk), on average (batchtopk,
    token-topk, matryoshka), JumpReLU's initial L0."""

    l0_coefs: str | None = None
    """jumprelu's L0 penalty weights (comma-separated; default: --l0-coef's one value)."""

    baseline_layers: str | None = None
    """Also train a single-layer SAE of every grid point on each of these layers
    (`3,15` or a range `0-29:7`); none by default."""

    score_tokens: int = 2048
    """Held-out tokens every checkpoint is evaluated on (the same text for all)."""

    score_batch_size: int = 8
    """Sequences per forward pass during evaluation."""


def _floats(spec: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{flag} {spec!r}: use comma-separated numbers") from None


def grid(pc: ParetoConfig, l0_coef: float = 2e-3) -> list[tuple[str, str, dict]]:
    """[(point name, arch, SAEConfig overrides)] of the grid."""
    archs = [a.strip() for a in pc.archs.split(",") if a.strip()]
    bad = [a for a in archs if a not in C.ARCH_OPTIONS]
    if bad or not archs:
        raise UserError(f"--archs {pc.archs!r}: choose from {', '.join(C.ARCH_OPTIONS)}")
    points = []
    for arch in archs:
        for k in _floats(pc.ks, "ks"):
            if arch != "jumprelu":
                points.append((f"{arch}-k{int(k)}", arch, {"arch": arch, "k": int(k)}))
                continue
            coefs = _floats(pc.l0_coefs, "l0-coefs") if pc.l0_coefs else [l0_coef]
            for c in coefs:
                name = f"jumprelu-k{int(k)}" + (f"-l0_coef{c:g}" if len(coefs) > 1 else "")
                points.append((name, arch, {"arch": arch, "k": int(k), "l0_coef": c}))
    return points


def _config(base: RunConfig, overrides: dict, out: Path, layers: str | None = None
            ) -> RunConfig:
    cfg = RunConfig.from_dict(base.to_dict())
    for key, value in overrides.items():
        setattr(cfg.sae, key, value)
    cfg.train.out = str(out)
    if layers is not None:
        cfg.train.layers = layers
    return cfg


def plan_pareto(base: RunConfig, pc: ParetoConfig, n_layers: int
                ) -> list[tuple[str, str, str, RunConfig, Path]]:
    """[(point, arch, kind, config, folder)] for every MLSAE and baseline of the grid."""
    out = Path(pc.out)
    jobs = []
    base_layers = (C.resolve_layers(pc.baseline_layers, n_layers)
                   if pc.baseline_layers else [])
    for point, arch, overrides in grid(pc, base.sae.l0_coef):
        jobs.append((point, arch, "mlsae", _config(base, overrides, out / point),
                     out / point))
        for layer in base_layers:
            folder = out / "baselines" / point / f"layer_{layer}"
            jobs.append((point, arch, "baseline",
                         _config(base, overrides, folder, str(layer)), folder))
    return jobs


def _train_all(jobs, root: Path, lm, progress: bool) -> None:
    """Train the jobs together; a second call after an interruption resumes them."""
    states = [find_checkpoint(folder) for *_, folder in jobs]
    if all(s is not None for s in states):
        finished = [json.loads((s / "state.json").read_text()).get("finished")
                    for s in states]
        if all(finished):
            return
        res = train_plan([(cfg, folder) for _, _, _, cfg, folder in jobs], root, lm=lm,
                         progress=progress, resume=True)
    elif any(s is not None for s in states):
        raise UserError(f"--out {str(root)!r} holds some of this grid's runs but not all: "
                        "use a new --out, or the options it was started with")
    else:
        res = train_plan([(cfg, folder) for _, _, _, cfg, folder in jobs], root, lm=lm,
                         progress=progress)
    if not res["finished"]:
        raise KeyboardInterrupt  # the CLI turns it into exit 130; checkpoints are saved


def n_params(n_latents: int, d_model: int) -> int:
    """W_enc, W_dec, b_enc, b_dec (a threshold adds n_latents; not counted: it is one
    number per latent of inference state, not a learned map for BatchTopK)."""
    return 2 * n_latents * d_model + n_latents + d_model


def rows_of(point: str, arch: str, kind: str, k: int, l0_coef: float | None, res: dict,
            n_latents: int, d_model: int) -> list[dict]:
    pl = res["per_layer"]
    return [{"point": point, "arch": arch, "k": k, "l0_coef": l0_coef, "kind": kind,
             "layer": layer, "l0": pl["l0"][i], "fvu": pl["fvu"][i], "dce": pl["dce"][i],
             "kl": pl["kl"][i], "ce_recovered": pl["ce_recovered"][i],
             "n_latents": n_latents, "params": n_params(n_latents, d_model)}
            for i, layer in enumerate(res["layers"])]


def curves(rows: list[dict]) -> dict:
    """{arch: {"mlsae": [(l0, fvu, dce), ...], "baseline": [...]}} of means over layers,
    sorted by L0; with baselines, the MLSAE's means use only the baseline layers."""
    base_layers = sorted({r["layer"] for r in rows if r["kind"] == "baseline"})
    out: dict = {}
    for kind in ("mlsae", "baseline"):
        for point in sorted({r["point"] for r in rows if r["kind"] == kind}):
            sel = [r for r in rows if r["point"] == point and r["kind"] == kind
                   and (not base_layers or r["layer"] in base_layers)]
            if not sel:
                continue
            mean = [sum(r[m] for r in sel) / len(sel) for m in ("l0", "fvu", "dce")]
            out.setdefault(sel[0]["arch"], {}).setdefault(kind, []).append(mean)
    for arch in out.values():
        for pts in arch.values():
            pts.sort()
    return out


def pareto(base: RunConfig, pc: ParetoConfig, progress: bool = True, lm=None) -> dict:
    """Train the grid (module docstring) from one LM pass, evaluate every checkpoint on the
    same held-out text, write pareto.csv / .png / .json into `pc.out`; returns
    {"rows", "curves", "csv", "figure"}."""
    from mlsae.plots.eval import pareto_figure

    t0 = time.perf_counter()
    root = Path(pc.out)
    base = RunConfig.from_dict(base.to_dict())
    base.train.eval_tokens = 0  # every run is scored below, on the same text
    train_lm = lm  # None: training loads its own (in --dtype, bfloat16 where native)
    grid(pc, base.sae.l0_coef)  # a bad grid is one line before the LM loads
    if lm is None:
        lm = load_lm(base.train.model, base.train.device, "float32", base.train.revision,
                     base.train.blocks)
    jobs = plan_pareto(base, pc, lm.n_layers)
    root.mkdir(parents=True, exist_ok=True)
    _train_all(jobs, root, train_lm, progress)
    t_train = time.perf_counter() - t0
    opts = TextOptions(tokens=pc.score_tokens, batch_size=pc.score_batch_size,
                       device=base.train.device)
    results = evaluate_many([folder for *_, folder in jobs], opts,
                            [folder / "eval.json" for *_, folder in jobs], lm=lm,
                            progress=progress, cache=False)
    rows = []
    for (point, arch, kind, cfg, _), res in zip(jobs, results):
        rows += rows_of(point, arch, kind, cfg.sae.k,
                        cfg.sae.l0_coef if arch == "jumprelu" else None, res,
                        cfg.sae.expansion_factor * lm.d_model, lm.d_model)
    csv_path = root / "pareto.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cv = curves(rows)
    fig = pareto_figure(cv, root / "pareto.png", model=lm.name, tokens=pc.score_tokens)
    (root / "pareto.json").write_text(json.dumps({
        "options": asdict(pc), "run": base.to_dict(), "curves": cv,
        "curve_doc": "curves[arch][kind] = [[l0, fvu, dce], ...] means over layers (the "
                     "baseline layers only when there are baselines), sorted by L0",
        "train_seconds": round(t_train, 1),
        "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    return {"rows": rows, "curves": cv, "csv": str(csv_path), "figure": str(fig)}


def format_curves(cv: dict) -> str:
    lines = [f"{'arch':<11} {'kind':<9} {'L0':>7} {'FVU':>7} {'dCE':>7}"]
    for arch, kinds in cv.items():
        for kind, pts in kinds.items():
            for l0, fvu, dce in pts:
                lines.append(f"{arch:<11} {kind:<9} {l0:>7.2f} {fvu:>7.4f} {dce:>7.4f}")
    return "\n".join(lines)


def _cmd_pareto(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    pc = build_config(ParetoConfig, given)
    for name in ("k", "arch", "out"):
        given.pop(name, None)  # the grid sets these
    base = C.RunConfig(build_config(C.SAEConfig, given), build_config(C.DataConfig, given),
                       build_config(C.TrainConfig, given))
    res = pareto(base, pc)
    print(format_curves(res["curves"]))
    print(f"wrote {res['csv']} and {res['figure']}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae pareto` on the subparsers object `sub`."""
    p = sub.add_parser("pareto", help="compare architectures at matched L0 (one LM pass)",
                       description="Train a grid of architectures x sparsity knobs (and "
                       "optionally their single-layer baselines) from one LM forward per "
                       "batch, evaluate all on the same held-out text, and write pareto.csv "
                       "and pareto.png (FVU and dCE against L0).")
    add_dataclass_options(p, ParetoConfig)
    add_dataclass_options(p, C.SAEConfig, skip=("k", "arch"))
    add_dataclass_options(p, C.DataConfig)
    add_dataclass_options(p, C.TrainConfig, skip=("out", "activations", "cache_shuffle",
                                                  "lens", "eval_tokens"))
    p.set_defaults(func=_cmd_pareto)

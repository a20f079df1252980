"""`mlsae baselines`: single-layer SAEs with the MLSAE's setup, and how far each transfers.
Uses train, evaluate, runs and plots.

For every layer l of a run (or --layers), a single-layer SAE is trained into
`<run>/baselines/layer_<l>/` with the run's own RunConfig (same width, k, tokens, data, seed,
learning rate rule, ...) except `layers = l`. "Same tokens" means the same number of packed
token positions, as in the paper: the MLSAE sees each token at every layer, a baseline once.
A finished baseline is skipped; an interrupted one resumes; one trained under a different
setup than the run's is an error (delete it to retrain).

Then every finished baseline is evaluated on every layer of the run (FVU only, the run's
held-out text, one LM forward per batch for all layers), giving
  fvu_matrix.csv   header `train_layer,<eval layer>,...`; one row per baseline
  fvu_matrix.png   the same as a heatmap
in `<run>/baselines/`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mlsae.activations import batch_activations
from mlsae.config import TrainConfig
from mlsae.errors import UserError
from mlsae.evaluate import check_text_options, reconstruct, select_layers
from mlsae.lm import LanguageModel, load_lm
from mlsae.metrics import ReconstructionStats
from mlsae.options import TextOptions, add_dataclass_options, add_text_options, text_options
from mlsae.runs import check_lm_matches, eval_batches, load_sae, sae_layers
from mlsae.sae import MLSAE
from mlsae.train import RESUME_FREE, RunConfig, read_run_config, train_apart

MATRIX_TOKENS = 20_000


def run_config(run_dir: Path) -> RunConfig:
    """The run's RunConfig: from checkpoint/state.json, else from config.json's "run"."""
    if (run_dir / "checkpoint" / "state.json").is_file():
        return read_run_config(run_dir)
    try:
        return RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["run"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{str(run_dir)!r} is not a run folder (no checkpoint/state.json, "
                        "and config.json holds no run config)") from None


# Baselines always stream from the LM: an activation cache holds the run's layer set, which a
# single-layer run cannot adopt; the cached run's config already records the same data.
BASELINE_FREE = RESUME_FREE | {"layers", "activations", "cache_shuffle"}


def _setup(cfg: RunConfig) -> dict:
    """What must agree between a baseline and its run: everything but the layers, the data
    path (LM or cache) and the flags that only change how a run is watched."""
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in BASELINE_FREE}
    return d


def baseline_config(cfg: RunConfig, layer: int, folder: Path) -> RunConfig:
    b = copy.deepcopy(cfg)
    b.train.layers, b.train.out, b.train.activations = str(layer), str(folder), None
    return b


def _state(folder: Path) -> dict | None:
    path = folder / "checkpoint" / "state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{str(path)!r} is unreadable ({e}): delete {str(folder)!r} to "
                        "retrain it") from None


def train_baselines(cfg: RunConfig, layers: list[int], root: Path, lm: LanguageModel,
                    progress: bool = True) -> dict[int, str]:
    """Skip the finished baselines; resume the interrupted ones, those stopped at the same
    step together; then train all the new ones together. Runs trained together share one LM
    forward per batch (`train_apart`: each gets exactly what it would alone) and the resume
    index `root/data_index.jsonl`. -> {layer: trained|skipped|interrupted}; stops at an
    interruption."""
    status: dict[int, str] = {}
    stopped: dict[tuple[int, int], list[int]] = {}  # (step, sequences) -> layers
    fresh = []
    for layer in layers:
        folder = root / f"layer_{layer}"
        state = _state(folder)
        if state is None:
            fresh.append(layer)
            continue
        if _setup(RunConfig.from_dict(state["config"])) != _setup(cfg):
            raise UserError(f"{str(folder)!r} was trained with a different setup than the "
                            "run: delete it to retrain")
        if state.get("finished"):
            status[layer] = "skipped"
        else:
            stopped.setdefault((state["step"], state["sequences"]), []).append(layer)
    groups = [(group, True) for group in stopped.values()] + [(fresh, False)] * bool(fresh)
    for group, resume in groups:
        folders = [root / f"layer_{v}" for v in group]
        plan = [(read_run_config(f) if resume else baseline_config(cfg, v, f), f)
                for v, f in zip(group, folders)]
        res = train_apart(plan, root / "data_index.jsonl", lm=lm, progress=progress,
                          resume=resume)
        status.update({v: "trained" if res["finished"] else "interrupted" for v in group})
        if not res["finished"]:
            break
    return dict(sorted(status.items()))


def finished_baselines(root: Path) -> dict[int, MLSAE]:
    """{layer: SAE} of every finished single-layer SAE under `root` (layer_<l>/)."""
    found = {}
    for folder in sorted(root.glob("layer_*")):
        state = _state(folder)
        if state is not None and state.get("finished") and (folder / "config.json").is_file():
            sae = load_sae(folder)
            layers = sae_layers(sae)
            if len(layers) == 1:
                found[layers[0]] = sae
    return dict(sorted(found.items()))


@torch.inference_mode()
def fvu_matrix(saes: dict[int, MLSAE], lm: LanguageModel, eval_layers: list[int],
               batches: list[torch.Tensor], data_cfg, progress: bool = True) -> torch.Tensor:
    """FVU of each SAE (rows, in `saes` order) on each of `eval_layers` (columns)."""
    stats = [ReconstructionStats(len(eval_layers), s.d_model, s.n_latents) for s in saes.values()]
    for ids in tqdm(batches, desc="fvu matrix", disable=not progress, dynamic_ncols=True):
        x, _ = batch_activations(lm, ids, eval_layers, data_cfg, lm.device)  # [layer, tok, d]
        if x.shape[1] == 0:
            continue
        for st, sae in zip(stats, saes.values()):
            st.update(x, *reconstruct(sae, x))
    return torch.tensor([st.result()["per_layer"]["fvu"] for st in stats])


def write_matrix_csv(path: Path, matrix: torch.Tensor, rows: list[int], cols: list[int]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train_layer", *cols])
        for layer, values in zip(rows, matrix.tolist()):
            w.writerow([layer, *(f"{v:.6g}" for v in values)])


def baselines(run_dir: str | Path, layers: str | list[int] | None = None,
              opts: TextOptions | None = None, lm: LanguageModel | None = None,
              progress: bool = True, revision: str | None = None,
              blocks: str | None = None) -> dict:
    """Train the missing single-layer baselines of a run, then write the FVU matrix.

    `opts`: text for the FVU matrix (default: the run's held-out split, 20k tokens) and where
    the LM comes from (`model`, `device`; `dtype` None = the run's, which training needs).
    `revision`, `blocks`: the LM's hub revision and decoder-blocks path (default: the run's,
    unless `opts.model` names another model), recorded in the baselines' configs with the
    run's model (not with another `opts.model`, which they do not record either).
    Returns {"status": {layer: trained|skipped|interrupted}, "train_layers", "eval_layers",
    "matrix", "csv", "png"}; stops after an interrupted baseline without a matrix.
    """
    from mlsae.plots.eval import fvu_matrix_figure

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    sae = load_sae(run_dir)
    run_layers = sae_layers(sae)
    chosen = select_layers(layers, run_layers)
    opts = opts or TextOptions(tokens=MATRIX_TOKENS, dtype=cfg.train.dtype)
    check_text_options(opts)
    own = opts.model is None or opts.model == cfg.train.model  # else the run's are not its
    revision = revision if revision is not None else cfg.train.revision if own else None
    blocks = blocks if blocks is not None else cfg.train.blocks if own else None
    if own:  # recorded in the baselines' configs (as the run's model is)
        cfg.train.revision, cfg.train.blocks = revision, blocks
    if lm is None:
        lm = load_lm(opts.model or cfg.train.model, opts.device, opts.dtype or cfg.train.dtype,
                     revision, blocks)
    check_lm_matches(sae, lm)
    root = run_dir / "baselines"
    status = train_baselines(cfg, chosen, root, lm, progress)
    if "interrupted" in status.values():
        return {"status": status}
    saes = finished_baselines(root)
    for s in saes.values():
        s.to(lm.device)
    data_cfg, batch_list, _ = eval_batches(sae, lm, opts)
    matrix = fvu_matrix(saes, lm, run_layers, batch_list, data_cfg, progress)
    rows = list(saes)
    write_matrix_csv(root / "fvu_matrix.csv", matrix, rows, run_layers)
    fvu_matrix_figure(matrix, rows, run_layers, root / "fvu_matrix.png")
    return {"status": status, "train_layers": rows, "eval_layers": run_layers,
            "matrix": matrix.tolist(), "csv": str(root / "fvu_matrix.csv"),
            "png": str(root / "fvu_matrix.png")}


# ---- CLI ---------------------------------------------------------------------------------
def format_matrix(res: dict) -> str:
    cols = res["eval_layers"]
    lines = ["FVU (rows: layer trained on, columns: layer evaluated on)",
             "train\\eval " + " ".join(f"{c:>7}" for c in cols)]
    for layer, values in zip(res["train_layers"], res["matrix"]):
        lines.append(f"{layer:>10} " + " ".join(f"{v:>7.3f}" for v in values))
    return "\n".join(lines)


def _cmd_baselines(args: argparse.Namespace) -> int:
    res = baselines(args.run, layers=args.layers, opts=text_options(args),
                    revision=getattr(args, "revision", None),
                    blocks=getattr(args, "blocks", None))
    for layer, what in res["status"].items():
        print(f"layer {layer}: {what}")
    if "matrix" not in res:
        print(f"interrupted: checkpoint saved; continue with: mlsae baselines {args.run}",
              file=sys.stderr)
        return 130
    print(format_matrix(res))
    print(f"wrote {res['csv']} and {res['png']}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae baselines` on the subparsers object `sub`."""
    p = sub.add_parser(
        "baselines", help="train single-layer SAEs like the run's MLSAE; FVU transfer matrix",
        description="Train one single-layer SAE per layer of an MLSAE run (same width, k, "
        "tokens, data and seed) into <run>/baselines/layer_<l>, resumably, then write the "
        "train-layer x eval-layer FVU matrix (fvu_matrix.csv, fvu_matrix.png).")
    p.add_argument("run", help="the MLSAE's run folder")
    p.add_argument("--layers", help="train baselines only for these of the run's layers "
                   "(all, 0,3,7, 0-29:2; default: all)")
    add_text_options(p, tokens=MATRIX_TOKENS)
    add_dataclass_options(p, TrainConfig, only=("revision", "blocks"))
    # Baselines must see the activations the MLSAE saw: the LM dtype defaults to the run's.
    p.set_defaults(dtype=None)
    for action in p._actions:
        if action.dest == "dtype":
            action.help = "LM dtype (default: the run's)"
    p.set_defaults(func=_cmd_baselines)

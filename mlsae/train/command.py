"""The `mlsae train` command: flags from the config dataclasses, then `train()`, then the
held-out table. Uses options and the train package."""

from __future__ import annotations

import argparse
import sys

from mlsae import config as C
from mlsae.options import add_dataclass_options, build_config
from mlsae.train.run import train


def format_layer_table(summary: dict) -> str:
    pl = summary["per_layer"]
    lines = [f"held-out tokens: {summary['tokens']}  dead fraction: "
             f"{summary['dead_fraction']:.3f}",
             f"{'layer':>5} {'FVU':>8} {'MSE':>10} {'L0':>7} {'alive':>7}"]
    for i, layer in enumerate(summary["layers"]):
        lines.append(f"{layer:>5} {pl['fvu'][i]:>8.4f} {pl['mse'][i]:>10.4g} "
                     f"{pl['l0'][i]:>7.2f} {pl['alive'][i]:>7d}")
    m = summary["mean"]
    lines.append(f"{'mean':>5} {m['fvu']:>8.4f} {m['mse']:>10.4g} {m['l0']:>7.2f}")
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "resume", "sweep")}
    resume = getattr(args, "resume", None)
    cfg = None
    if resume is None:
        cfg = C.RunConfig(build_config(C.SAEConfig, given), build_config(C.DataConfig, given),
                          build_config(C.TrainConfig, given))
    result = train(cfg, resume=resume, given=given, sweep=getattr(args, "sweep", None))
    run_dir = result["run_dir"]
    if not result["finished"]:
        print(f"interrupted ({result['stopped_by']}): checkpoint saved; continue with: "
              f"mlsae train --resume {run_dir}", file=sys.stderr)
        return 143 if result["stopped_by"] == "SIGTERM" else 130
    for folder, summary in zip(result["runs"], result["summaries"]):
        print(f"run folder: {folder}")
        if summary is not None:
            print(format_layer_table(summary))
    return 0


def add_commands(sub) -> None:
    """Register `mlsae train` on the subparsers object `sub`."""
    p = sub.add_parser("train", help="train (or resume) a multi-layer SAE",
                       description="Train a multi-layer SAE. With no options: SmolLM2-135M, "
                       "all 30 layers, CPython's pydoc text, offline.")
    p.add_argument("--resume", metavar="DIR", default=argparse.SUPPRESS,
                   help="continue an interrupted run from its folder (weights, optimizer, "
                   "dead-latent counters, RNG and data position); other flags must agree "
                   "with the run's config")
    p.add_argument("--sweep", metavar="SPEC", default=argparse.SUPPRESS,
                   help='train every combination, e.g. "k=16,32,64 expansion_factor=8,16", '
                   "from ONE LM forward per batch; each into <out>/<name> (resumable together "
                   "with --resume <out>, or one by one)")
    for cls in (C.SAEConfig, C.DataConfig, C.TrainConfig):
        add_dataclass_options(p, cls)
    p.set_defaults(func=_cmd_train)

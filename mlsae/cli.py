"""The `mlsae` command. Each subcommand is a thin wrapper over a Python function.

Options are generated from the config dataclasses: a field's docstring is its --help text
and its default is the only default.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from simple_parsing.docstring import get_attribute_docstring

from mlsae import config as C
from mlsae.errors import TrainingDiverged, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_type(f) -> tuple[type, bool]:
    """(base type, is bool) from an annotation string such as 'float | None'."""
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = ann.replace(" ", "").split("|")[0]
    table = {"int": int, "float": float, "str": str, "bool": bool}
    if base not in table:
        raise TypeError(f"unsupported option type {ann}")
    return table[base], base == "bool"


def _number(kind: type):
    def parse(text: str):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if kind is int:
            if v != int(v):
                raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
            return int(v)
        return v

    parse.__name__ = kind.__name__
    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()):
    """One --flag per field; defaults are SUPPRESSed so we know which flags were given."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, is_bool = _field_type(f)
        doc = " ".join((get_attribute_docstring(cls, f.name).docstring_below or "").split())
        default = f.default if f.default is not MISSING else None
        shown = "" if default is None else f" (default: {default})"
        help_text = f"{doc}{shown}".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if is_bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            typ = _number(kind) if kind in (int, float) else kind
            group.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())


def build_config(cls, given: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in names})


# ---- subcommands ------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from mlsae.train import RunConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "resume")}
    resume = getattr(args, "resume", None)
    given.pop("sweep", None)
    cfg = None
    if resume is None:
        cfg = RunConfig(build_config(C.SAEConfig, given), build_config(C.DataConfig, given),
                        build_config(C.TrainConfig, given))
    result = train(cfg, resume=resume, given=given, sweep=getattr(args, "sweep", None))
    run_dir = result["run_dir"]
    if not result["finished"]:
        print(f"interrupted: checkpoint saved; continue with: mlsae train --resume {run_dir}",
              file=sys.stderr)
        return 130
    for folder, summary in zip(result["runs"], result["summaries"]):
        print(f"run folder: {folder}")
        if summary is not None:
            print(format_layer_table(summary))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from mlsae.cache import write_cache

    given = vars(args)
    out = write_cache(args.model, args.out, args.tokens, layers=args.layers,
                      data=build_config(C.DataConfig, given), store_dtype=args.store_dtype,
                      batch_size=args.batch_size, seed=args.seed,
                      shard_sequences=args.shard_sequences, device=args.device,
                      dtype=args.dtype)
    print(f"activation cache: {out}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlsae", description="Multi-layer sparse autoencoders: train one "
                     "TopK SAE on the residual stream of every layer of a causal LM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    p = sub.add_parser("cache", help="write resid_post activations to disk for training",
                       description="Stream training text through the LM once and store the "
                       "resid_post of the chosen layers (included positions only) in shards; "
                       "train on it with `mlsae train --activations DIR`.")
    p.add_argument("--out", required=True, help="cache folder (must not hold a cache)")
    p.add_argument("--model", default=C.TrainConfig.model, help="language model (default: "
                   f"{C.TrainConfig.model})")
    p.add_argument("--layers", default="all", help="layers, as for train (default: all)")
    p.add_argument("--tokens", type=_number(int), default=100_000,
                   help="packed tokens to cache (default: 100000)")
    p.add_argument("--store-dtype", default="float16",
                   help="float16, bfloat16 or float32 (default: float16)")
    p.add_argument("--batch-size", type=int, default=C.TrainConfig.batch_size,
                   help="sequences per LM forward; use the training --batch-size to "
                   f"reproduce a streaming run exactly (default: {C.TrainConfig.batch_size})")
    p.add_argument("--seed", type=int, default=0, help="data-order seed, as for train "
                   "(default: 0)")
    p.add_argument("--shard-sequences", type=int, default=64,
                   help="sequences per shard file (default: 64)")
    p.add_argument("--device", default="auto", help="torch device (default: auto)")
    p.add_argument("--dtype", default="float32", help="LM dtype (default: float32)")
    add_dataclass_options(p, C.DataConfig)
    p.set_defaults(func=_cmd_cache)
    # Other subcommands register themselves here (each module: add_commands(sub)).
    from mlsae import baselines, compare, evaluate

    for module in (evaluate, baselines, compare):
        module.add_commands(sub)
    import importlib  # by module path: mlsae.analysis re-exports functions named like these

    for name in ("analyze", "resid_sim", "mmcs", "examples", "report"):
        importlib.import_module(f"mlsae.analysis.{name}").add_commands(sub)
    importlib.import_module("mlsae.server").add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        if "mlsae.distributed" in sys.modules:  # torchrun: leave the group while all ranks live
            sys.modules["mlsae.distributed"].shutdown()
        return code
    except UserError as e:
        print(f"mlsae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"mlsae {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlsae {args.command}: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mlsae examples --show ... | head`: the reader left
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

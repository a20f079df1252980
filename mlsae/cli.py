"""The `mlsae` command: one subcommand per module that offers one (its `add_commands(sub)`),
each a thin wrapper over a Python function. Errors a user caused print one line and exit 2.

The top of the tree: it may import any module; none imports it.
"""

from __future__ import annotations

import importlib
import sys

from mlsae.errors import CheckpointError, TrainingDiverged, UserError
from mlsae.options import Parser

# Modules with an `add_commands(sub)`, in the order `mlsae --help` lists them.
COMMAND_MODULES = (
    "mlsae.train.command",
    "mlsae.activations.cache",
    "mlsae.evaluate",
    "mlsae.baselines",
    "mlsae.compare",
    "mlsae.pareto",
    "mlsae.export",
    "mlsae.analysis.analyze",
    "mlsae.analysis.resid_sim",
    "mlsae.analysis.mmcs",
    "mlsae.analysis.examples",
    "mlsae.analysis.features",
    "mlsae.analysis.report",
    "mlsae.synth",
    "mlsae.lens",
    "mlsae.circuits.command",
    "mlsae.server",
)


def version() -> str:
    """The installed mlsae's version (its package metadata, from pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("mlsae")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> Parser:
    parser = Parser(prog="mlsae", description="Multi-layer sparse autoencoders: train one "
                    "TopK SAE on the residual stream of every layer of a causal LM.")
    parser.add_argument("--version", action="version", version=f"mlsae {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        if "mlsae.train.distributed" in sys.modules:  # torchrun: leave the group while all live
            sys.modules["mlsae.train.distributed"].shutdown()
        return code
    except UserError as e:
        print(f"mlsae {args.command}: error: {e.cli_message()}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError) as e:
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

"""Command-line options shared by the subcommands: argparse flags generated from the config
dataclasses (a field's docstring is its --help, its default the only default) and the text
options of every command that streams text through a trained run. Uses mlsae.config only.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields

from simple_parsing.docstring import get_attribute_docstring


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, with no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_type(f) -> tuple[type, bool]:
    """(base type, is bool) from an annotation string such as 'float | None'."""
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = ann.replace(" ", "").split("|")[0]
    table = {"int": int, "float": float, "str": str, "bool": bool}
    if base not in table:
        raise TypeError(f"unsupported option type {ann}")
    return table[base], base == "bool"


def number(kind: type):
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


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                          only: tuple[str, ...] | None = None):
    """One --flag per field (`only`: just these); defaults are SUPPRESSed so we know which
    flags were given."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in fields(cls):
        if f.name in skip or f.name in getattr(cls, "NOT_FLAGS", ()):
            continue
        if only is not None and f.name not in only:
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
            typ = number(kind) if kind in (int, float) else kind
            group.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())


def build_config(cls, given: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in names})


@dataclass
class TextOptions:
    """Options shared by every command that streams text through a trained run."""

    dataset: str | None = None
    """`pydoc`, a .txt/.jsonl/.parquet file or folder, or a datasets hub id; None: the run's
    held-out split (never trained on)."""
    split: str | None = None
    """Split of a hub dataset (None: the run's)."""
    text_column: str | None = None
    """Text column of .jsonl/.parquet files and hub datasets (None: the run's)."""
    ctx_len: int | None = None
    """Tokens per sequence (None: the run's)."""
    tokens: int = 100_000
    """Tokens to stream; fewer if the text runs out (the command says so)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    model: str | None = None
    """Language model (None: the run's)."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    dtype: str = "float32"
    """The LM's dtype."""


def add_text_options(parser: argparse.ArgumentParser, tokens: int = 100_000) -> None:
    g = parser.add_argument_group("text", "Which text is streamed (default: the run's "
                                  "held-out split, never trained on).")
    g.add_argument("--dataset", help="`pydoc`, a .txt/.jsonl/.parquet file or folder, or a "
                   "datasets hub id; all of it is used (default: the run's held-out split)")
    g.add_argument("--split", help="split of a hub dataset (default: the run's)")
    g.add_argument("--text-column", help="text column (default: the run's)")
    g.add_argument("--ctx-len", type=int, help="tokens per sequence (default: the run's)")
    g.add_argument("--tokens", type=lambda s: int(float(s)), default=tokens,
                   help=f"tokens to stream; fewer if the text runs out (default: {tokens})")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass "
                   "(default: 8)")
    g.add_argument("--model", help="language model (default: the run's)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    g.add_argument("--dtype", default="float32", help="LM dtype: float32, bfloat16, float16, "
                   "or auto (bfloat16 where the device computes it natively, as in training) "
                   "(default: float32)")


def text_options(args: argparse.Namespace) -> TextOptions:
    return TextOptions(**{k: getattr(args, k) for k in TextOptions.__dataclass_fields__
                          if hasattr(args, k)})

"""The registry of checkpoint formats: each format module registers a reader (and may register
an exporter) by name, so a new format is a new function, not a branch. Uses errors only.

A reader takes a folder and hints and returns a `Checkpoint`: the config in mlsae's own
config.json vocabulary (`d_model`, `n_latents`, `k`, `standardize`, `eps`, `norm_convention`,
`model`, `layers`, ...) and the four tensors in mlsae's layout (`W_enc [d_model, n_latents]`,
`b_enc`, `W_dec [n_latents, d_model]`, `b_dec`). Building the MLSAE is `mlsae.sae`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from mlsae.errors import NotFound, UserError


@dataclass
class Checkpoint:
    """What a reader found: mlsae's config keys, and the tensors (None when only the config
    was asked for)."""

    config: dict
    tensors: dict[str, Tensor] | None = None
    format: str = "mlsae"


@dataclass
class Hints:
    """What a folder may not say by itself: the LM (`model`), the `layers`, and where it came
    from (`source`: a hub repo id or path, whose name may follow a convention)."""

    model: str | None = None
    layers: list[int] | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict)


Reader = Callable[[Path, Hints, bool], Checkpoint]


@dataclass
class Format:
    name: str
    detect: Callable[[Path], bool]
    read: Reader
    description: str = ""


FORMATS: dict[str, Format] = {}
EXPORTERS: dict[str, Callable] = {}


def config_keys(folder: Path, unreadable: bool) -> set[str] | bool:
    """The top-level keys of `folder/config.json` for format detection: False when there is
    no such file, `unreadable` when it is not a JSON object (a detector that owns broken
    configs answers True, so its reader reports the error)."""
    path = folder / "config.json"
    if not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return unreadable
    return set(cfg) if isinstance(cfg, dict) else unreadable


def register(name: str, detect: Callable[[Path], bool], description: str = ""):
    """Decorator: register `read(folder, hints, tensors) -> Checkpoint` as format `name`,
    recognised by `detect(folder)`. Formats are tried in registration order."""

    def wrap(read: Reader) -> Reader:
        FORMATS[name] = Format(name, detect, read, description)
        return read

    return wrap


def register_exporter(name: str):
    """Decorator: register `export(sae, out_dir, **options) -> dict` as format `name`."""

    def wrap(fn):
        EXPORTERS[name] = fn
        return fn

    return wrap


def detect(folder: str | Path) -> str | None:
    """The name of the first registered format that recognises `folder`, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for fmt in FORMATS.values():
        if fmt.detect(folder):
            return fmt.name
    return None


def read(folder: str | Path, format: str | None = None, hints: Hints | None = None,
         tensors: bool = True) -> Checkpoint:
    """Read a checkpoint folder in `format` (None: detected; a folder no format recognises is
    read as mlsae's own, whose reader says what is missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"checkpoint {str(folder)!r}: no such folder")
    name = format or detect(folder) or "mlsae"
    if name not in FORMATS:
        raise UserError(f"unknown checkpoint format {name!r}: choose one of "
                        f"{', '.join(FORMATS)}")
    ck = FORMATS[name].read(folder, hints or Hints(), tensors)
    ck.format = name
    if tensors:
        check_shapes(folder, ck)
    return ck


def check_shapes(folder: Path, ck: Checkpoint) -> None:
    d, n = int(ck.config["d_model"]), int(ck.config["n_latents"])
    want = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    for name, shape in want.items():
        t = ck.tensors.get(name)
        if t is None or tuple(t.shape) != shape:
            got = tuple(t.shape) if t is not None else "missing"
            raise UserError(
                f"checkpoint {str(folder)!r}: tensor {name} is {got}, expected {shape}")


def layer_from_name(name: str) -> int | None:
    """The block index at the end of a module path or folder name (`model.layers.15`,
    `layers.3`, `layer_7`), or None."""
    import re

    m = re.search(r"(?:^|[._-])(\d+)$", name)
    return int(m.group(1)) if m else None

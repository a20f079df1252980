"""mlsae's own checkpoint format: `config.json` + `model.safetensors` with exactly `W_enc`,
`b_enc`, `W_dec`, `b_dec`, plus `threshold` for the architectures that have one (docs/guides/
training.md, "What a run writes"). Uses the format registry and errors.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from mlsae.errors import UserError
from mlsae.formats.registry import Checkpoint, Hints, config_keys, register


def is_native(folder: Path) -> bool:
    keys = config_keys(folder, unreadable=True)  # ours is the reader that says it is broken
    return keys if isinstance(keys, bool) else "d_model" in keys


@register("mlsae", is_native, "mlsae's own: config.json + model.safetensors")
def read_native(folder: Path, hints: Hints, tensors: bool = True) -> Checkpoint:
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise UserError(f"checkpoint {str(folder)!r}: missing {name}")
    try:
        cfg = json.loads((folder / "config.json").read_text())
        for key in ("d_model", "n_latents", "k"):
            cfg[key] = int(cfg[key])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {str(folder)!r}: bad config.json ({e})") from None
    if hints.model and not cfg.get("model"):
        cfg["model"] = hints.model
    if hints.layers and not cfg.get("layers"):
        cfg["layers"] = list(hints.layers)
    if not tensors:
        return Checkpoint(cfg)
    return Checkpoint(cfg, load_tensors(folder / "model.safetensors", folder))


def load_tensors(path: Path, folder: Path) -> dict:
    """All tensors of a safetensors file; a truncated or garbled file is one line."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {str(folder)!r}: corrupt {path.name} ({e})") from None

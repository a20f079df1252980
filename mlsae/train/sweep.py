"""Sweeps: several SAE configs trained from one LM forward per batch. Uses config and errors.

`"k=16,32 expansion_factor=8"` expands to one config per combination; only options that do
not change the activation stream (the SAE's shape and the optimisation) may vary.
"""

from __future__ import annotations

import itertools

from mlsae import config as C
from mlsae.errors import UserError

SWEEPABLE = {"expansion_factor", "k", "standardize", "lr", "auxk", "auxk_coef", "dead_tokens",
             "lr_decay", "warmup_steps", "sae_matmul_dtype", "arch", "threshold_lr", "l0_coef",
             "l0_warmup", "bandwidth"}
_SHORT = {"expansion_factor": "x", "arch": ""}


def parse_sweep(spec: str) -> list[dict]:
    """`"k=16,32 expansion_factor=8,16"` -> one override dict per combination."""
    axes = []
    for part in spec.split():
        key, _, values = part.partition("=")
        key = key.replace("-", "_")
        if key not in SWEEPABLE or not values:
            raise UserError(f"--sweep {part!r}: use key=v1,v2 with key one of "
                            f"{', '.join(sorted(SWEEPABLE))} (the LM and data are shared)")
        section = C.SAEConfig if key in C.SAEConfig.__dataclass_fields__ else C.TrainConfig
        typ = section.__dataclass_fields__[key].type
        axes.append([(key, _parse_value(v, str(typ), part)) for v in values.split(",")])
    if not axes:
        raise UserError("--sweep is empty")
    return [dict(combo) for combo in itertools.product(*axes)]


def _parse_value(text: str, typ: str, part: str):
    try:
        if typ.startswith("bool"):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if typ.startswith("int"):
            return int(float(text))
        if typ.startswith("float"):
            return float(text)
        return text
    except ValueError:
        raise UserError(f"--sweep {part!r}: bad value {text!r}") from None


def sweep_name(override: dict) -> str:
    return "-".join(f"{_SHORT.get(k, k)}{v}" for k, v in override.items())


def with_overrides(cfg, override: dict):
    """A copy of RunConfig `cfg` with the swept values set."""
    new = type(cfg).from_dict(cfg.to_dict())
    for key, value in override.items():
        setattr(new.sae if hasattr(new.sae, key) else new.train, key, value)
    return new

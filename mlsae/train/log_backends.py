"""Where training metrics go besides metrics.jsonl: TensorBoard and Weights & Biases, chosen
with `--log` (`jsonl`, the default, needs nothing; `tensorboard`, `wandb`, or both as
`tensorboard,wandb`). Uses errors only; the optional packages are imported when asked for.

Every backend gets the same row the JSONL file gets and logs the same scalars at its `step`:
`loss`, `fvu_mean`, `auxk_loss`, `dead_fraction`, `lr`, `tokens_per_s`, `tokens`, and per
layer `fvu/layer_<l>` and `l0/layer_<l>` (l = the LM block). TensorBoard writes event files
to `<run>/tensorboard/`; W&B logs to project `mlsae` (`WANDB_PROJECT` overrides), run name =
the run folder's name, files under `<run>/wandb/`, and works offline with
`WANDB_MODE=offline` (no account needed).
"""

from __future__ import annotations

import os
from pathlib import Path

from mlsae.errors import UserError

SCALARS = ("loss", "fvu_mean", "auxk_loss", "dead_fraction", "lr", "tokens_per_s", "tokens")


def scalars(row: dict) -> dict[str, float]:
    """The scalars of one metrics.jsonl row, per-layer lists spread out by layer."""
    out = {k: float(row[k]) for k in SCALARS if row.get(k) is not None}
    for name in ("fvu", "l0"):
        for layer, v in zip(row.get("layers", []), row.get(name, [])):
            out[f"{name}/layer_{layer}"] = float(v)
    return out


class TensorBoardLog:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs the tensorboard package: pip install "
                            "'mlsae[logging]' (or tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        for tag, v in scalars(row).items():
            self.writer.add_scalar(tag, v, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("--log wandb needs the wandb package: pip install "
                            "'mlsae[logging]' (or wandb)") from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlsae"),
                              name=run_dir.name, dir=str(run_dir), config=config,
                              resume="allow", reinit="create_new")

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardLog, "wandb": WandbLog}


def parse(spec: str | None) -> list[str]:
    """`jsonl`, `tensorboard`, `wandb` or a comma list -> the extra backends' names."""
    names = [s.strip() for s in (spec or "jsonl").split(",") if s.strip()]
    bad = [n for n in names if n != "jsonl" and n not in BACKENDS]
    if bad:
        raise UserError(f"--log {spec!r}: choose from jsonl, {', '.join(BACKENDS)} "
                        "(comma-separated)")
    return [n for n in names if n != "jsonl"]


def open_backends(spec: str | None, run_dir: Path, config: dict) -> list:
    """The extra backends named by `spec` (metrics.jsonl is always written by the trainer)."""
    return [BACKENDS[name](Path(run_dir), config) for name in parse(spec)]

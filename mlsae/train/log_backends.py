"""Where training metrics go besides metrics.jsonl: TensorBoard and Weights & Biases, chosen
with `--log` (`jsonl`, the default, needs nothing; `tensorboard`, `wandb`, or both as
`tensorboard,wandb`). Uses errors only; the optional packages are imported when asked for.

Every backend gets the same row the JSONL file gets and logs the same scalars at its `step`:
`loss`, `fvu_mean`, `auxk_loss`, `dead_fraction`, `lr`, `tokens_per_s`, `tokens`, and per
layer `fvu/layer_<l>` and `l0/layer_<l>` (l = the LM block). TensorBoard writes event files
to `<run>/tensorboard/`; W&B logs to project `mlsae` (`WANDB_PROJECT` overrides), run name =
the run folder's name, files under `<run>/wandb/`, and works offline with
`WANDB_MODE=offline` (no account needed). The W&B run id is kept in `<run>/wandb_run_id`, so
`mlsae train --resume` continues the same W&B run (`resume="allow"`) instead of starting one.

A bad `log` value names the field for Python callers (`TrainConfig.log ...`) and the flag on
the command line (`--log ...`): `OptionError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlsae.errors import OptionError

FIELD = "TrainConfig.log"
WANDB_RUN_ID = "wandb_run_id"  # in the run folder: the W&B run that --resume continues
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
            raise OptionError(FIELD, "{option} tensorboard needs the tensorboard package: "
                              "pip install 'mlsae[logging]' (or tensorboard)") from None
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
            raise OptionError(FIELD, "{option} wandb needs the wandb package: pip install "
                              "'mlsae[logging]' (or wandb)") from None
        id_file = run_dir / WANDB_RUN_ID  # written by the first start, read on --resume
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlsae"),
                              name=run_dir.name, dir=str(run_dir), config=config,
                              id=run_id, resume="allow", reinit="create_new")
        if run_id != self.run.id:
            id_file.write_text(self.run.id + "\n")

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
        raise OptionError(FIELD, f"{{option}} {spec!r}: choose from jsonl, "
                          f"{', '.join(BACKENDS)} (comma-separated)")
    return [n for n in names if n != "jsonl"]


def open_backends(spec: str | None, run_dir: Path, config: dict) -> list:
    """The extra backends named by `spec` (metrics.jsonl is always written by the trainer)."""
    return [BACKENDS[name](Path(run_dir), config) for name in parse(spec)]

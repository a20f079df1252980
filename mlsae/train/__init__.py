"""Training: the loss (`loss`), one SAE's optimizer state (`trainer`), the loop and the
held-out summary (`loop`), checkpoint I/O (`checkpoint`), run planning with resume and
sweeps (`plan`, `sweep`), torchrun glue (`distributed`), `train()` itself (`run`) and the
`mlsae train` command (`command`).

Uses config, data, activations, the LM adapter, the SAE and metrics; nothing above them.
"""

from mlsae.config import RunConfig
from mlsae.train.plan import RESUME_FREE, read_run_config
from mlsae.train.run import train, train_apart, train_plan
from mlsae.train.trainer import Trainer

__all__ = ["RESUME_FREE", "RunConfig", "Trainer", "read_run_config", "train", "train_apart",
           "train_plan"]

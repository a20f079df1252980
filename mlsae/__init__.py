"""mlsae: multi-layer sparse autoencoders (one TopK SAE over every layer's residual stream).

Public names: `MLSAE` (the SAE), the configs `SAEConfig`, `DataConfig`, `TrainConfig`,
`RunConfig`. Training is `mlsae.train.train`; every command is a function in its module.
"""

from mlsae.config import DataConfig, RunConfig, SAEConfig, TrainConfig
from mlsae.sae import MLSAE

__all__ = ["MLSAE", "DataConfig", "RunConfig", "SAEConfig", "TrainConfig"]

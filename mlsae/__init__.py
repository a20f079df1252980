"""mlsae: multi-layer sparse autoencoders (one TopK SAE over every layer's residual stream)."""

from mlsae.config import DataConfig, SAEConfig, TrainConfig
from mlsae.sae import MLSAE

__all__ = ["MLSAE", "SAEConfig", "DataConfig", "TrainConfig", "train"]


def train(*args, **kwargs):
    """See `mlsae.train.train`."""
    from mlsae.train import train as _train

    return _train(*args, **kwargs)

"""Tokens -> the resid_post vectors the SAE sees: `[layer, token, d_model]`, included only.
Uses the LM adapter and data."""

from __future__ import annotations

from torch import Tensor

from mlsae.config import DataConfig
from mlsae.data import include_mask
from mlsae.errors import TrainingDiverged
from mlsae.lm import LanguageModel


def batch_activations(lm: LanguageModel, input_ids: Tensor, layers: list[int],
                      data_cfg: DataConfig, device=None) -> tuple[Tensor, Tensor]:
    """Returns `x [layer, token, d_model]` (float32, included positions of the batch flattened
    in row-major order) and the include mask `[batch, seq]`."""
    mask = include_mask(input_ids, lm.special_ids, data_cfg)
    resid = lm.resid_post(input_ids, layers)  # [layer, batch, seq, d_model]
    x = resid[:, mask.to(resid.device)].float()
    if device is not None:
        x = x.to(device)
    return x, mask


def check_finite(x: Tensor, what: str, step: int) -> None:
    if not x.isfinite().all():
        raise TrainingDiverged(f"non-finite {what} at step {step}; stopped, last good "
                               "checkpoint kept")

"""Tokens -> the resid_post vectors the SAE sees: `[layer, token, d_model]`, included only.
Also the massive-activation ("outlier") rule and its tally. Uses the LM adapter and data.

Outliers. Beyond position 0 some tokens carry residual norms hundreds of times the layer's
median (SmolLM2: 26,000 against a median of 137 at layer 12). A token is an outlier at a
layer when its norm exceeds FACTOR x the median norm of that layer over the included tokens
of the same batch. With `--exclude-outliers FACTOR` (> 0) a token that is an outlier at ANY
of the layers is excluded like position 0: never trained on, never counted in a metric
(every command takes its positions from here or from `exclude_outliers`). Whatever the
setting, `outlier_tally` counts per layer the included tokens above REPORT_FACTOR x the
median, for `mlsae eval` and `mlsae analyze` to report.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from mlsae.config import DataConfig
from mlsae.data import include_mask
from mlsae.errors import TrainingDiverged
from mlsae.lm import LanguageModel

REPORT_FACTOR = 10.0
_TALLIES: list[OutlierTally] = []


class OutlierTally:
    """Per layer: included tokens above REPORT_FACTOR x the layer's median norm; and tokens
    removed by --exclude-outliers."""

    def __init__(self):
        self.counts: Tensor | None = None  # [layer]
        self.included = 0
        self.excluded = 0
        self.factor = 0.0

    def add(self, over: Tensor, included: int, excluded: int, factor: float) -> None:
        c = over.sum(-1).cpu().long()
        self.counts = c if self.counts is None else self.counts + c
        self.included += included
        self.excluded += excluded
        self.factor = factor

    def result(self, layers: list[int]) -> dict:
        counts = self.counts.tolist() if self.counts is not None else [0] * len(layers)
        return {"factor_reported": REPORT_FACTOR, "layers": list(layers),
                "per_layer": counts, "included_tokens": self.included,
                "exclude_outliers": self.factor, "excluded_tokens": self.excluded,
                "definition": f"included tokens whose resid_post norm exceeds "
                              f"{REPORT_FACTOR:g}x the layer's median norm over the included "
                              "tokens of the same batch (counted before --exclude-outliers "
                              "removes any)"}


@contextmanager
def outlier_tally():
    """Count outliers of every batch captured inside the block (all threads)."""
    tally = OutlierTally()
    _TALLIES.append(tally)
    try:
        yield tally
    finally:
        _TALLIES.remove(tally)


def outliers(resid: Tensor, mask: Tensor, factor: float) -> Tensor:
    """`[layer, token]` bool over the included tokens (`resid[:, mask]` order): norm above
    `factor` x the layer's median norm over those tokens."""
    norms = resid[:, mask.to(resid.device)].float().norm(dim=-1)  # [layer, token]
    if norms.shape[1] == 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    med = norms.median(dim=1, keepdim=True).values
    return norms > factor * med


def exclude_outliers(resid: Tensor, mask: Tensor, cfg: DataConfig) -> Tensor:
    """The include mask `[batch, seq]` without the outlier tokens of --exclude-outliers
    (unchanged when it is 0); counts the batch in every active `outlier_tally`."""
    factor = float(getattr(cfg, "exclude_outliers", 0.0) or 0.0)
    if not factor and not _TALLIES:
        return mask
    included = int(mask.sum())
    drop = None
    if factor > 0:
        drop = outliers(resid, mask, factor).any(0)  # [token]
    if _TALLIES:
        over = outliers(resid, mask, REPORT_FACTOR)
        for t in _TALLIES:
            t.add(over, included, int(drop.sum()) if drop is not None else 0, factor)
    if drop is None or not drop.any():
        return mask
    new = mask.clone()
    rows, cols = mask.nonzero(as_tuple=True)
    new[rows[drop.to(mask.device)], cols[drop.to(mask.device)]] = False
    return new


def batch_activations(lm: LanguageModel, input_ids: Tensor, layers: list[int],
                      data_cfg: DataConfig, device=None) -> tuple[Tensor, Tensor]:
    """Returns `x [layer, token, d_model]` (float32, included positions of the batch flattened
    in row-major order) and the include mask `[batch, seq]` (outliers removed when
    --exclude-outliers is set)."""
    mask = include_mask(input_ids, lm.special_ids, data_cfg)
    resid = lm.resid_post(input_ids, layers)  # [layer, batch, seq, d_model]
    mask = exclude_outliers(resid, mask, data_cfg)
    x = resid[:, mask.to(resid.device)].float()
    if device is not None:
        x = x.to(device)
    return x, mask


class LayerBatch(NamedTuple):
    """One batch's activations for runs on DIFFERENT layer subsets sharing one LM forward
    (the single-layer baselines): `x [layer, token, d_model]` at the positions included before
    the outlier rule, `outlier [layer, token]` (None without --exclude-outliers) and the LM
    blocks of the rows. `select(blocks)` gives exactly what `batch_activations` gives a run on
    `blocks` alone: its outlier rule looks only at its own layers."""

    x: Tensor
    outlier: Tensor | None
    layers: list[int]

    def select(self, blocks: list[int]) -> Tensor:
        """`[len(blocks), token, d_model]`: the rows of `blocks`, without their outliers."""
        rows = [self.layers.index(b) for b in blocks]
        x = self.x if rows == list(range(len(self.layers))) else self.x[rows]
        if self.outlier is None:
            return x
        keep = ~self.outlier[rows].any(0)
        return x if bool(keep.all()) else x[:, keep]


def layer_batch(lm: LanguageModel, input_ids: Tensor, layers: list[int], data_cfg: DataConfig,
                device=None) -> LayerBatch:
    """Like `batch_activations`, but the outlier rule is left for `LayerBatch.select`."""
    mask = include_mask(input_ids, lm.special_ids, data_cfg)
    resid = lm.resid_post(input_ids, layers)  # [layer, batch, seq, d_model]
    factor = float(getattr(data_cfg, "exclude_outliers", 0.0) or 0.0)
    out = outliers(resid, mask, factor) if factor > 0 else None
    x = resid[:, mask.to(resid.device)].float()
    if device is not None:
        x = x.to(device)
        out = out.to(device) if out is not None else None
    return LayerBatch(x, out, list(layers))


def check_finite(x: Tensor, what: str, step: int) -> None:
    if not x.isfinite().all():
        raise TrainingDiverged(f"non-finite {what} at step {step}; stopped, last good "
                               "checkpoint kept")

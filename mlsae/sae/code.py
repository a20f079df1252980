"""The codes an SAE produces and what its forward passes return: `SparseCode` (the interface
analyses, splicing, the explorer and export consume), `ForwardOutput`, `TrainOutput`. Uses
torch only.

A code is `acts, idx [..., width]`: the active latents of each vector and their ids. TopK
codes have width k; threshold architectures give a variable number per vector, padded with
acts == 0 (any id) to the widest vector of one `encode` call. "Active" always means acts > 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCode(NamedTuple):
    """Sparse code of a batch of vectors: `acts`/`idx` are `[..., k]`; `mu`/`std` are `[..., 1]`
    (the per-vector standardization, needed to map a reconstruction back)."""

    acts: Tensor
    idx: Tensor
    mu: Tensor
    std: Tensor

    def dense(self, n_latents: int) -> Tensor:
        """The code as a dense `[..., n_latents]` tensor (zeros off the k selected latents),
        for patching: edit it and map it back with `MLSAE.decode_dense(dense, code)`."""
        out = self.acts.new_zeros(*self.acts.shape[:-1], n_latents)
        # scatter_add: padding slots (acts 0, any id) must never overwrite a real entry
        return out.scatter_add_(-1, self.idx, self.acts)


def stack_codes(codes: list[SparseCode]) -> SparseCode:
    """Stack codes of separate `encode` calls along a new leading dim, padding each to the
    widest (acts 0, id 0): threshold architectures give codes of different widths."""
    width = max(c.acts.shape[-1] for c in codes)

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, width - t.shape[-1]))

    return SparseCode(torch.stack([pad(c.acts) for c in codes]),
                      torch.stack([pad(c.idx) for c in codes]),
                      torch.stack([c.mu for c in codes]), torch.stack([c.std for c in codes]))


class ForwardOutput(NamedTuple):
    """What `MLSAE.forward` returns: the reconstruction in the original space, the code, and
    (training only) the AuxK pre-activations of dead latents with their ids."""

    x_hat: Tensor  # [..., d_model], original (un-standardized) space
    code: SparseCode
    aux_acts: Tensor | None  # [N, auxk] pre-activations of dead latents (ReLU'd), training only
    aux_idx: Tensor | None



class TrainOutput(NamedTuple):
    """What `MLSAE.forward_train` returns: per-vector errors (full code and each Matryoshka
    prefix), the standardized residual, the code, AuxK's inputs, the penalty and the rule's
    inference-threshold statistic."""

    err: Tensor  # [N] squared reconstruction error of each vector, original space
    resid: Tensor  # [N, d_model] reconstruction - input, standardized space (no grad)
    code: SparseCode
    aux_acts: Tensor | None
    aux_idx: Tensor | None
    prefix_err: list[Tensor] = []  # [N] errors of each nested prefix but the last (Matryoshka)
    penalty: Tensor | None = None  # [N] differentiable sparsity penalty (JumpReLU's L0)
    level: Tensor | None = None  # the batch statistic the rule's threshold tracks (`arch.level`)

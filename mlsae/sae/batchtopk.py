"""`batchtopk`: the k x N largest ReLU'd pre-activations over a whole training batch of N
(token, layer) vectors, so a vector may use 0 or many latents (Bussmann et al. 2024).
Inference: one threshold theta for every latent, the running average of the smallest kept
activation per training batch (`arch.RunningThreshold`); SAELens saves it as `jumprelu` with
`threshold [d_sae]` all equal to theta. In a torchrun job each rank's budget is k x its own
vectors, and theta takes the minimum over ranks.
"""

from __future__ import annotations

from mlsae.sae.arch import RunningThreshold, register
from mlsae.sae.ops import Selection, group_topk


@register
class BatchTopK(RunningThreshold):
    """A global budget of k per vector on average over the batch."""

    name = "batchtopk"

    def select(self, sae, xc, *, train, n_layers, matmul_dtype, dead, auxk) -> Selection:
        if not train:
            return super().select(sae, xc, train=train, n_layers=n_layers,
                                  matmul_dtype=matmul_dtype, dead=dead, auxk=auxk)
        return group_topk(xc, sae.W_enc, sae.b_enc, sae.k, None, matmul_dtype, dead, auxk)

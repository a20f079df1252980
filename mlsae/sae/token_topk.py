"""`token-topk`, the cross-layer budget: for each token, the k x L largest ReLU'd
pre-activations over its L layer vectors together, so a latent fires at the layers where it
matters for that token instead of k latents at every layer.

Two inference forms: `MLSAE.encode_layers(x [layer, token, d])` applies the same per-token
rule (all layers of a token encoded together, as in training); a single vector alone
(`encode`, splicing one layer) uses one threshold theta, a running average over training
batches (as BatchTopK's) of the level that keeps as many entries over the whole batch as the
per-token budgets kept: the k x N-th largest z+ of the batch (exact, by the same candidate
re-scan as the budgets). The smallest kept activation, BatchTopK's statistic, would be the
LOWEST token's threshold and keep ~4x too many latents per vector (measured on the tiny test
model).
"""

from __future__ import annotations

from torch import Tensor

from mlsae.sae.arch import RunningThreshold, register
from mlsae.sae.ops import Selection, group_topk


@register
class TokenTopK(RunningThreshold):
    """A budget of k x L per token, shared by its L layers."""

    name = "token-topk"
    per_token = True

    def active_rule(self, sae, per_token: bool = False) -> str:
        if not per_token:
            return super().active_rule(sae)
        return (f"token-topk: the k x L = {sae.k} x L largest ReLU'd pre-activations over "
                "each token's L layer vectors together, acts > 0")

    def level(self, sel: Selection, acts) -> Tensor:
        """The k x N-th largest z+ of the batch (`group_topk`'s level), not the smallest
        kept activation (module docstring)."""
        return sel.level.clamp_min(0)

    def select(self, sae, xc, *, train, n_layers, matmul_dtype, dead, auxk) -> Selection:
        if n_layers is None:  # vectors without their token's other layers: threshold form
            return super().select(sae, xc, train=train, n_layers=n_layers,
                                  matmul_dtype=matmul_dtype, dead=dead, auxk=auxk)
        return group_topk(xc, sae.W_enc, sae.b_enc, sae.k, n_layers, matmul_dtype, dead,
                          auxk)

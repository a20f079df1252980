"""`topk`: every (token, layer) vector keeps exactly its k largest pre-activations, ReLU'd
(Gao et al. 2024; the MLSAE paper's rule). The same rule trains and infers; no extra tensors.
"""

from __future__ import annotations

from mlsae.sae.arch import Architecture, register


@register
class TopK(Architecture):
    """k active latents per vector, at every layer."""

    name = "topk"

"""Tokens -> activations: the resid_post vectors the SAE sees (`capture`), and the on-disk
activation cache that stores them once for many trainings (`cache`).

Uses the LM adapter and data; nothing above them.
"""

from mlsae.activations.capture import LayerBatch, batch_activations, check_finite, layer_batch

__all__ = ["LayerBatch", "batch_activations", "check_finite", "layer_batch"]

"""Text -> tokens: where documents come from (`sources`), how they become packed sequences
and which positions count (`packing`), and the train / held-out split (`split`).

Data flows one way: this package knows nothing of models, activations or SAEs.
"""

from mlsae.data.packing import batches, include_mask, pack
from mlsae.data.sources import TEXT_SUFFIXES, hub_documents, local_documents
from mlsae.data.split import TokenSource, is_holdout

__all__ = ["TEXT_SUFFIXES", "TokenSource", "batches", "hub_documents", "include_mask",
           "is_holdout", "local_documents", "pack"]

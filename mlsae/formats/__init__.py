"""Checkpoint formats: mlsae's own, the seed paper's (tim-lawson/mlsae), SAELens and sparsify,
each a module that registers a reader (and SAELens an exporter) in `registry`. Uses errors,
the LM adapter (model shapes, block paths) and safetensors; never the SAE class itself
(`mlsae.sae` builds the MLSAE from what a reader returns).

    from mlsae.formats import detect, read, export
    read("some/folder")            # Checkpoint(config, tensors, format), format detected
    FORMATS, EXPORTERS             # by name; a new format is a new module with a reader
"""

from mlsae.formats import native, saelens, seed, sparsify  # noqa: F401  (they register)
from mlsae.formats.registry import (
    EXPORTERS,
    FORMATS,
    Checkpoint,
    Hints,
    detect,
    read,
)

__all__ = ["EXPORTERS", "FORMATS", "Checkpoint", "Hints", "detect", "export", "read"]


def export(sae, out, format: str = "saelens", **options) -> dict:
    """Write `sae` to folder `out` in `format` (see EXPORTERS)."""
    from mlsae.errors import UserError

    if format not in EXPORTERS:
        raise UserError(f"unknown export format {format!r}: choose one of "
                        f"{', '.join(EXPORTERS)}")
    return EXPORTERS[format](sae, out, **options)

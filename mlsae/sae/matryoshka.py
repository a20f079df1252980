"""`matryoshka`: BatchTopK selection, trained so that nested prefixes of the dictionary
(latents < m_1 < m_2 < ... < n_latents) each reconstruct the input on their own (Bussmann et
al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

Loss: the mean over the prefixes of each prefix's reconstruction FVU (per layer, averaged over
layers), + AuxK on the full code. Equal weights as in the paper (which sums them); divided by
the number of prefixes so that the loss stays on the FVU scale the default learning rate and
the AuxK coefficient were tuned for. `matryoshka_widths`: the prefixes, as fractions of
n_latents (<= 1) or latent counts; n_latents itself is always the last.
"""

from __future__ import annotations

from mlsae.sae.arch import register
from mlsae.sae.batchtopk import BatchTopK


def parse_widths(spec, n_latents: int) -> list[int]:
    """`"0.0625,0.25,1"` or `[288, 1152]` -> increasing latent counts ending at n_latents."""
    from mlsae.errors import UserError

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        vals = [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise UserError(f"--matryoshka-widths {spec!r}: use fractions 0.0625,0.25,1 or "
                        "latent counts 288,1152") from None
    widths = [round(v * n_latents) if v <= 1 else int(v) for v in vals]
    widths = [w for w in widths if w < n_latents] + [n_latents]
    if any(w <= 0 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
        raise UserError(f"--matryoshka-widths {spec!r}: widths must be positive and "
                        f"increasing (n_latents {n_latents})")
    return widths


@register
class Matryoshka(BatchTopK):
    """BatchTopK whose prefixes of the dictionary must each reconstruct."""

    name = "matryoshka"
    options = {**BatchTopK.options, "matryoshka_widths": "0.0625,0.25,1"}

    def prefixes(self, sae) -> list[int]:
        return parse_widths(self.opts["matryoshka_widths"], sae.n_latents)


"""The feature view of a latent, as SAE dashboards (SAEDashboard, Neuronpedia) show it: its
logit effect and its activation density per layer; `mlsae features` writes both for every
latent. Uses analysis.codes (the streaming loop), the LM adapter and the SAE; matplotlib for
the report's figure.

Logit effect of latent f: `unembed(final_norm(W_dec[f])) - unembed(final_norm(0))`, the
direction's direct effect on the next-token logits (the final norm and the unembedding applied
to the decoder row itself; subtracting the zero vector's logits removes a LayerNorm's bias).
Positive scales of the direction (W_dec rows live in the SAE's standardized space; the SAE
adds them times each vector's std) change no ranking: the top and bottom tokens are the ones
the latent promotes and suppresses. This is SAEDashboard's "logit weights" (W_dec @ W_U with
the norm's gain folded in) up to a positive factor per latent.

Activation density: per (layer, latent), a histogram of the latent's NONZERO activations over
the included positions of the streamed text, in DENSITY_BINS log-spaced bins from 10^LOG_LO to
10^LOG_HI (values outside go to the end bins).

Writes `<run>/analysis/features.safetensors`: `density [layer, n_latents, bins]` (int32),
`bin_edges [bins + 1]`, `logit_top_ids`, `logit_top_values`, `logit_bottom_ids`,
`logit_bottom_values` `[n_latents, top]`; metadata `layers`, `tokens`, `included_tokens`; and
`features_vocab.json` ({token id: text} of every listed token).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mlsae.analysis.codes import RUN_HELP, analysis_dir, open_run, token_strings
from mlsae.errors import UserError
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions, add_text_options, text_options

FEATURES = Path("analysis") / "features.safetensors"
VOCAB = Path("analysis") / "features_vocab.json"
DENSITY_BINS, LOG_LO, LOG_HI = 20, -2.0, 2.0
FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Gemma, SmolLM
    "model.language_model.norm",
    "language_model.model.norm",
    "transformer.ln_f",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.final_layer_norm",  # Pythia
    "model.decoder.final_layer_norm",  # OPT
    "transformer.norm_f",  # MPT
    "model.transformer.norm_f",
)


def bin_edges() -> Tensor:
    return torch.logspace(LOG_LO, LOG_HI, DENSITY_BINS + 1, dtype=torch.float64)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied between the last block and the unembedding."""
    for path in FINAL_NORM_PATHS:
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.Module):
            return m
    raise UserError(f"cannot find the final norm of {type(model).__name__} (known paths: "
                    f"{', '.join(FINAL_NORM_PATHS)})")


@torch.inference_mode()
def logit_effects(lm: LanguageModel, directions: Tensor, top: int = 10, chunk: int = 256
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logit effect of each row of `directions [n, d_model]` (module docstring) -> the `top`
    promoted (values, ids) and the `top` suppressed (values, ids), each `[n, top]`."""
    norm, head = final_norm(lm.model), lm.model.get_output_embeddings()
    p = next(head.parameters())
    zero = head(norm(torch.zeros(1, 1, directions.shape[1], dtype=p.dtype, device=p.device)))
    zero = zero.reshape(-1).float()
    outs = []
    for s in range(0, len(directions), chunk):
        v = directions[s:s + chunk].to(p.device, p.dtype)[None]  # [1, n, d]: one "sequence"
        eff = head(norm(v))[0].float() - zero
        k = min(top, eff.shape[-1])
        hi, lo = eff.topk(k, dim=-1), eff.topk(k, dim=-1, largest=False)
        outs.append((hi.values.cpu(), hi.indices.cpu(), lo.values.cpu(), lo.indices.cpu()))
    return tuple(torch.cat([o[i] for o in outs]) for i in range(4))


class DensityHistogram:
    """Streaming counts of nonzero activations per (layer, latent, log-spaced bin)."""

    def __init__(self, n_layers: int, n_latents: int):
        self.n_layers, self.n_latents = n_layers, n_latents
        self.counts = torch.zeros(n_layers, n_latents * DENSITY_BINS, dtype=torch.long)

    def update(self, acts: Tensor, idx: Tensor) -> None:
        """`acts, idx [layer, ..., k]` (zeros: inactive or excluded, not counted)."""
        for i in range(self.n_layers):
            a, f = acts[i].reshape(-1).double().cpu(), idx[i].reshape(-1).cpu()
            on = a > 0
            a, f = a[on], f[on]
            b = ((a.log10() - LOG_LO) / (LOG_HI - LOG_LO) * DENSITY_BINS).floor().long()
            flat = f * DENSITY_BINS + b.clamp(0, DENSITY_BINS - 1)
            self.counts[i] += torch.bincount(flat, minlength=self.counts.shape[1])

    def result(self) -> Tensor:
        return self.counts.view(self.n_layers, self.n_latents, DENSITY_BINS)


def features(run: str | Path, opts: TextOptions | None = None, lm: LanguageModel | None = None,
             top: int = 10, progress: bool = True) -> dict:
    """Write the feature-view file of a run (module docstring); returns a summary."""
    opts = opts or TextOptions()
    rc = open_run(run, opts, lm)
    hist = DensityHistogram(rc.n_layers, rc.sae.n_latents)
    batch_list, tokens = rc.text()
    included = 0
    for _, _ids, acts, idx, mask in rc.stream(batch_list, "features", progress):
        hist.update(acts, idx)
        included += int(mask.sum())
    W = rc.sae.W_dec.detach().float()
    top_v, top_i, bot_v, bot_i = logit_effects(rc.lm, W, top)
    out = analysis_dir(rc.run_dir)
    meta = {"layers": json.dumps(rc.layers), "tokens": str(tokens),
            "included_tokens": str(included)}
    save_file({"density": hist.result().to(torch.int32), "bin_edges": bin_edges(),
               "logit_top_ids": top_i, "logit_top_values": top_v,
               "logit_bottom_ids": bot_i, "logit_bottom_values": bot_v},
              str(out / FEATURES.name), metadata=meta)
    ids = sorted(set(top_i.flatten().tolist()) | set(bot_i.flatten().tolist()))
    vocab = dict(zip(ids, token_strings(rc.lm.tokenizer, ids)))
    (out / VOCAB.name).write_text(json.dumps(vocab))
    return {"path": str(out / FEATURES.name), "tokens": tokens, "included_tokens": included,
            "layers": rc.layers}


def read_latent(run: str | Path, latent: int) -> dict | None:
    """One latent's entries of `features.safetensors` (None when the file is missing):
    {"layers", "bin_edges", "density" [layer][bin], "top"/"bottom": [(text, value)]}."""
    path = Path(run) / FEATURES
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        res = {"layers": json.loads(meta.get("layers", "[]")),
               "included_tokens": int(meta.get("included_tokens", 0)),
               "bin_edges": f.get_tensor("bin_edges").tolist(),
               "density": f.get_slice("density")[:, latent:latent + 1][:, 0].tolist()}
        parts = {key: f.get_slice(key)[latent:latent + 1][0].tolist() for key in
                 ("logit_top_ids", "logit_top_values", "logit_bottom_ids",
                  "logit_bottom_values")}
    vocab_path = Path(run) / VOCAB
    vocab = json.loads(vocab_path.read_text()) if vocab_path.is_file() else {}
    for side in ("top", "bottom"):
        res[side] = [(vocab.get(str(i), f"#{i}"), v) for i, v in
                     zip(parts[f"logit_{side}_ids"], parts[f"logit_{side}_values"])]
    return res


def density_figure(density: list[list[int]], edges: list[float], layers: list[int],
                   path: Path, title: str) -> None:
    """Layers x activation bins, shaded by the share of the layer's nonzero activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = np.asarray(density, dtype=float)
    share = d / np.maximum(d.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 0.25 * len(layers) + 1.2))
    ax.imshow(share, aspect="auto", cmap="Blues", origin="lower",
              extent=(np.log10(edges[0]), np.log10(edges[-1]), -0.5, len(layers) - 0.5))
    ax.set_yticks(range(len(layers)), [str(v) for v in layers], fontsize=6)
    ax.set_xlabel("log10 activation (nonzero)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def feature_html(run: str | Path, out: Path, latent: int, per_layer: int = 1,
                 has_examples: bool = True) -> str:
    """The report's feature view of one latent (self-contained HTML; its figure written to
    `out`): logit effect, activation density per layer, top examples per layer."""
    import html

    from mlsae.analysis.examples import show_examples

    esc = html.escape
    parts = []
    got = read_latent(run, latent)
    if got is None:
        parts.append(f"<p class=note>Logit effect and activation density: run <code>mlsae "
                     f"features {esc(str(run))}</code>.</p>")
    else:
        def side(title: str, rows: list) -> str:
            cells = "".join(f"<tr><td><code>{esc(t).replace(chr(10), '&#8629;')}</code></td>"
                            f"<td>{v:+.2f}</td></tr>" for t, v in rows)
            return f"<table><tr><th colspan=2>{title}</th></tr>{cells}</table>"

        name = f"latent_{latent}_density.png"
        density_figure(got["density"], got["bin_edges"], got["layers"], out / name,
                       f"latent {latent}: nonzero activations per layer")
        parts.append("<h4>Logit effect</h4><p class=note>W_dec[latent] through the final norm "
                     "and the unembedding: the next tokens it promotes and suppresses.</p>"
                     f'<div class="row">{side("promotes", got["top"][:8])}'
                     f'{side("suppresses", got["bottom"][:8])}</div>'
                     "<h4>Activation density per layer</h4><p class=note>Histogram of the "
                     "latent's nonzero activations at each layer (share of the layer's "
                     f"activations per log-spaced bin), over {got['included_tokens']} "
                     f'tokens.</p><img src="{name}" alt="activation density of latent '
                     f'{latent} per layer">')
    if has_examples:
        rows = []
        by_layer: dict[int, list] = {}
        for ex in show_examples(run, latent):
            by_layer.setdefault(int(ex["layer"]), []).append(ex)
        for layer, found in sorted(by_layer.items()):
            for ex in found[:per_layer]:
                peak = max(max(ex["context_acts"]), 1e-12)
                spans = "".join(
                    f'<{"b" if i == ex["max_index"] else "span"} style="background:rgba(255,'
                    f'140,0,{min(a / peak, 1):.2f})">{esc(t).replace(chr(10), "&#8629;")}'
                    f'</{"b" if i == ex["max_index"] else "span"}>'
                    for i, (t, a) in enumerate(zip(ex["tokens"], ex["context_acts"])))
                rows.append(f'<div class="ex">layer {layer} &nbsp; {ex["activation"]:.3f} '
                            f"&nbsp; {spans}</div>")
        parts.append("<h4>Top examples per layer</h4>"
                     + ("".join(rows) or "<p class=note>none stored</p>"))
    return "".join(parts)


# ---- CLI ---------------------------------------------------------------------------------
def _cmd_features(args: argparse.Namespace) -> int:
    res = features(args.run, text_options(args), top=args.top)
    print(f"wrote {res['path']} ({res['included_tokens']} included tokens, "
          f"{len(res['layers'])} layers)")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae features` on the subparsers object `sub`."""
    p = sub.add_parser(
        "features", help="per-latent logit effect and activation density per layer",
        description="For every latent: the tokens its decoder direction promotes and "
        "suppresses through the final norm and unembedding, and a histogram of its nonzero "
        "activations at each layer over held-out text -> <run>/analysis/features.safetensors "
        "(shown by mlsae serve's latent view and mlsae report).")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--top", type=int, default=10, help="tokens per side (default: 10)")
    add_text_options(p, tokens=50_000)
    p.set_defaults(func=_cmd_features)

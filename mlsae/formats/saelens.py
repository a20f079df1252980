"""SAELens folders (`cfg.json` + `sae_weights.safetensors`; SPEC §8): read one as a single-layer
SAE, and export an MLSAE as one SAELens TopK SAE per layer (`DIR/layer_<l>/`) that
`sae_lens.SAE.load_from_disk` loads. Uses the format registry, errors and the LM adapter (for
the Hugging Face module path of the blocks).

Conventions. SAELens' `normalize_activations="layer_norm"` takes the unbiased std s_u, divides
by (s_u + eps) and un-standardizes with s_u (no eps): mlsae's "unbiased_eps_div". mlsae's own
convention takes the population std s_p = s_u / c, c = sqrt(d / (d - 1)), with eps on both
sides. With  W_enc' = c W_enc,  b_enc' = b_enc,  W_dec' = W_dec / c,  b_dec' = b_dec / c:
  encoder: (x~_u - b_dec') W_enc' + b_enc' = (c x~_u - b_dec) W_enc + b_enc, and
           c x~_u = (x - mu) / (s_p + eps / c), mlsae's x~ up to eps (1 - 1/c) / s_p
           (relative 1e-8 / s_p for d = 576): the same pre-activations, the same latents;
  decoder: (a W_dec' + b_dec') s_u = (a W_dec + b_dec) s_p, mlsae's output up to its
           un-standardizing factor (s_p + eps) / s_p: a relative difference of eps / s_p.
The mapping is exact in the weights; what remains is eps / std of each vector (1e-5 / std).
An SAE already in the "unbiased_eps_div" convention (the seed's) exports unchanged, and a
SAELens folder reads back in that convention exactly.

Other SAELens options are folded into the weights on reading: `apply_b_dec_to_input: false`
(b_enc += b_dec W_enc) and `rescale_acts_by_decoder_norm` (W_enc and b_enc times the decoder
row norms, W_dec rows divided by them; a threshold compares with the rescaled
pre-activations, so it is unchanged).

Architectures. Read: `topk`; `jumprelu` (inference folders, `threshold [d_sae]`, or an older
`log_threshold`); the training folders `batchtopk` (`topk_threshold`, a scalar) and
`matryoshka_batchtopk` (also `matryoshka_widths`), both read in their threshold inference
form. Export: `topk` as `topk` with `k`; every other mlsae architecture as SAELens does for
BatchTopK and Matryoshka, `jumprelu` with its `threshold [d_sae]` (all equal to theta for the
running-threshold rules; token-topk's per-token rule has no SAELens form, its single-vector
threshold form is what is exported). The pre-activations are the same in both conventions, so
thresholds carry over unchanged; an mlsae folder records its own architecture in the metadata
and reads back as it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlsae.errors import UserError
from mlsae.formats.native import load_tensors
from mlsae.formats.registry import (
    Checkpoint,
    Hints,
    layer_from_name,
    register,
    register_exporter,
)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# SAELens architecture -> the mlsae architecture it is read as
READ_ARCHS = {"topk": "mlsae_topk", "jumprelu": "mlsae_jumprelu",
              "batchtopk": "mlsae_batchtopk", "matryoshka_batchtopk": "mlsae_matryoshka"}
SAELENS_VERSION = "6.0.0"  # the cfg.json layout written (SAELens >= 6 reads it as is)
SAELENS_EPS = 1e-5  # fixed in SAELens' layer_norm


def is_saelens(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def hook_layer(hook: str | None) -> int | None:
    """The block whose output a TransformerLens hook name is: `blocks.<l>.hook_resid_post` ->
    l, `blocks.<l>.hook_resid_pre` -> l - 1; None for other hooks."""
    if not hook:
        return None
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer = int(parts[1])
        if parts[2] == "hook_resid_post":
            return layer
        if parts[2] == "hook_resid_pre" and layer > 0:
            return layer - 1
    return None


@register("saelens", is_saelens, "SAELens: cfg.json + sae_weights.safetensors")
def read_saelens(folder: Path, hints: Hints, tensors: bool = True) -> Checkpoint:
    try:
        raw = json.loads((folder / CFG).read_text())
        meta = dict(raw.get("metadata") or {})
        for key in ("model_name", "hook_name", "hook_point", "context_size", "prepend_bos",
                    "hf_hook_name"):  # SAELens < 6 kept these at the top level
            if key in raw and key not in meta:
                meta[key] = raw[key]
        meta.setdefault("hook_name", meta.get("hook_point"))
        arch = raw.get("architecture")
        k = raw.get("k")
        if arch is None and raw.get("activation_fn") == "topk":  # SAELens < 6
            arch, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k")
        d, n = int(raw["d_in"]), int(raw["d_sae"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {str(folder)!r}: bad SAELens cfg.json ({e})") from None
    if arch not in READ_ARCHS or (arch != "jumprelu" and k is None):
        raise UserError(f"checkpoint {str(folder)!r}: SAELens architecture {arch!r}; mlsae "
                        f"reads {', '.join(READ_ARCHS)}")
    norm = raw.get("normalize_activations") or "none"
    if norm not in ("none", "layer_norm"):
        raise UserError(f"checkpoint {str(folder)!r}: normalize_activations {norm!r} is not "
                        "supported (none or layer_norm)")
    if raw.get("reshape_activations", "none") != "none":
        raise UserError(f"checkpoint {str(folder)!r}: a hook_z SAE, not a residual-stream one")
    ours = meta.get("mlsae") or {}
    layer = hook_layer(meta.get("hook_name"))
    if layer is None and meta.get("hf_hook_name"):
        layer = layer_from_name(meta["hf_hook_name"])
    layers = hints.layers or ([layer] if layer is not None else None)
    if meta.get("hook_name") and layer is None and not hints.layers:
        raise UserError(f"checkpoint {str(folder)!r}: hook {meta['hook_name']!r} is not the "
                        "residual stream after a block (blocks.<l>.hook_resid_post)")
    seqpos = meta.get("seqpos_slice") or [None]
    cfg = dict(ours.get("config") or {})  # an mlsae export carries its run's config
    ours_arch = (ours.get("config") or {}).get("architecture")
    cfg.update({"d_model": d, "n_latents": n,
                "k": int(k if k is not None else cfg.get("k") or 1),
                "architecture": ours_arch if arch == "jumprelu" and ours_arch
                else READ_ARCHS[arch],
                "standardize": norm == "layer_norm", "eps": SAELENS_EPS,
                "norm_convention": "unbiased_eps_div",
                "expansion_factor": n // d if n % d == 0 else n / d,
                "model": hints.model or meta.get("model_name") or cfg.get("model"),
                "layers": layers, "hook_point": "resid_post",
                "exclude_first": int(seqpos[0] or 0) if "seqpos_slice" in meta
                else cfg.get("exclude_first", 1),
                "exclude_special": bool(meta.get("exclude_special_tokens",
                                                 cfg.get("exclude_special", True))),
                "source_format": "saelens", "saelens_metadata": meta})
    if meta.get("context_size"):
        cfg["ctx_len"] = int(meta["context_size"])
    if not tensors:
        return Checkpoint(cfg)
    t = load_tensors(folder / WEIGHTS, folder)
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in t]
    if missing:
        raise UserError(f"checkpoint {str(folder)!r}: {WEIGHTS} lacks {', '.join(missing)}")
    W_enc, b_enc = t["W_enc"].float(), t["b_enc"].float()
    W_dec, b_dec = t["W_dec"].float(), t["b_dec"].float()
    if raw.get("apply_b_dec_to_input", True) is False:
        b_enc = b_enc + b_dec @ W_enc  # mlsae always subtracts b_dec before the encoder
    if raw.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch != "topk":
        out["threshold"] = saelens_threshold(t, n, folder)
    if arch == "matryoshka_batchtopk" and raw.get("matryoshka_widths"):
        cfg["matryoshka_widths"] = ",".join(str(int(w)) for w in raw["matryoshka_widths"])
    return Checkpoint(cfg, out)


def saelens_threshold(t: dict, n: int, folder: Path) -> torch.Tensor:
    """`threshold [d_sae]` from a SAELens state dict: `threshold`, `log_threshold` (older
    JumpReLU folders) or BatchTopK's scalar `topk_threshold`."""
    if "threshold" in t:
        return t["threshold"].float().reshape(n)
    if "log_threshold" in t:
        return t["log_threshold"].float().exp().reshape(n)
    if "topk_threshold" in t:
        return torch.full((n,), float(t["topk_threshold"].float().reshape(-1)[0]))
    raise UserError(f"checkpoint {str(folder)!r}: {WEIGHTS} has no threshold")


# ---- export ----------------------------------------------------------------------------------
def saelens_weights(sae) -> dict[str, torch.Tensor]:
    """The SAE's tensors in SAELens' conventions (see the module docstring): unchanged for an
    "unbiased_eps_div" SAE or one that does not standardize, rescaled by c = sqrt(d/(d-1))
    for mlsae's convention."""
    t = {n: getattr(sae, n).detach().float().cpu() for n in sae.tensor_names}
    if sae.standardize and sae.norm_convention == "mlsae":
        c = math.sqrt(sae.d_model / (sae.d_model - 1))
        t.update({"W_enc": t["W_enc"] * c, "b_enc": t["b_enc"], "W_dec": t["W_dec"] / c,
                  "b_dec": t["b_dec"] / c})
    if "threshold" in t:  # the gate compares z itself: a negative theta would pass z < 0
        t["threshold"] = t["threshold"].clamp_min(0)
    return {n: v.contiguous() for n, v in t.items()}


def hf_blocks_path(model: str | None, recorded: str | None = None) -> str | None:
    """The dotted module path of `model`'s decoder blocks (e.g. `model.layers`), from the
    run's record, else from the model's config alone (the model is built on the meta
    device, no weights); None when that is impossible (offline, unknown model)."""
    if recorded or not model:
        return recorded
    from mlsae.lm import find_blocks, peek_config

    try:
        from transformers import AutoModelForCausalLM

        cfg = peek_config(model)
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(cfg)
        blocks = find_blocks(net)
        return next(name for name, m in net.named_modules() if m is blocks)
    except Exception:  # any failure only costs the optional HF hook name
        return None


@register_exporter("saelens")
def export_saelens(sae, out: str | Path, layers: list[int] | None = None,
                   blocks_path: str | None = None) -> dict:
    """Write `out/layer_<l>/{cfg.json, sae_weights.safetensors}` for each of the SAE's
    layers (or `layers`). Returns {"folders": [...], "layers": [...]}."""
    run = sae.config.get("run") or {}
    data, train = run.get("data") or {}, run.get("train") or {}
    all_layers = sae.layers or []
    layers = list(layers) if layers is not None else all_layers
    if not layers:
        raise UserError("the SAE names no layers to export (its config has no `layers`)")
    model = sae.config.get("model")
    blocks_path = hf_blocks_path(model, blocks_path or train.get("blocks"))
    weights = saelens_weights(sae)
    out = Path(out)
    exclude_first = int(sae.config.get("exclude_first", data.get("exclude_first", 1)))
    prepend_bos = data.get("prepend_bos")
    folders = []
    for layer in layers:
        folder = out / f"layer_{layer}"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": model,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hf_hook_name": f"{blocks_path}.{layer}" if blocks_path else None,
            "hook_head_index": None,
            "context_size": data.get("ctx_len"),
            # mlsae packs documents joined with EOS; BOS starts a sequence only when the
            # run's data config says so. Position(s) < exclude_first were never trained on.
            "prepend_bos": bool(prepend_bos) if prepend_bos is not None else False,
            "seqpos_slice": [exclude_first, None],
            "exclude_special_tokens": bool(sae.config.get("exclude_special", True)),
            "dataset_path": data.get("dataset"),
            "mlsae": {
                "shared_dictionary": True,
                "note": "one multi-layer SAE: every layer_<l> folder holds the same weights",
                "layer": layer,
                "layers": all_layers,
                "folders": [f"layer_{v}" for v in all_layers],
                "norm_convention": sae.norm_convention,
                "weights_rescaled_by": math.sqrt(sae.d_model / (sae.d_model - 1))
                if sae.standardize and sae.norm_convention == "mlsae" else 1.0,
                "config": {k: v for k, v in sae.full_config().items()
                           if k not in ("layers",)},
            },
        }
        cfg = {"d_in": sae.d_model, "d_sae": sae.n_latents, "dtype": "float32",
               "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "layer_norm" if sae.standardize else "none",
               "reshape_activations": "none", "metadata": meta}
        if sae.architecture == "topk":
            cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False, architecture="topk")
        else:  # SAELens' own inference form of BatchTopK / Matryoshka
            cfg["architecture"] = "jumprelu"
        save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
        folders.append(str(folder))
    return {"folders": folders, "layers": layers}

"""EleutherAI sparsify folders (`cfg.json` + `sae.safetensors`, one folder per hookpoint, named
after it, e.g. `layers.15`; SPEC §8), read as single-layer SAEs. Uses the format registry and
errors.

sparsify's forward: pre = ReLU((x - b_dec) @ encoder.weight^T + encoder.bias), top k;
x^ = sum_j a_j W_dec[i_j] + b_dec; no per-vector standardization. In mlsae's layout:
W_enc = encoder.weight^T, b_enc = encoder.bias, standardize off (ReLU then top-k and top-k then
ReLU give the same reconstruction). Transcoders, skip connections and `groupmax` are refused.
The layer is the number ending the folder name; the model comes from the run's `config.json`
one folder up (its `model`), else from hints.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlsae.errors import UserError
from mlsae.formats.native import load_tensors
from mlsae.formats.registry import Checkpoint, Hints, layer_from_name, register

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def is_sparsify(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def _run_model(folder: Path) -> str | None:
    path = folder.parent / "config.json"
    try:
        model = json.loads(path.read_text()).get("model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, str) else None


@register("sparsify", is_sparsify, "EleutherAI sparsify: cfg.json + sae.safetensors")
def read_sparsify(folder: Path, hints: Hints, tensors: bool = True) -> Checkpoint:
    try:
        raw = json.loads((folder / CFG).read_text())
        d = int(raw["d_in"])
        n = int(raw.get("num_latents") or 0) or int(raw.get("expansion_factor", 32)) * d
        k = int(raw.get("k", 32))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {str(folder)!r}: bad sparsify cfg.json ({e})") from None
    for key, bad in (("transcode", True), ("skip_connection", True)):
        if raw.get(key) is bad:
            raise UserError(f"checkpoint {str(folder)!r}: a sparsify {key} model is not an "
                            "SAE mlsae can load")
    if raw.get("activation", "topk") != "topk":
        raise UserError(f"checkpoint {str(folder)!r}: sparsify activation "
                        f"{raw.get('activation')!r}; mlsae reads only topk")
    layer = layer_from_name(folder.name)
    layers = hints.layers or ([layer] if layer is not None else None)
    cfg = {"d_model": d, "n_latents": n, "k": k, "standardize": False, "eps": 1e-5,
           "expansion_factor": n // d if n % d == 0 else n / d,
           "model": hints.model or _run_model(folder), "layers": layers,
           "hook_point": "resid_post", "source_format": "sparsify", "sparsify_config": raw}
    if not tensors:
        return Checkpoint(cfg)
    t = load_tensors(folder / WEIGHTS, folder)
    missing = [name for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
               if name not in t]
    if missing:
        raise UserError(f"checkpoint {str(folder)!r}: {WEIGHTS} lacks {', '.join(missing)}")
    return Checkpoint(cfg, {"W_enc": t["encoder.weight"].float().T.contiguous(),
                            "b_enc": t["encoder.bias"].float(), "W_dec": t["W_dec"].float(),
                            "b_dec": t["b_dec"].float()})

"""The seed paper's checkpoints (tim-lawson/mlsae, `MLSAE.save_pretrained` of its autoencoder):
`model.safetensors` with `encoder.weight [n_latents, d]`, `decoder.weight [d, n_latents]`,
`pre_encoder_bias [d]` (and `last_nonzero`, ignored); `config.json` with its init arguments
(`n_inputs`, `n_latents`, `k`, `dead_steps_threshold`, `dead_threshold`, `auxk`,
`standardize`, maybe `layers`, `lens`). Uses the format registry, errors and the LM adapter
(to count the model's layers).

Its forward, reproduced exactly by norm_convention "unbiased_eps_div": mu = mean, std =
unbiased std, x~ = (x - mu) / (std + 1e-5); latents = (x~ - pre_encoder_bias) @ encoder.weight^T
(no encoder bias); top k, then ReLU; recons = sum_j a_j decoder.weight[:, i_j] +
pre_encoder_bias; x^ = recons * std + mu. It trained on every layer's block output with
special tokens (BOS/EOS/PAD) zeroed and position 0 kept, so the config says so.

The LM and layers come from hints (`model=`, `--model`), or from the hub naming convention
`tim-lawson/mlsae-<model>-x<R>-k<k>` (`pythia-*` -> `EleutherAI/pythia-*`), with all layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlsae.errors import UserError
from mlsae.formats.native import load_tensors
from mlsae.formats.registry import Checkpoint, Hints, config_keys, register

SEED_EPS = 1e-5  # the default of the seed code's standardize()
REPO_NAME = re.compile(r"(?:^|[/\\]|--)mlsae-(?P<model>.+?)-x(?P<x>\d+)-k(?P<k>\d+)"
                       r"(?P<rest>(?:-[a-z]+)*)(?=$|[/\\])")
HUB_OWNERS = {"pythia": "EleutherAI", "gemma": "google", "llama": "meta-llama"}


def is_seed(folder: Path) -> bool:
    keys = config_keys(folder, unreadable=False)
    return not isinstance(keys, bool) and {"n_inputs", "n_latents"} <= keys


def model_from_name(source: str) -> str | None:
    """The LM named by the seed's repo id convention in `source` (a repo id or a path, e.g.
    a hub cache folder `models--tim-lawson--mlsae-pythia-70m-deduped-x64-k32/...`)."""
    m = REPO_NAME.search(source)
    if not m:
        return None
    if m.group("rest"):  # -lens, -tfm: other modules than the plain autoencoder
        raise UserError(f"{source!r} is a seed checkpoint variant ({m.group('rest')[1:]}) "
                        "that mlsae does not load: only the plain autoencoder repos")
    model = m.group("model")
    owner = HUB_OWNERS.get(model.split("-")[0].lower())
    return f"{owner}/{model}" if owner and "/" not in model else model


def all_layers(model: str) -> list[int] | None:
    """Every block of `model` (None when its config cannot be read, e.g. offline)."""
    from mlsae.lm import peek_shape

    try:
        n_layers, _ = peek_shape(model)
    except UserError:
        return None
    return list(range(n_layers))


@register("seed", is_seed, "the seed paper's (tim-lawson/mlsae) config.json + model.safetensors")
def read_seed(folder: Path, hints: Hints, tensors: bool = True) -> Checkpoint:
    try:
        raw = json.loads((folder / "config.json").read_text())
        d, n, k = int(raw["n_inputs"]), int(raw["n_latents"]), int(raw["k"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {str(folder)!r}: bad seed config.json ({e})") from None
    if raw.get("lens"):
        raise UserError(f"checkpoint {str(folder)!r}: a seed MLSAE with a tuned lens "
                        "(encoder_lens/decoder_lens) is not supported")
    model = hints.model or raw.get("model") or model_from_name(hints.source or str(folder))
    layers = hints.layers or raw.get("layers") or (all_layers(model) if model else None)
    cfg = {"d_model": d, "n_latents": n, "k": k, "standardize": bool(raw.get("standardize", True)),
           "eps": SEED_EPS, "norm_convention": "unbiased_eps_div",
           "expansion_factor": n // d if n % d == 0 else n / d, "model": model,
           "layers": [int(v) for v in layers] if layers else None, "hook_point": "resid_post",
           "exclude_first": 0, "exclude_special": True, "source_format": "seed",
           "seed_config": raw}
    if not tensors:
        return Checkpoint(cfg)
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"checkpoint {str(folder)!r}: missing model.safetensors")
    t = load_tensors(folder / "model.safetensors", folder)
    missing = [name for name in ("encoder.weight", "decoder.weight", "pre_encoder_bias")
               if name not in t]
    if missing:
        raise UserError(f"checkpoint {str(folder)!r}: seed model.safetensors lacks "
                        f"{', '.join(missing)}")
    if "encoder.bias" in t:
        raise UserError(f"checkpoint {str(folder)!r}: the seed encoder has no bias, this one "
                        "does: not a seed checkpoint")
    W_enc = t["encoder.weight"].T.contiguous()  # [d, n]
    out = {"W_enc": W_enc, "b_enc": W_enc.new_zeros(W_enc.shape[1]),
           "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["pre_encoder_bias"]}
    return Checkpoint(cfg, out)

"""Run any causal LM with an SAE spliced into its residual stream: the context manager behind
`MLSAE.spliced`. Uses the LM adapter (to find the decoder blocks); the SAE is any object with
mlsae's MLSAE interface (this module does not import `mlsae.sae`, which imports it).

At each chosen layer l, resid_post (block l's output) is replaced by the SAE's reconstruction
at the positions training used: a position is left untouched when it holds a special token
(BOS/EOS/PAD, when the SAE was trained without them) or when it is among the first
`exclude_first` positions of its sequence (counted from the first non-padding token, so left
padding and generation with a KV cache see the same positions as one full forward). Works
with `model(...)` and `model.generate(...)`; the hooks are removed on exit.

Options:
  error=True         add the SAE's error term back: x_hat + (x - x_hat_unedited), so with no
                     latent edits the model's output is unchanged ("reconstruction + error",
                     the identity attribution methods use); with edits, only their effect
                     remains;
  latents={f: s}     multiply latent f's activation by s (0 ablates it) before decoding;
  layers=[...]       default: the SAE's own layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mlsae.errors import UserError
from mlsae.lm import LanguageModel, find_blocks


def _special_ids(model: nn.Module, tokenizer=None) -> list[int]:
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(int(v) for v in (getattr(tokenizer, "all_special_ids", None) or []))
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(cfg, attr, None) if cfg is not None else None
            for one in (v if isinstance(v, (list, tuple)) else [v]):
                if one is not None:
                    ids.add(int(one))
    return sorted(ids)


class _Positions:
    """The include mask of the current forward call, from its input_ids and its positions
    (position_ids, else the attention mask, else the cache length), set by a pre-hook on the
    model and read by the block hooks."""

    def __init__(self, special: list[int], exclude_first: int, exclude_special: bool):
        self.special = torch.tensor(special, dtype=torch.long)
        self.exclude_first, self.exclude_special = exclude_first, exclude_special
        self.mask: Tensor | None = None

    def pre_hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds: no token ids, so only positions can be excluded
            emb = kwargs.get("inputs_embeds")
            shape = emb.shape[:2] if emb is not None else None
        else:
            shape = ids.shape
        if shape is None:
            self.mask = None
            return
        batch, t = shape
        device = ids.device if ids is not None else kwargs["inputs_embeds"].device
        attn = kwargs.get("attention_mask")
        given = kwargs.get("position_ids")
        if isinstance(given, Tensor) and given.dim() == 2 and given.shape[1] == t:
            pos = given.to(device).expand(batch, t)  # generate() passes these, cache or not
        elif isinstance(attn, Tensor) and attn.dim() == 2 and attn.shape[1] >= t:
            pos = (attn.long().cumsum(-1) - 1)[:, -t:]
        else:
            start = 0
            cache_pos = kwargs.get("cache_position")
            past = kwargs.get("past_key_values", kwargs.get("cache"))
            if isinstance(cache_pos, Tensor) and cache_pos.numel():
                start = int(cache_pos.reshape(-1)[0])
            elif past is not None and hasattr(past, "get_seq_length"):
                start = int(past.get_seq_length())
            pos = torch.arange(start, start + t, device=device).expand(batch, t)
        mask = pos >= self.exclude_first
        if ids is not None and self.exclude_special and len(self.special):
            mask &= ~torch.isin(ids, self.special.to(ids.device))
        self.mask = mask


def _edit(sae, x: Tensor, latents: dict[int, float] | None, error: bool) -> Tensor:
    """The SAE's reconstruction of `x [N, d]` (float32), with latent edits and the error
    term as asked."""
    out = sae(x)
    code = out.code
    if not latents and not error:
        return out.x_hat
    x_hat = out.x_hat
    if latents:
        acts = code.acts.clone()
        for f, scale in latents.items():
            acts = torch.where(code.idx == int(f), acts * float(scale), acts)
        edited = sae.postprocess(sae.decode_standardized(acts, code.idx), code.mu, code.std)
    else:
        edited = x_hat
    if error:
        return edited + (x.float() - x_hat)
    return edited


@contextmanager
def spliced(sae, model, layers: list[int] | None = None, *, error: bool = False,
            latents: dict[int, float] | list[int] | None = None,
            exclude_first: int | None = None, exclude_special: bool | None = None,
            tokenizer=None):
    """Within the block, `model` (an HF causal LM or mlsae's LanguageModel) runs with resid_post
    of `layers` replaced by `sae`'s reconstruction (see the module docstring). `latents`: a
    {latent: scale} map, or a list of latents to ablate. `exclude_first`/`exclude_special`
    default to the SAE's training settings."""
    if isinstance(model, LanguageModel):
        net, blocks, tokenizer = model.model, model.blocks, tokenizer or model.tokenizer
    else:
        net, blocks = model, find_blocks(model)
    layers = list(layers) if layers is not None else sae.layers
    if not layers:
        raise UserError("spliced(): say which layers (the SAE's config names none)")
    bad = [v for v in layers if not 0 <= int(v) < len(blocks)]
    if bad:
        raise UserError(f"spliced(): layer {bad[0]} is out of range; the model has "
                        f"{len(blocks)} blocks")
    if isinstance(latents, (list, tuple, set)):
        latents = {int(f): 0.0 for f in latents}
    cfg = sae.config
    positions = _Positions(
        _special_ids(net, tokenizer),
        int(exclude_first if exclude_first is not None else cfg.get("exclude_first", 1)),
        bool(exclude_special if exclude_special is not None
             else cfg.get("exclude_special", True)))

    def block_hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        mask = positions.mask
        if mask is None or mask.shape != h.shape[:2]:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if not bool(mask.any()):
            return output
        with torch.no_grad():
            rows = h[mask]
            new_rows = _edit(sae, rows, latents, error).to(h.dtype)
        new = h.clone()
        new[mask] = new_rows
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    handles = [net.register_forward_pre_hook(positions.pre_hook, with_kwargs=True)]
    try:
        for layer in layers:
            handles.append(blocks[int(layer)].register_forward_hook(block_hook))
        yield model
    finally:
        for h in handles:
            h.remove()

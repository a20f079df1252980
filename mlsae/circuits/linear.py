"""The linearised model: a Llama-style LM with the MLSAE spliced at its layers (plus its error
term), frozen at one prompt. Uses the SAE's public methods, the LM adapter and the data
helpers; nothing in mlsae.circuits above it.

Frozen at their values on the prompt (SPEC §9): every attention pattern, every RMSNorm scale
(the blocks' two norms and the final norm), the SAE's per-vector mu and std, and the SAE's
active set (an active latent's activation is its pre-activation). What remains is linear in
the nodes, except the MLPs in `jacobian` mode. The module offers three views of it:

- `capture`: one clean forward pass recording every frozen quantity and every node's value
  (`Capture`).
- `frozen_forward`: the model's OWN forward with those quantities substituted by hooks
  (q/k projections replaced by their clean outputs, so the softmax gives the clean pattern;
  norms multiplied by their clean inverse RMS; in `frozen-mlp` mode each MLP's output
  replaced by its node value), evaluated at any node values (`Sources`). It is the reference
  for the exactness and bias checks and for the tests (finite differences, autograd).
- `block_vjp`: vector-Jacobian products through one block of the linearised model, written
  out for many gradient vectors at once (the attribution's fast path, `attribution.py`).

Supported: decoder blocks with `input_layernorm`, `self_attn.{q,k,v,o}_proj`,
`post_attention_layernorm` and `mlp` and RMSNorms of the form `weight * x / rms(x)` (Llama,
SmolLM, Mistral, Qwen2, Qwen3); anything else is one UserError.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mlsae.activations.capture import exclude_outliers
from mlsae.data import include_mask
from mlsae.errors import UserError
from mlsae.lm import LanguageModel
from mlsae.sae import MLSAE, SparseCode

MODES = ("jacobian", "frozen-mlp")
BLOCK_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")


def check_supported(lm: LanguageModel) -> None:
    """One line unless every block has the Llama layout this module linearises."""
    name = type(lm.model).__name__
    for b in lm.blocks:
        missing = [p for p in BLOCK_PARTS if not hasattr(b, p)]
        attn = getattr(b, "self_attn", None)
        missing += [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                    if attn is not None and not hasattr(attn, p)]
        extra = [p for p in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
                 if hasattr(b, p)]
        if missing or extra:
            why = f"lacks {missing[0]}" if missing else f"has {extra[0]}"
            raise UserError(f"mlsae graph supports Llama-style blocks (Llama, SmolLM, "
                            f"Mistral, Qwen2, Qwen3); {name}'s block {why}")
        for norm in (b.input_layernorm, b.post_attention_layernorm):
            _check_norm(norm, name)
    _check_norm(lm.final_norm(), name)
    cfg = lm.model.config
    if getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "final_logit_softcapping", None):
        raise UserError(f"mlsae graph: {name} soft-caps its logits (not supported)")


def _check_norm(norm: nn.Module, name: str) -> None:
    if "Gemma" in type(norm).__name__ or not (hasattr(norm, "weight")
                                               and hasattr(norm, "variance_epsilon")):
        raise UserError(f"mlsae graph supports RMSNorms of the form weight * x / rms(x); "
                        f"{name} uses {type(norm).__name__}")


def _inv_rms(norm: nn.Module, x: Tensor) -> Tensor:
    """1 / rms(x) `[..., 1]` as the norm computes it (float32)."""
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


@dataclass
class LayerCode:
    """The SAE at one spliced layer on the prompt: `inc [T]` bool, the code of the included
    positions (`acts, idx [n_inc, width]`, `mu, std [n_inc, 1]`), their error
    `x - x_hat [n_inc, d]`, and resid_post `x [T, d]` (excluded positions keep theirs)."""

    inc: Tensor
    code: SparseCode
    err: Tensor
    x: Tensor


@dataclass
class Capture:
    """Every frozen quantity and node value of one clean forward pass (batch 1, float32).
    Per block b: `attn[b] [H, T, T]` (softmax pattern), `inv1[b], inv2[b] [T, 1]` (inverse
    RMS of the two norms' inputs), `mlp_in[b], mlp_out[b] [T, d]`, `q[b], k[b]` (projection
    outputs, substituted in `frozen_forward`), `resid[b] [T, d]` (block output);
    `emb [T, d]`, `inv_final [T, 1]`, `logits [T, vocab]`; `codes[l]` per spliced layer."""

    ids: Tensor
    layers: list[int]
    attn: list[Tensor] = field(default_factory=list)
    inv1: list[Tensor] = field(default_factory=list)
    inv2: list[Tensor] = field(default_factory=list)
    mlp_in: list[Tensor] = field(default_factory=list)
    mlp_out: list[Tensor] = field(default_factory=list)
    q: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    resid: list[Tensor] = field(default_factory=list)
    emb: Tensor | None = None
    inv_final: Tensor | None = None
    logits: Tensor | None = None
    codes: dict[int, LayerCode] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[1])


@contextmanager
def _eager(net: nn.Module):
    """Eager attention for the duration (the only implementation that returns patterns)."""
    old = getattr(net.config, "_attn_implementation", None)
    if old != "eager":
        net.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old not in (None, "eager"):
            net.set_attn_implementation(old)


@torch.no_grad()
def capture(sae: MLSAE, lm: LanguageModel, ids: Tensor, layers: list[int], data_cfg) -> Capture:
    """The clean pass on `ids [1, T]` with the SAE encoded at `layers` (the run's include mask
    and outlier rule decide the positions it is spliced at, as in training)."""
    check_supported(lm)
    net = lm.model
    if next(net.parameters()).dtype != torch.float32:
        raise UserError("mlsae graph needs the LM in float32 (--dtype float32)")
    ids = ids.to(lm.device)
    cap = Capture(ids=ids, layers=list(layers))
    n = len(lm.blocks)
    slots = {name: [None] * n for name in ("attn", "inv1", "inv2", "mlp_in", "mlp_out", "q",
                                           "k", "resid")}
    handles = []

    def put(name, b, value):
        slots[name][b] = value.detach()[0].float()

    for b, blk in enumerate(lm.blocks):
        at = blk.self_attn
        handles += [
            blk.input_layernorm.register_forward_pre_hook(
                lambda m, a, b=b: put("inv1", b, _inv_rms(m, a[0]))),
            blk.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, b=b: put("inv2", b, _inv_rms(m, a[0]))),
            blk.mlp.register_forward_pre_hook(lambda m, a, b=b: put("mlp_in", b, a[0])),
            blk.mlp.register_forward_hook(lambda m, a, o, b=b: put("mlp_out", b, o)),
            at.q_proj.register_forward_hook(lambda m, a, o, b=b: put("q", b, o)),
            at.k_proj.register_forward_hook(lambda m, a, o, b=b: put("k", b, o)),
            at.register_forward_hook(lambda m, a, o, b=b: put("attn", b, o[1])),
            blk.register_forward_hook(
                lambda m, a, o, b=b: put("resid", b, o[0] if isinstance(o, tuple) else o)),
        ]
    emb: dict[str, Tensor] = {}
    handles.append(net.get_input_embeddings().register_forward_hook(
        lambda m, a, o: emb.__setitem__("emb", o.detach()[0].float())))
    handles.append(lm.final_norm().register_forward_pre_hook(
        lambda m, a: emb.__setitem__("inv", _inv_rms(m, a[0]).detach()[0])))
    try:
        with _eager(net):
            logits = net(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    for name, vals in slots.items():
        setattr(cap, name, vals)
    cap.emb, cap.inv_final, cap.logits = emb["emb"], emb["inv"], logits[0].float()
    mask = include_mask(ids.cpu(), lm.special_ids, data_cfg)
    resid = torch.stack([cap.resid[v] for v in layers])[:, None]  # [layer, 1, T, d]
    mask = exclude_outliers(resid.cpu(), mask, data_cfg)[0].to(ids.device)
    for v in layers:
        x = cap.resid[v]
        code = sae.encode(x[mask])
        err = x[mask] - sae.decode(code)
        cap.codes[v] = LayerCode(inc=mask, code=code, err=err, x=x)
    return cap


# ---- the model's own forward, frozen -----------------------------------------------------
@dataclass
class Sources:
    """Values of the graph's source nodes for `frozen_forward` (None: the clean value).
    Per spliced layer l: `acts[l] [n_inc, width]` (the clean active set's activations),
    `err[l] [n_inc, d]` (error nodes), `exc[l] [T, d]` (the whole vector at excluded
    positions; only those rows are read); `mlp[b] [T, d]` per block (frozen-mlp mode); `emb
    [T, d]`."""

    acts: dict[int, Tensor] = field(default_factory=dict)
    err: dict[int, Tensor] = field(default_factory=dict)
    exc: dict[int, Tensor] = field(default_factory=dict)
    mlp: dict[int, Tensor] = field(default_factory=dict)
    emb: Tensor | None = None


def clean_sources(cap: Capture, mode: str) -> Sources:
    """Every source node at its clean value (tensors of its own, safe to edit)."""
    s = Sources(emb=cap.emb.clone())
    for v, lc in cap.codes.items():
        s.acts[v], s.err[v], s.exc[v] = lc.code.acts.clone(), lc.err.clone(), lc.x.clone()
    if mode == "frozen-mlp":
        s.mlp = {b: o.clone() for b, o in enumerate(cap.mlp_out)}
    return s


def zero_sources(cap: Capture, mode: str) -> Sources:
    """Every source node at zero: the frozen model's output is then its bias terms."""
    s = clean_sources(cap, mode)
    for group in (s.acts, s.err, s.exc, s.mlp):
        for key in group:
            group[key] = torch.zeros_like(group[key])
    s.emb = torch.zeros_like(s.emb)
    return s


def pre_activations(sae: MLSAE, lc: LayerCode, x: Tensor) -> Tensor:
    """Encoder pre-activations `[n_inc, width]` of the layer's clean active set, from an
    incoming resid_post `x [T, d]`, with the clean mu and std (frozen): ((x - mu) / (std +
    eps) - b_dec) @ W_enc + b_enc, the columns of the code's ids."""
    xt = (x[lc.inc].float() - lc.code.mu) / (lc.code.std + sae.eps)
    pre = (xt - sae.b_dec.float()) @ sae.W_enc.float() + sae.b_enc.float()  # [n_inc, n]
    return pre.gather(-1, lc.code.idx)


def active_pre(sae: MLSAE, lc: LayerCode, xt: Tensor) -> Tensor:
    """Encoder pre-activations `[B, n_inc, width]` of the layer's clean active set (the
    columns of its code's ids, row by row) from standardized inputs `xt [B, n_inc, d]`:
    (xt - b_dec) @ W_enc[:, idx] + b_enc[idx], without the dense `[n_inc, n_latents]`."""
    W = sae.W_enc.float().T[lc.code.idx].transpose(1, 2)  # [n_inc, d, width]
    return (torch.einsum("bnd,ndw->bnw", xt - sae.b_dec.float(), W)
            + sae.b_enc.float()[lc.code.idx])


def splice_output(o, lc: LayerCode, recon: Tensor):
    """A block's forward-hook output `o` (a tensor or a tuple) with its included positions
    replaced by `recon [B, n_inc, d] + lc.err`: the SAE spliced in with its clean error."""
    h = o[0] if isinstance(o, tuple) else o
    new = h.float().clone()
    new[:, lc.inc] = recon + lc.err
    res = new.to(h.dtype)
    return (res,) + tuple(o[1:]) if isinstance(o, tuple) else res


@dataclass
class FrozenOut:
    """`frozen_forward`'s result: resid_post arriving at each spliced layer before the SAE
    replaces it (`incoming[l] [T, d]`), each layer's pre-activations (`pre[l]`, clean active
    set) and the logits `[T, vocab]`."""

    incoming: dict[int, Tensor]
    pre: dict[int, Tensor]
    logits: Tensor


@contextmanager
def frozen(lm: LanguageModel, cap: Capture, mlp: dict[int, Tensor] | None = None,
           batch: int = 1):
    """Within the block the LM runs linearised at `cap`'s prompt: q/k projections return
    their clean outputs (so every attention pattern is the clean one), every RMSNorm
    multiplies by its clean inverse RMS, and with `mlp` ({block: [T, d]}) each MLP returns
    that value instead of computing (frozen-mlp mode). `batch`: rows of the forward (each
    row the prompt)."""
    handles = []

    def norm_hook(inv):
        return lambda m, a, o: m.weight * (a[0].float() * inv).to(a[0].dtype)

    for b, blk in enumerate(lm.blocks):
        at = blk.self_attn
        handles += [
            at.q_proj.register_forward_hook(
                lambda m, a, o, b=b: cap.q[b][None].expand(batch, -1, -1)),
            at.k_proj.register_forward_hook(
                lambda m, a, o, b=b: cap.k[b][None].expand(batch, -1, -1)),
            blk.input_layernorm.register_forward_hook(norm_hook(cap.inv1[b][None])),
            blk.post_attention_layernorm.register_forward_hook(norm_hook(cap.inv2[b][None])),
        ]
        if mlp is not None:
            handles.append(blk.mlp.register_forward_hook(lambda m, a, o, b=b: mlp[b][None]))
    handles.append(lm.final_norm().register_forward_hook(norm_hook(cap.inv_final[None])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def frozen_forward(sae: MLSAE, lm: LanguageModel, cap: Capture, src: Sources,
                   mode: str) -> FrozenOut:
    """Run the LM's own forward on the prompt, linearised (module docstring), with the source
    nodes set to `src`. Differentiable in `src` (autograd reference for the tests). With the
    clean sources the logits equal the clean ones to float tolerance."""
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    net, handles, incoming = lm.model, [], {}

    def spliced_layer(v):
        lc = cap.codes[v]

        def hook(_m, _a, o):
            h = o[0] if isinstance(o, tuple) else o
            incoming[v] = h[0]
            x_hat = sae.decode(SparseCode(src.acts[v], lc.code.idx, lc.code.mu, lc.code.std))
            rows = lc.inc.nonzero()[:, 0]
            out = src.exc[v].index_put((rows,), x_hat + src.err[v])[None].to(h.dtype)
            return (out,) + tuple(o[1:]) if isinstance(o, tuple) else out

        return hook

    for b in cap.codes:
        handles.append(lm.blocks[b].register_forward_hook(spliced_layer(b)))
    handles.append(net.get_input_embeddings().register_forward_hook(
        lambda m, a, o: src.emb[None].to(o.dtype)))
    try:
        with frozen(lm, cap, src.mlp if mode == "frozen-mlp" else None):
            logits = net(input_ids=cap.ids, use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    pre = {v: pre_activations(sae, cap.codes[v], incoming[v]) for v in cap.codes}
    return FrozenOut(incoming=incoming, pre=pre, logits=logits)


# ---- fast vector-Jacobian products ---------------------------------------------------------
def _rows(G: Tensor) -> tuple[Tensor, Tensor]:
    """(batch, position) index pairs where `G [n, T, d]` is not all zero."""
    nz = G.abs().amax(-1) > 0
    return nz.nonzero(as_tuple=True)


class _GatedMLP:
    """Per-position factors of a gated MLP down(act(gate z) * up z) at the prompt, so that
    its transposed Jacobian is two matmuls per gradient vector: J^T g = W_gate^T (s1 *
    (g W_down)) + W_up^T (s2 * (g W_down)), s1 = act'(gate z) * up z, s2 = act(gate z)."""

    def __init__(self, mlp: nn.Module, z: Tensor):
        with torch.enable_grad():
            a = mlp.gate_proj(z).detach().requires_grad_(True)
            act = mlp.act_fn(a)
            d_act, = torch.autograd.grad(act.sum(), a)  # elementwise: the derivative itself
        self.s1 = (d_act * mlp.up_proj(z)).detach()  # [T, ff]
        self.s2 = act.detach()
        self.W_gate, self.W_up = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()
        self.W_down = mlp.down_proj.weight.float()

    def vjp(self, g: Tensor, t: Tensor) -> Tensor:
        h = g @ self.W_down  # [m, ff]
        return (h * self.s1[t]) @ self.W_gate + (h * self.s2[t]) @ self.W_up


def _is_gated(mlp: nn.Module) -> bool:
    return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def mlp_vjp(lm: LanguageModel, cap: Capture, b: int, g: Tensor, t: Tensor) -> Tensor:
    """Gradients `[m, d]` w.r.t. block b's mid-residual r (after attention) at positions `t
    [m]` of gradients `g [m, d]` w.r.t. its MLP output, through the MLP's own Jacobian at the
    prompt and the frozen post-attention norm."""
    blk = lm.blocks[b]
    if _is_gated(blk.mlp):
        cache = cap.__dict__.setdefault("_gated", {})
        if b not in cache:
            cache[b] = _GatedMLP(blk.mlp, cap.mlp_in[b])
        gz = cache[b].vjp(g, t)
    else:  # any other per-position MLP: autograd, one row per gradient vector
        with torch.enable_grad():
            z = cap.mlp_in[b][t].detach().requires_grad_(True)
            gz, = torch.autograd.grad(blk.mlp(z), z, g)
    return gz * blk.post_attention_layernorm.weight.float() * cap.inv2[b][t]


def block_vjp(lm: LanguageModel, cap: Capture, b: int, G: Tensor, mode: str) -> Tensor:
    """Gradients `[n, T, d]` w.r.t. block b's input (resid_post b-1, or the embeddings) of n
    linear functionals of its output given as gradients `G [n, T, d]`, in the linearised
    block: out = r + mlp(N2(r)), r = h + o_proj(A @ v_proj(N1(h))) per head, with A, N1's and
    N2's scales frozen. `frozen-mlp`: the MLP output is a node, so no gradient passes it
    (its edges are G itself); `jacobian`: the MLP's own Jacobian at the prompt. Only the
    rows where G is non-zero are pushed through the MLP and the output projection."""
    at = lm.blocks[b].self_attn
    n, T, d = G.shape
    G_r = G
    if mode == "jacobian":
        bi, ti = _rows(G)
        if len(bi):
            G_r = G.clone()
            G_r[bi, ti] += mlp_vjp(lm, cap, b, G[bi, ti], ti)
    bi, ti = _rows(G_r)
    H, dh = cap.attn[b].shape[0], at.head_dim
    kv = at.v_proj.weight.shape[0] // dh
    go = torch.zeros(n, T, H * dh, dtype=G.dtype, device=G.device)
    if len(bi):
        go[bi, ti] = G_r[bi, ti] @ at.o_proj.weight.float()  # out = a @ W_o^T
    # gV[n, h, s] = sum_t A[h, t, s] go[n, t, h]; heads of one kv group share v_proj rows
    gV = torch.einsum("hts,nthd->nhsd", cap.attn[b], go.view(n, T, H, dh))
    gV = gV.view(n, kv, H // kv, T, dh).sum(2).permute(0, 2, 1, 3).reshape(n, T, kv * dh)
    w1 = lm.blocks[b].input_layernorm.weight.float()
    return G_r + (gV @ at.v_proj.weight.float()) * (w1 * cap.inv1[b])


class SourceSet:
    """Source vectors `S [n_src, d]` at positions `pos [n_src]`, also grouped by position
    into a padded `[T, width, d]` tensor (`col [T, width]`: each slot's column, n_src for
    padding), so that contractions with per-position gradients are one batched product."""

    def __init__(self, S: Tensor, pos: Tensor, n_pos: int):
        self.S, self.pos, self.n = S, pos, S.shape[0]
        counts = torch.bincount(pos.cpu(), minlength=n_pos)
        width = max(1, int(counts.max())) if len(pos) else 1
        order = torch.argsort(pos.cpu(), stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(pos)) - starts[pos.cpu()[order]]
        self.col = torch.full((n_pos, width), self.n, dtype=torch.long)
        self.col[pos.cpu()[order], slot] = order
        self.col = self.col.to(S.device)
        pad = torch.cat([S, S.new_zeros(1, S.shape[1])])
        self.S_pad = pad[self.col]  # [T, width, d]

    def scatter(self, vals: Tensor) -> Tensor:
        """`[n, T, width]` per-slot values -> `[n, n_src]` edges."""
        n = vals.shape[0]
        E = vals.new_zeros(n, self.n + 1)
        E.index_add_(1, self.col.flatten(), vals.reshape(n, -1))
        return E[:, : self.n]


def same_position(g: Tensor, t: Tensor, src: SourceSet) -> Tensor:
    """`[n, n_src]`: g[i] . S[j] where target i (at position t[i]) and source j share a
    position, else 0."""
    vals = torch.bmm(src.S_pad[t], g[:, :, None])[..., 0]  # [n, width]
    full = vals.new_zeros(g.shape[0], src.col.shape[0], vals.shape[1])
    full[torch.arange(g.shape[0]), t] = vals
    return src.scatter(full)


def block_edges(lm: LanguageModel, cap: Capture, b: int, g: Tensor, t: Tensor,
                src: SourceSet, mode: str) -> tuple[Tensor, Tensor | None]:
    """The one-block case of `block_vjp`, contracted with the sources at once: targets are
    gradients `g [n, d]` w.r.t. block b's output at positions `t [n]`; sources are vectors
    added to its input (`src`). Returns edges `[n, n_src]` = g . (d out / d in) S, and in
    frozen-mlp mode each target's gradient on the MLP output at its own position (the edge
    to the MLP node is that times the node's value). Never forms `[n, T, d]`: the attention
    part is contracted in the value space (`[T, n, kv*dh] x [T, kv*dh, width]`)."""
    at = lm.blocks[b].self_attn
    g_r = g + mlp_vjp(lm, cap, b, g, t) if mode == "jacobian" else g
    E = same_position(g_r, t, src)
    H, dh = cap.attn[b].shape[0], at.head_dim
    kv = at.v_proj.weight.shape[0] // dh
    n, T = g.shape[0], cap.n_pos
    go = (g_r @ at.o_proj.weight.float()).view(n, H, dh)
    gV = cap.attn[b].permute(1, 0, 2)[t][..., None] * go[:, :, None, :]  # [n, H, T, dh]
    gV = gV.view(n, kv, H // kv, T, dh).sum(2).permute(2, 0, 1, 3).reshape(T, n, kv * dh)
    w1 = lm.blocks[b].input_layernorm.weight.float()
    PS = (src.S_pad * w1 * cap.inv1[b][:, None]) @ at.v_proj.weight.float().T  # [T, w, kvd]
    vals = torch.bmm(gV, PS.transpose(1, 2))  # [T, n, width]
    E += src.scatter(vals.permute(1, 0, 2))
    return E, (g if mode == "frozen-mlp" else None)


def logit_gradient(lm: LanguageModel, cap: Capture, direction: Tensor) -> Tensor:
    """Gradient `[T, d]` w.r.t. the last block's output of `direction @ logits[-1]`
    (`direction [vocab]`: one-hot for a logit, +1/-1 for a logit difference), the final
    norm's scale frozen."""
    W_U = lm.model.get_output_embeddings().weight.float()  # [vocab, d]
    g = direction.float() @ W_U
    w_f = lm.final_norm().weight.float()
    G = torch.zeros(cap.n_pos, g.shape[-1], device=g.device)
    G[-1] = g * w_f * cap.inv_final[-1]
    return G

"""The TopK sparse autoencoder shared by all layers (SPEC §3), with sparse decode and backward.
Uses config, errors, the kernels, the checkpoint formats (`mlsae.formats`) and, for
`spliced`, the splice helper (`mlsae.splice`).

Tensors use SAELens names: W_enc [d_model, n_latents], b_enc [n_latents],
W_dec [n_latents, d_model], b_dec [d_model]. A checkpoint is a folder with `config.json`
and `model.safetensors` holding exactly those four tensors; `from_pretrained` also reads the
seed paper's, SAELens' and sparsify's folders (see `mlsae.formats`).

Standardization conventions (`norm_convention`, SPEC §3 and §8):
  "mlsae"            std = population std; x~ = (x - mu) / (std + eps); x^ = y (std + eps) + mu
  "unbiased_eps_div" std = unbiased std;   x~ = (x - mu) / (std + eps); x^ = y std + mu
                     (the seed paper's code and SAELens' `layer_norm`)
A checkpoint without the field is "mlsae".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from mlsae.config import FORMAT_VERSION
from mlsae.errors import NotFound, UserError, first_line
from mlsae.kernels.cpu import topk_plus_bias

TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
NORM_CONVENTIONS = ("mlsae", "unbiased_eps_div")

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseCode(NamedTuple):
    """TopK code of a batch of vectors: `acts`/`idx` are `[..., k]`; `mu`/`std` are `[..., 1]`
    (the per-vector standardization, needed to map a reconstruction back)."""

    acts: Tensor
    idx: Tensor
    mu: Tensor
    std: Tensor

    def dense(self, n_latents: int) -> Tensor:
        """The code as a dense `[..., n_latents]` tensor (zeros off the k selected latents),
        for patching: edit it and map it back with `MLSAE.decode_dense(dense, code)`."""
        out = self.acts.new_zeros(*self.acts.shape[:-1], n_latents)
        # scatter_add: padding slots (acts 0, any id) must never overwrite a real entry
        return out.scatter_add_(-1, self.idx, self.acts)


def stack_codes(codes: list[SparseCode]) -> SparseCode:
    """Stack codes of separate `encode` calls along a new leading dim, padding each to the
    widest (acts 0, id 0): threshold architectures give codes of different widths."""
    width = max(c.acts.shape[-1] for c in codes)

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, width - t.shape[-1]))

    return SparseCode(torch.stack([pad(c.acts) for c in codes]),
                      torch.stack([pad(c.idx) for c in codes]),
                      torch.stack([c.mu for c in codes]), torch.stack([c.std for c in codes]))


class ForwardOutput(NamedTuple):
    x_hat: Tensor  # [..., d_model], original (un-standardized) space
    code: SparseCode
    aux_acts: Tensor | None  # [N, auxk] pre-activations of dead latents (ReLU'd), training only
    aux_idx: Tensor | None


class _TopKEncode(torch.autograd.Function):
    """pre = (x - b_dec) @ W_enc + b_enc; returns top-k (and optional dead-latent top-auxk).

    The dense `[N, n_latents]` pre-activations live only inside forward. Backward touches only
    the selected entries: grad W_enc = X^T G with G sparse (k nonzeros per row), done as a
    sparse (COO) product, instead of a dense [N, n_latents] @ [N, d_model] product.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, dead: Tensor | None, auxk: int,
                matmul_dtype: torch.dtype | None = None):
        xc = x - b_dec  # [N, d]
        vals, idx, aux_vals, aux_idx = encoder_topk(xc, W_enc, b_enc, k, matmul_dtype, dead,
                                                    auxk)
        ctx.save_for_backward(xc, idx, aux_idx, W_enc)
        ctx.mark_non_differentiable(idx)
        if aux_idx is not None:
            ctx.mark_non_differentiable(aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        xc, idx, aux_idx, W_enc = ctx.saved_tensors
        if aux_idx is not None and g_aux is not None:
            idx = torch.cat([idx, aux_idx], dim=1)
            g_vals = torch.cat([g_vals, g_aux], dim=1)
        n_latents = W_enc.shape[1]
        rows = idx.flatten()
        g = g_vals.flatten().to(xc.dtype)
        grad_b_enc = torch.zeros(n_latents, dtype=xc.dtype, device=xc.device)
        grad_b_enc.index_add_(0, rows, g)
        grad_W_enc = _sparse_t_matmul(rows, g, xc, n_latents, idx.shape[1]).T
        grad_b_dec = -(W_enc @ grad_b_enc)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d pre[i, j] / d xc[i] = W_enc[:, j]: gather the k selected columns per row
            # (attribution through the SAE; only paid when the input requires grad).
            grad_x, _, _ = _embedding_bag_rows(g_vals.to(xc.dtype), idx, W_enc.T.contiguous())
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc, None, None, None, None


GPU_CHUNK_FRACTION = 0.1  # of the accelerator's free memory, for one chunk of pre-activations
GPU_CHUNK_MAX_ROWS = 65536


def _rows_per_chunk(device: torch.device, n_latents: int = 4608, itemsize: int = 2) -> int:
    """Rows of the encoder matmul per chunk: the dense `[rows, n_latents]` pre-activations
    never exceed one chunk.

    CPU: 2048 rows x 4608 latents of bf16 (19 MB) stay in L3: the matmul alone ran 17% faster
    per row than with 8192-row chunks, the whole SAE step the same, in less memory.
    Accelerators: big chunks keep the device busy, but a chunk (plus the torch.topk working
    copy) must fit: at most GPU_CHUNK_FRACTION of the free memory, and 65,536 rows."""
    if device.type == "cpu":
        return 2048
    free = _free_memory(device)
    if free is None:
        return 8192
    rows = int(free * GPU_CHUNK_FRACTION) // max(1, 2 * n_latents * itemsize)
    return max(256, min(GPU_CHUNK_MAX_ROWS, rows))


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator, or None where torch cannot tell."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    except (RuntimeError, AttributeError):
        return None
    return None


def _topk(pre: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of `pre [rows, n] + bias [n]` -> float32 values, ids. The CPU kernel adds the
    bias in float32; torch.topk (GPU, or no compiler) adds it in place in `pre`'s dtype, so
    no float32 copy of the chunk is made."""
    got = topk_plus_bias(pre, bias, k)
    if got is not None:
        return got
    vals, idx = pre.add_(bias.to(pre.dtype)).topk(k, dim=-1, sorted=False)
    return vals.float(), idx


def encoder_topk(xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                 matmul_dtype: torch.dtype | None = None, dead: Tensor | None = None,
                 auxk: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-k of `xc [N, d] @ W_enc + b_enc` per row -> values (float32) and ids `[N, k]`,
    plus the top-auxk among the `dead [n_latents]` columns (or None, None).

    The matmul runs in `matmul_dtype` (None: `xc`'s dtype) one row chunk at a time, so the
    dense `[N, n_latents]` pre-activations are never held whole.
    """
    dtype = matmul_dtype or xc.dtype
    xq, Wq = xc.to(dtype), W_enc.detach().to(dtype)
    bias = b_enc.detach().float()
    n_vec = xc.shape[0]
    vals = torch.empty(n_vec, k, dtype=torch.float32, device=xc.device)
    idx = torch.empty(n_vec, k, dtype=torch.long, device=xc.device)
    aux_vals = aux_idx = dead_idx = None
    if dead is not None and auxk > 0 and bool(dead.any()):
        # Only the dead columns compete, and never more than there are dead latents:
        # with a handful of dead latents this costs a gather, not a second full top-k.
        dead_idx = dead.nonzero().squeeze(1)
        n_aux = min(auxk, len(dead_idx))
        aux_vals = torch.empty(n_vec, n_aux, dtype=torch.float32, device=xc.device)
        aux_idx = torch.empty(n_vec, n_aux, dtype=torch.long, device=xc.device)
    step = _rows_per_chunk(xc.device, W_enc.shape[1], xq.element_size())
    for s in range(0, n_vec, step):
        pre = xq[s:s + step] @ Wq  # [rows, n_latents], the only dense tensor of the step
        if dead_idx is not None:  # before the main top-k: torch's path adds the bias in place
            v, pos = _topk(pre.index_select(1, dead_idx), bias[dead_idx], n_aux)
            aux_vals[s:s + step], aux_idx[s:s + step] = v, dead_idx[pos]
        vals[s:s + step], idx[s:s + step] = _topk(pre, bias, k)
    return vals, idx, aux_vals, aux_idx


def _sparse_t_matmul(rows: Tensor, vals: Tensor, x: Tensor, n_rows: int, k: int) -> Tensor:
    """G^T @ x where G [N, n_rows] has nonzeros vals at (i, rows[i*k + j]) -> [n_rows, d].

    An uncoalesced COO product: on CPU it needs no sort, is deterministic whatever the
    thread count, and stays fast when a few latents take most of the nonzeros (measured
    3.5x faster than a CSR product on a skewed [61440 x 4608] pattern).
    """
    cols = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
    Gt = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n_rows, x.shape[0]),
                                 check_invariants=False)
    return torch.sparse.mm(Gt, x)


def _embedding_bag_rows(acts: Tensor, idx: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor,
                                                                             Tensor]:
    """`embedding_bag` over bags of k ids -> (output [N, d], bag offsets, offset2bag): the
    last two are what its per-sample-weight backward needs."""
    n_vec, k = idx.shape
    flat = idx.reshape(-1)
    offsets = torch.arange(0, n_vec * k, k, device=idx.device)
    out, offset2bag, _, _ = torch.ops.aten._embedding_bag(
        W_dec, flat, offsets, False, 0, False, acts.reshape(-1), False, -1)
    return out, offsets, offset2bag


class _SparseDecode(torch.autograd.Function):
    """embedding_bag forward; W_dec's gradient as a sparse product (faster than embedding_bag's
    own dense backward on CPU), acts' gradient from embedding_bag's per-sample kernel."""

    @staticmethod
    def forward(ctx, acts, idx, W_dec):
        out, offsets, offset2bag = _embedding_bag_rows(acts, idx, W_dec)
        ctx.save_for_backward(acts, idx, W_dec, offsets, offset2bag)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        acts, idx, W_dec, offsets, offset2bag = ctx.saved_tensors
        return _decode_grads(ctx, grad_out.contiguous(), acts, idx, W_dec, offsets,
                             offset2bag)


def _decode_grads(ctx, g: Tensor, acts: Tensor, idx: Tensor, W_dec: Tensor, offsets: Tensor,
                  offset2bag: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
    """Gradients of acts and W_dec for a sparse decode whose output gradient is `g [N, d]`."""
    grad_acts = grad_W = None
    if ctx.needs_input_grad[0]:
        grad_acts = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g, W_dec, idx.reshape(-1), offsets, offset2bag, 0, -1).view_as(acts)
    if ctx.needs_input_grad[2]:
        grad_W = _sparse_t_matmul(idx.reshape(-1), acts.reshape(-1), g, W_dec.shape[0],
                                  idx.shape[1])
    return grad_acts, None, grad_W


def sparse_decode(acts: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j acts[i, j] * W_dec[idx[i, j]] -> `[N, d_model]` (k rows gathered per vector)."""
    return _SparseDecode.apply(acts, idx, W_dec)


class _ReconError(torch.autograd.Function):
    """Per-vector weighted squared error of the decoder, fused with its backward.

    forward: r = sum_j acts_j W_dec[idx_j] + b_dec - target  [N, d] (kept for backward and
    returned, not differentiable); err = weight * ||r||^2  [N]. The backward forms
    dL/dr = 2 weight g_err r once and feeds it to b_dec, W_dec (sparse) and acts, instead of
    the chain of [N, d] elementwise nodes autograd would keep.
    """

    @staticmethod
    def forward(ctx, acts, idx, W_dec, b_dec, target, weight):
        r, offsets, offset2bag = _embedding_bag_rows(acts, idx, W_dec)
        r.add_(b_dec).sub_(target)
        err = torch.linalg.vector_norm(r, dim=1).square_().mul_(weight)
        ctx.save_for_backward(acts, idx, W_dec, r, weight, offsets, offset2bag)
        ctx.mark_non_differentiable(r)
        return err, r

    @staticmethod
    def backward(ctx, g_err, _g_r):
        acts, idx, W_dec, r, weight, offsets, offset2bag = ctx.saved_tensors
        g = r * (2 * weight * g_err)[:, None]  # dL/d(reconstruction) [N, d]
        grad_acts, _, grad_W = _decode_grads(ctx, g, acts, idx, W_dec, offsets, offset2bag)
        grad_b = g.sum(0) if ctx.needs_input_grad[3] else None
        grad_target = -g if ctx.needs_input_grad[4] else None
        grad_weight = None
        if ctx.needs_input_grad[5]:
            grad_weight = torch.linalg.vector_norm(r, dim=1).square() * g_err
        return grad_acts, None, grad_W, grad_b, grad_target, grad_weight


class TrainOutput(NamedTuple):
    err: Tensor  # [N] squared reconstruction error of each vector, original space
    resid: Tensor  # [N, d_model] reconstruction - input, standardized space (no grad)
    code: SparseCode
    aux_acts: Tensor | None
    aux_idx: Tensor | None


class MLSAE(nn.Module):
    """One TopK SAE for the resid_post vectors of every layer (the layer is not an input)."""

    def __init__(self, d_model: int, n_latents: int, k: int, standardize: bool = True,
                 eps: float = 1e-5, config: dict | None = None,
                 norm_convention: str = "mlsae"):
        super().__init__()
        if n_latents <= 0:
            raise UserError(f"n_latents must be positive, got {n_latents}")
        if not 0 < k <= n_latents:
            raise UserError(f"k must be in 1..n_latents ({n_latents}), got {k}")
        if norm_convention not in NORM_CONVENTIONS:
            raise UserError(f"norm_convention {norm_convention!r}: choose one of "
                            f"{', '.join(NORM_CONVENTIONS)}")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.standardize, self.eps = standardize, eps
        self.norm_convention = norm_convention
        self.config = dict(config or {})
        self.W_enc = nn.Parameter(torch.empty(d_model, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """W_dec rows random unit vectors, W_enc = W_dec^T, biases zero."""
        with torch.no_grad():
            w = torch.randn(self.n_latents, self.d_model, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    # ---- preprocessing -------------------------------------------------------------------
    def preprocess(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`x [..., d_model]` -> (x~ float32, mu, std `[..., 1]`): each vector standardized
        over its components, x~ = (x - mu) / (std + eps) (identity when standardize is off).
        std is the population std, or the unbiased one under `norm_convention`
        "unbiased_eps_div"."""
        x = x.float()
        if not self.standardize:
            zero = x.new_zeros(*x.shape[:-1], 1)
            return x, zero, zero + 1 - self.out_scale(zero)
        mu = x.mean(dim=-1, keepdim=True)
        xm = x - mu
        # Two passes (mean, then the norm of the centred vector): as exact as torch.std and
        # about 3x faster on CPU.
        d = x.shape[-1] - (1 if self.norm_convention == "unbiased_eps_div" else 0)
        std = torch.linalg.vector_norm(xm, dim=-1, keepdim=True) / math.sqrt(max(d, 1))
        if xm.requires_grad:  # keep autograd's saved tensors intact
            return xm / (std + self.eps), mu, std
        return xm.div_(std + self.eps), mu, std

    def out_scale(self, std: Tensor) -> Tensor:
        """The factor that maps standardized space back to the original one: std + eps
        (convention "mlsae") or std ("unbiased_eps_div"). A change `dy` of the standardized
        reconstruction changes the output by `out_scale(std) * dy`."""
        return std + self.eps if self.norm_convention == "mlsae" else std

    def postprocess(self, x_tilde: Tensor, mu: Tensor, std: Tensor) -> Tensor:
        """Undo `preprocess`: x~ * out_scale(std) + mu."""
        return x_tilde * self.out_scale(std) + mu

    @property
    def layers(self) -> list[int] | None:
        """The LM blocks (resid_post) this SAE was trained on, from its config (None when
        the checkpoint does not say)."""
        layers = self.config.get("layers")
        return [int(v) for v in layers] if layers else None

    # ---- public API ----------------------------------------------------------------------
    def _encode_rows(self, x: Tensor, dead: Tensor | None = None, auxk: int = 0,
                     matmul_dtype: torch.dtype | None = None):
        """`x [N, d_model]` -> (x~, SparseCode, aux_acts, aux_idx): the standardized input,
        its ReLU'd top-k code and, given `dead` latents and `auxk > 0`, their top-auxk.
        `matmul_dtype`: dtype of the encoder matmul that selects the top k (None: float32,
        exact); bfloat16 is ~2.5x faster on CPUs with bf16 units, values stay float32."""
        xt, mu, std = self.preprocess(x)
        vals, idx, aux_vals, aux_idx = _TopKEncode.apply(
            xt, self.b_dec, self.W_enc, self.b_enc, self.k, dead, auxk, matmul_dtype)
        aux_acts = F.relu(aux_vals) if aux_vals is not None else None
        return xt, SparseCode(F.relu(vals), idx, mu, std), aux_acts, aux_idx

    def encode(self, x: Tensor, matmul_dtype: torch.dtype | None = None) -> SparseCode:
        """`x [..., d_model]` -> SparseCode with `acts, idx [..., k]` (acts >= 0)."""
        shape = x.shape[:-1]
        _, code, _, _ = self._encode_rows(x.reshape(-1, self.d_model),
                                          matmul_dtype=matmul_dtype)
        return SparseCode(*(t.reshape(*shape, t.shape[-1]) for t in code))

    def decode_standardized(self, acts: Tensor, idx: Tensor) -> Tensor:
        """Reconstruction in standardized space: `[..., k]` codes -> `[..., d_model]`."""
        shape = acts.shape[:-1]
        acts = acts.reshape(-1, acts.shape[-1])
        out = sparse_decode(acts, idx.reshape(-1, idx.shape[-1]), self.W_dec.to(acts.dtype))
        return (out + self.b_dec).reshape(*shape, self.d_model)

    def decode(self, code: SparseCode) -> Tensor:
        """Reconstruction in the original space of the encoded vectors."""
        return self.postprocess(self.decode_standardized(code.acts, code.idx), code.mu,
                                code.std)

    def decode_dense(self, acts: Tensor, code: SparseCode) -> Tensor:
        """Reconstruction from a dense code `acts [..., n_latents]` (e.g. an edited
        `code.dense(n_latents)`), un-standardized with `code`'s mu and std."""
        y = acts.float() @ self.W_dec.float() + self.b_dec.float()
        return self.postprocess(y, code.mu, code.std)

    def forward(self, x: Tensor, dead: Tensor | None = None, auxk: int = 0,
                matmul_dtype: torch.dtype | None = None) -> ForwardOutput:
        """Encode and decode `x [..., d_model]` (any leading shape; x_hat is float32); with
        `dead [n_latents]` (2-D `x` only) also return the top `auxk` ReLU'd pre-activations
        of dead latents for the AuxK loss."""
        shape = x.shape[:-1]
        _, code, aux_acts, aux_idx = self._encode_rows(x.reshape(-1, x.shape[-1]), dead,
                                                       auxk, matmul_dtype)
        x_hat = self.postprocess(self.decode_standardized(code.acts, code.idx), code.mu,
                                 code.std)
        if x.dim() != 2:
            x_hat = x_hat.reshape(*shape, x_hat.shape[-1])
            code = SparseCode(*(t.reshape(*shape, t.shape[-1]) for t in code))
        return ForwardOutput(x_hat, code, aux_acts, aux_idx)

    def forward_train(self, x: Tensor, dead: Tensor | None = None, auxk: int = 0,
                      matmul_dtype: torch.dtype | None = None) -> TrainOutput:
        """Training forward on `x [N, d_model]`: the per-vector squared error
        ||x_hat - x||^2 in the original space, computed in standardized space as
        (std + eps)^2 ||x~_hat - x~||^2 (equal up to rounding, with no un-standardizing in
        the graph); plus what the AuxK loss needs, as in `forward`."""
        xt, code, aux_acts, aux_idx = self._encode_rows(x, dead, auxk, matmul_dtype)
        weight = self.out_scale(code.std).square().squeeze(-1)
        err, resid = _ReconError.apply(code.acts, code.idx, self.W_dec, self.b_dec, xt, weight)
        return TrainOutput(err, resid, code, aux_acts, aux_idx)

    def spliced(self, model, layers: list[int] | None = None, *, error: bool = False,
                latents: dict[int, float] | list[int] | None = None, **kw):
        """Context manager: run `model` (an HF causal LM or mlsae's LanguageModel) with
        resid_post of `layers` (default: the SAE's) replaced by this SAE's reconstruction at
        the positions training used; `error=True` adds the error term back; `latents`
        scales ({latent: factor}) or ablates ([latent, ...]) latents. See `mlsae.splice`.

            with sae.spliced(model, layers=[3], latents=[123]):
                out = model.generate(ids, max_new_tokens=20)
        """
        from mlsae.splice import spliced

        return spliced(self, model, layers, error=error, latents=latents, **kw)

    # ---- training-time constraints -------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component parallel to each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        dot = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(dot * self.W_dec)

    # ---- checkpoint I/O ------------------------------------------------------------------
    def full_config(self) -> dict:
        cfg = dict(self.config)
        cfg.update(format_version=FORMAT_VERSION, architecture="mlsae_topk",
                   d_model=self.d_model, n_latents=self.n_latents, k=self.k,
                   standardize=self.standardize, eps=self.eps)
        if self.norm_convention != "mlsae":  # old readers see the keys they know
            cfg["norm_convention"] = self.norm_convention
        return cfg

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `config.json` and `model.safetensors` into folder `path`; each file is
        written to a temporary name first and renamed, so none is ever half-written."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=path))
        try:
            self.write_files(tmp)
            for name in ("model.safetensors", "config.json"):
                os.replace(tmp / name, path / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def write_files(self, folder: Path) -> None:
        tensors = {n: getattr(self, n).detach().float().cpu().contiguous() for n in TENSOR_NAMES}
        save_file(tensors, str(folder / "model.safetensors"),
                  metadata={"format": "pt", "mlsae_format_version": str(FORMAT_VERSION)})
        (folder / "config.json").write_text(json.dumps(self.full_config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        revision: str | None = None, subfolder: str | None = None,
                        dtype: torch.dtype | str | None = None, format: str | None = None,
                        model: str | None = None, layers: list[int] | None = None) -> MLSAE:
        """Load from a checkpoint folder, or download one from a hub repo id.

        Reads mlsae's own checkpoints and, detected from the files (or named by `format`),
        the seed paper's, SAELens' and sparsify's (`mlsae.formats`). `subfolder`: a folder
        inside `path` or the repo (e.g. `layer_3` of a SAELens export); `revision`: a hub
        branch, tag or commit; `dtype`: the parameters' dtype (computation stays float32);
        `model`, `layers`: the LM and its layers when the checkpoint does not name them (the
        seed's repos name the model in their id and cover all layers).
        """
        from mlsae.formats import Hints, read

        folder = Path(path).expanduser()
        if not folder.exists():
            if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
                raise NotFound(f"checkpoint {str(path)!r}: no such folder")
            folder = cls._download(str(path), revision, subfolder)
        if subfolder:
            folder = folder / subfolder
        ck = read(folder, format, Hints(model=model, layers=layers, source=str(path)))
        return cls.from_checkpoint(ck.config, ck.tensors, device=device, dtype=dtype)

    @staticmethod
    def _download(repo_id: str, revision: str | None, subfolder: str | None) -> Path:
        from huggingface_hub import snapshot_download

        names = ["config.json", "model.safetensors", "cfg.json", "sae_weights.safetensors",
                 "sae.safetensors"]
        patterns = [f"{subfolder}/{n}" for n in names] if subfolder else names
        try:
            return Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=patterns))
        except Exception as e:  # offline, unknown repo, auth: all one line for the user
            raise NotFound(f"checkpoint {repo_id!r}: no such folder, and not "
                           f"downloadable from the hub ({first_line(e)})") from None

    @classmethod
    def from_checkpoint(cls, cfg: dict, tensors: dict[str, Tensor],
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None) -> MLSAE:
        """An MLSAE from a config (config.json's keys) and its four tensors."""
        d, n, k = int(cfg["d_model"]), int(cfg["n_latents"]), int(cfg["k"])
        meta = {key: v for key, v in cfg.items()
                if key not in ("d_model", "n_latents", "k", "norm_convention")}
        sae = cls(d, n, k, standardize=bool(cfg.get("standardize", True)),
                  eps=float(cfg.get("eps", 1e-5)), config=meta,
                  norm_convention=cfg.get("norm_convention") or "mlsae")
        with torch.no_grad():
            for name in TENSOR_NAMES:
                getattr(sae, name).copy_(tensors[name])
        if isinstance(dtype, str):
            table = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                     "float16": torch.float16}
            if dtype not in table:
                raise UserError(f"dtype {dtype!r}: choose one of {', '.join(table)}")
            dtype = table[dtype]
        return sae.to(device=device, dtype=dtype) if dtype else sae.to(device)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload `config.json` and `model.safetensors` to a hub model repo."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.write_files(Path(tmp))
            api.upload_folder(repo_id=repo_id, folder_path=tmp)
        return repo_id


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 30, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm for the geometric median of rows of `x [N, d]`."""
    x = x.float()
    med = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - med).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (new - med).norm() < tol * (med.norm() + 1e-12):
            return new
        med = new
    return med

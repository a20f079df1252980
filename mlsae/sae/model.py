"""The MLSAE module: one sparse autoencoder shared by all layers (SPEC §3) whose activation
rule is its architecture (`mlsae.sae.arch`, one file each: topk, batchtopk, token-topk,
jumprelu, matryoshka); standardization, forward passes and checkpoint I/O. Uses config,
errors, the shared sparse ops, the checkpoint formats (`mlsae.formats`) and, for `spliced`,
the splice helper (`mlsae.splice`).

Tensors use SAELens names: W_enc [d_model, n_latents], b_enc [n_latents],
W_dec [n_latents, d_model], b_dec [d_model], plus `threshold [n_latents]` for the
architectures that have one. A checkpoint is a folder with `config.json` (`architecture`:
`mlsae_<name>`; a checkpoint without it is TopK) and `model.safetensors` holding exactly those
tensors; `from_pretrained` also reads the seed paper's, SAELens' and sparsify's folders (see
`mlsae.formats`).

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
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from mlsae.config import FORMAT_VERSION
from mlsae.errors import NotFound, UserError, first_line
from mlsae.sae import batchtopk, jumprelu, matryoshka, token_topk, topk  # noqa: F401 (register)
from mlsae.sae.arch import ARCHITECTURES, make
from mlsae.sae.code import ForwardOutput, SparseCode, TrainOutput
from mlsae.sae.ops import Selection, _ReconError, sparse_decode, sparse_encode

TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
NORM_CONVENTIONS = ("mlsae", "unbiased_eps_div")


def arch_name(cfg: dict) -> str:
    """The architecture a config.json names (`mlsae_<name>`); TopK when it names none. A name
    this version does not know (a newer mlsae's) is an error, never silently TopK."""
    name = str(cfg.get("architecture") or "mlsae_topk").removeprefix("mlsae_")
    if name not in ARCHITECTURES:
        raise UserError(f"checkpoint architecture {cfg.get('architecture')!r} is unknown to "
                        f"this mlsae (it reads {', '.join(ARCHITECTURES)}): upgrade mlsae")
    return name


class MLSAE(nn.Module):
    """One SAE for the resid_post vectors of every layer (the layer is not an input).
    `architecture`: its activation rule (`topk` by default; SPEC §3a); `arch_options`: that
    rule's options (e.g. `threshold_lr`, `l0_coef`, `matryoshka_widths`)."""

    def __init__(self, d_model: int, n_latents: int, k: int, standardize: bool = True,
                 eps: float = 1e-5, config: dict | None = None,
                 norm_convention: str = "mlsae", architecture: str = "topk",
                 arch_options: dict | None = None):
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
        self.arch = make(architecture, arch_options)
        self.arch.setup(self)
        self.reset_parameters()

    @property
    def architecture(self) -> str:
        return self.arch.name

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
                     matmul_dtype: torch.dtype | None = None, train: bool = False,
                     n_layers: int | None = None):
        """`x [N, d_model]` -> (x~, Selection, SparseCode, aux_acts, aux_idx): the
        standardized input, the architecture's selection and code (training rule when
        `train`; rows ordered [layer, token] with `n_layers` layers for per-token rules) and,
        given `dead` latents and `auxk > 0`, their top-auxk ReLU'd pre-activations.
        `matmul_dtype`: dtype of the encoder matmul that selects the latents (None: float32,
        exact); bfloat16 is ~2.5x faster on CPUs with bf16 units, values stay float32."""
        xt, mu, std = self.preprocess(x)

        def select(xc: Tensor) -> Selection:
            return self.arch.select(self, xc, train=train, n_layers=n_layers,
                                    matmul_dtype=matmul_dtype, dead=dead, auxk=auxk)

        sel = sparse_encode(xt, self.b_dec, self.W_enc, self.b_enc, select)
        acts = self.arch.activate(self, sel, train)
        aux_acts = F.relu(sel.aux_vals) if sel.aux_vals is not None else None
        return xt, sel, SparseCode(acts, sel.idx, mu, std), aux_acts, sel.aux_idx

    def encode(self, x: Tensor, matmul_dtype: torch.dtype | None = None) -> SparseCode:
        """`x [..., d_model]` -> SparseCode with `acts, idx [..., width]` (acts >= 0), each
        vector encoded on its own (the architecture's inference form; width k for TopK)."""
        shape = x.shape[:-1]
        _, _, code, _, _ = self._encode_rows(x.reshape(-1, self.d_model),
                                             matmul_dtype=matmul_dtype)
        return SparseCode(*(t.reshape(*shape, t.shape[-1]) for t in code))

    def encode_layers(self, x: Tensor, matmul_dtype: torch.dtype | None = None
                      ) -> SparseCode:
        """`x [layer, ..., d_model]` (every layer of the same tokens) -> SparseCode
        `[layer, ..., width]`: the per-token rule for `token-topk` (a token's layers share
        its budget, as in training), `encode` for every other architecture."""
        if not self.arch.per_token:
            return self.encode(x, matmul_dtype)
        shape = x.shape[:-1]
        _, _, code, _, _ = self._encode_rows(x.reshape(-1, self.d_model),
                                             matmul_dtype=matmul_dtype,
                                             n_layers=x.shape[0])
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
        """Encode and decode `x [..., d_model]` (any leading shape; x_hat is float32; each
        vector on its own, as `encode`); with `dead [n_latents]` (2-D `x` only) also return
        the top `auxk` ReLU'd pre-activations of dead latents for the AuxK loss."""
        shape = x.shape[:-1]
        _, _, code, aux_acts, aux_idx = self._encode_rows(x.reshape(-1, x.shape[-1]), dead,
                                                          auxk, matmul_dtype)
        x_hat = self.postprocess(self.decode_standardized(code.acts, code.idx), code.mu,
                                 code.std)
        if x.dim() != 2:
            x_hat = x_hat.reshape(*shape, x_hat.shape[-1])
            code = SparseCode(*(t.reshape(*shape, t.shape[-1]) for t in code))
        return ForwardOutput(x_hat, code, aux_acts, aux_idx)

    def forward_train(self, x: Tensor, dead: Tensor | None = None, auxk: int = 0,
                      matmul_dtype: torch.dtype | None = None, n_layers: int | None = None
                      ) -> TrainOutput:
        """Training forward on `x [N, d_model]` (rows ordered [layer, token] when `n_layers`
        is given) with the architecture's training rule: the per-vector squared error
        ||x_hat - x||^2 in the original space, computed in standardized space as
        out_scale(std)^2 ||x~_hat - x~||^2 (equal up to rounding, with no un-standardizing
        in the graph); the same for each nested prefix of the dictionary (Matryoshka); the
        architecture's penalty (JumpReLU's L0); and what the AuxK loss needs."""
        xt, sel, code, aux_acts, aux_idx = self._encode_rows(x, dead, auxk, matmul_dtype,
                                                             train=True, n_layers=n_layers)
        weight = self.out_scale(code.std).square().squeeze(-1)
        err, resid = _ReconError.apply(code.acts, code.idx, self.W_dec, self.b_dec, xt, weight,
                                       sel.mask)
        prefix_err = [_ReconError.apply(code.acts, code.idx, self.W_dec, self.b_dec, xt,
                                        weight, _kept(sel.mask, code.idx) & (code.idx < m))[0]
                      for m in self.arch.prefixes(self)[:-1]]
        with torch.no_grad():
            level = self.arch.level(sel, code.acts)
        return TrainOutput(err, resid, code, aux_acts, aux_idx, prefix_err,
                           self.arch.penalty(self, sel), level)

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
        cfg.update(format_version=FORMAT_VERSION, architecture=f"mlsae_{self.arch.name}",
                   d_model=self.d_model, n_latents=self.n_latents, k=self.k,
                   standardize=self.standardize, eps=self.eps, **self.arch.config())
        if self.norm_convention != "mlsae":  # old readers see the keys they know
            cfg["norm_convention"] = self.norm_convention
        return cfg

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors of model.safetensors: the four of SPEC §3, then the architecture's."""
        return TENSOR_NAMES + self.arch.tensors

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
        tensors = {n: getattr(self, n).detach().float().cpu().contiguous()
                   for n in self.tensor_names}
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
        arch = arch_name(cfg)
        opts = {key: cfg[key] for key in ARCHITECTURES[arch].options if key in cfg}
        meta = {key: v for key, v in cfg.items()
                if key not in ("d_model", "n_latents", "k", "norm_convention", "architecture",
                               *opts)}
        sae = cls(d, n, k, standardize=bool(cfg.get("standardize", True)),
                  eps=float(cfg.get("eps", 1e-5)), config=meta,
                  norm_convention=cfg.get("norm_convention") or "mlsae", architecture=arch,
                  arch_options=opts)
        missing = [name for name in sae.tensor_names if name not in tensors]
        if missing:
            raise UserError(f"checkpoint of architecture {arch!r} lacks "
                            f"{', '.join(missing)}")
        with torch.no_grad():
            for name in sae.tensor_names:
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


def _kept(mask: Tensor | None, idx: Tensor) -> Tensor:
    """The kept slots of a code: its mask, or every slot of a TopK code."""
    return mask if mask is not None else torch.ones_like(idx, dtype=torch.bool)


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


"""Tuned lens (SPEC §7; Belrose et al. 2023): one affine translator per layer,
h' = h + h @ W_l^T + b_l, trained so that the model's final norm and unembedding applied to h'
predict the model's final next-token distribution; `mlsae lens train`, its file format, the
tuned-lens package's published lenses, and the exact inverse an MLSAE "with lens" uses.
Uses config, data, the LM adapter and activation capture.

Files (`mlsae lens train --out DIR`):
  DIR/config.json       format "mlsae-tuned-lens", format_version, model, layers (LM blocks
                        with a translator), d_model, n_lm_layers, tokens, steps, lr, data, and
                        `kl` {layers, logit_lens, tuned_lens, tokens}: the held-out mean
                        KL(final || lens) per layer in nats, plain logit lens vs tuned lens
  DIR/lens.safetensors  translators.<l>.weight [d, d] and translators.<l>.bias [d] (float32),
                        <l> = LM block number (resid_post of block l)

The tuned-lens package's lenses (config.json with `base_model_name_or_path`, `d_model`,
`num_hidden_layers`, and params.pt read with `torch.load(weights_only=True)`) load too. Its
translator i acts on `hidden_states[i]` of Hugging Face models, i.e. the embeddings for i = 0
and resid_post of block i - 1 otherwise; so block l gets translator l + 1, the embedding
translator is dropped, and the last block gets the identity (the package has no translator
for it: the final logits need none). `load_lens` also fetches a published lens from the
package's Hugging Face space (`AlignmentResearch/tuned-lens`, lens/<model>/) when given
`hub:<model id>`.

Training (`train_lens`): the LM runs once per batch (resid_post of every block); the target is
the model's own final distribution (the last block through `LanguageModel.unembed`, equal to
its logits); every translator of blocks 0..L-2 gets the loss KL(final || lens) on a random
subset of `positions` included positions per batch (the unembedding costs vocab x d_model per
position and layer), one layer's graph at a time; Adam. The last block's translator stays zero
(its logit lens is exact).

Inverse: h = (h' - b_l)(I + W_l^T)^{-1}, computed as a linear solve with the LU factors of
(I + W_l) in float64 (`TunedLens.inverse`); `translate` then `inverse` returns the input to
float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from mlsae import config as C
from mlsae.activations.capture import batch_activations
from mlsae.config import DataConfig, resolve_layers
from mlsae.data import TokenSource, batches
from mlsae.errors import UserError
from mlsae.lm import LanguageModel, load_lm
from mlsae.metrics import f64
from mlsae.options import add_dataclass_options, build_config, number

FORMAT = "mlsae-tuned-lens"
WEIGHTS = "lens.safetensors"
PACKAGE_WEIGHTS = "params.pt"
HUB_SPACE = "AlignmentResearch/tuned-lens"


class TunedLens(nn.Module):
    """Affine translators for the LM blocks `layers` (module docstring)."""

    def __init__(self, layers: Sequence[int], d_model: int, meta: dict | None = None):
        super().__init__()
        self.layers = [int(i) for i in layers]
        if len(set(self.layers)) != len(self.layers) or not self.layers:
            raise UserError(f"lens: bad layer list {self.layers}")
        self.d_model = d_model
        self.meta = dict(meta or {})
        self.weight = nn.Parameter(torch.zeros(len(self.layers), d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(len(self.layers), d_model))
        self._lu: dict[int, tuple[Tensor, Tensor]] = {}

    def positions(self, layers: Sequence[int]) -> list[int]:
        """Row of each LM block in this lens; one line if a block has no translator."""
        missing = [l_ for l_ in layers if l_ not in self.layers]
        if missing:
            raise UserError(f"the lens has no translator for layers {missing} (it has "
                            f"{self.layers})")
        return [self.layers.index(l_) for l_ in layers]

    def forward(self, h: Tensor, layer: int) -> Tensor:
        """h' = h + h @ W^T + b for `h [..., d]` at LM block `layer`."""
        i = self.positions([layer])[0]
        return h + h @ self.weight[i].T + self.bias[i]

    @torch.no_grad()
    def translate(self, x: Tensor, layers: Sequence[int]) -> Tensor:
        """`x [layer, ..., d]` (one slice per entry of `layers`) -> translated, same shape."""
        out = torch.empty_like(x)
        for j, i in enumerate(self.positions(layers)):
            w, b = self.weight[i].to(x), self.bias[i].to(x)
            out[j] = x[j] + x[j] @ w.T + b
        return out

    @torch.no_grad()
    def inverse(self, y: Tensor, layers: Sequence[int]) -> Tensor:
        """Exact inverse of `translate`: h = (y - b)(I + W^T)^{-1}, a linear solve (float64)."""
        out = torch.empty_like(y)
        for j, i in enumerate(self.positions(layers)):
            lu, piv = self._factors(i)
            rhs = f64(y[j]).reshape(-1, self.d_model)  # on the host where the device has no f64
            rhs = rhs - f64(self.bias[i]).to(rhs.device)
            # h (I + W^T) = rhs  <=>  (I + W) h^T = rhs^T
            h = torch.linalg.lu_solve(lu.to(rhs.device), piv.to(rhs.device), rhs.T).T
            out[j] = h.reshape(y[j].shape).to(y.device, y.dtype)
        return out

    def _factors(self, i: int) -> tuple[Tensor, Tensor]:
        if i not in self._lu:
            a = torch.eye(self.d_model, dtype=torch.float64) + f64(self.weight[i].cpu())
            self._lu[i] = torch.linalg.lu_factor(a.cpu())
        return self._lu[i]

    def translate_stream(self, stream: Iterator[tuple[Tensor, int]], layers: Sequence[int]
                         ) -> Iterator[tuple[Tensor, int]]:
        """A training stream of (x [layer, token, d], sequences) with x translated."""
        for x, n in stream:
            yield self.translate(x, layers), n

    # ---- files ---------------------------------------------------------------------------
    def save(self, out: str | Path, extra: dict | None = None) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"translators.{layer}.weight"] = self.weight[i].detach().float().contiguous()
            tensors[f"translators.{layer}.bias"] = self.bias[i].detach().float().contiguous()
        save_file(tensors, str(out / WEIGHTS))
        meta = dict(self.meta, **(extra or {}))
        meta.update(format=FORMAT, format_version=1, layers=self.layers, d_model=self.d_model)
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.meta = meta
        return out


def load_lens(path: str | Path) -> TunedLens:
    """An mlsae lens folder, a tuned-lens package folder (config.json + params.pt), or
    `hub:<model id>` (the package's published lens for that model, downloaded)."""
    path_s = str(path)
    if path_s.startswith("hub:"):
        return _load_package(_download(path_s[4:]))
    folder = Path(path).expanduser()
    if (folder / WEIGHTS).is_file():
        meta = _read_config(folder)
        tensors = load_file(str(folder / WEIGHTS))
        layers = sorted(int(k.split(".")[1]) for k in tensors if k.endswith(".weight"))
        lens = TunedLens(layers, int(meta["d_model"]), meta)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                lens.weight[i].copy_(tensors[f"translators.{layer}.weight"])
                lens.bias[i].copy_(tensors[f"translators.{layer}.bias"])
        return lens
    if (folder / PACKAGE_WEIGHTS).is_file():
        return _load_package(folder)
    raise UserError(f"--lens {path_s!r}: not a lens folder (expected config.json with "
                    f"{WEIGHTS} or {PACKAGE_WEIGHTS}), nor hub:<model id>")


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"lens {str(folder)!r}: unreadable config.json ({e})") from None


def _load_package(folder: Path) -> TunedLens:
    """The tuned-lens package's format (module docstring for the layer mapping)."""
    meta = _read_config(folder)
    try:
        d, n = int(meta["d_model"]), int(meta["num_hidden_layers"])
    except (KeyError, ValueError, TypeError):
        raise UserError(f"lens {str(folder)!r}: config.json lacks d_model / "
                        "num_hidden_layers") from None
    state = torch.load(folder / PACKAGE_WEIGHTS, map_location="cpu", weights_only=True)
    state = {k.removeprefix("layer_translators."): v for k, v in state.items()}
    lens = TunedLens(range(n), d, {"model": meta.get("base_model_name_or_path"),
                                   "source": "tuned-lens package", "package_config": meta,
                                   "n_lm_layers": n})
    with torch.no_grad():
        for i in range(1, n):  # translator i: hidden_states[i] = resid_post of block i - 1
            w = state.get(f"{i}.weight")
            if w is None:
                raise UserError(f"lens {str(folder)!r}: params.pt has no translator {i}")
            lens.weight[i - 1].copy_(w.float())
            b = state.get(f"{i}.bias")
            if b is not None:
                lens.bias[i - 1].copy_(b.float())
    return lens


def _download(model: str) -> Path:  # pragma: no cover - needs the network
    from huggingface_hub import hf_hub_download

    try:
        files = [hf_hub_download(HUB_SPACE, f"lens/{model}/{name}", repo_type="space")
                 for name in ("config.json", PACKAGE_WEIGHTS)]
    except Exception as e:  # noqa: BLE001 - any hub failure is one line for the user
        raise UserError(f"--lens hub:{model}: cannot download the published lens ({e})") \
            from None
    return Path(files[0]).parent


# ---- training --------------------------------------------------------------------------------
def kl_rows(target_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(p || q) per row, nats: target log-probs, lens logits [P, vocab] -> [P]."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1)


def _residuals(lm: LanguageModel, ids: Tensor, data: DataConfig,
               layers: Sequence[int] | None = None) -> Tensor:
    """resid_post of `layers` (default all) and then of the last block, at the included
    positions: [len(layers) + 1, token, d] float32, an ordinary tensor autograd may save."""
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    x, _ = batch_activations(lm, ids, [*layers, lm.n_layers - 1], data)
    return x.clone()


@torch.no_grad()
def lens_kl(lm: LanguageModel, lens: TunedLens | None, seqs: Tensor, data: DataConfig,
            batch_size: int = 8, chunk: int = 256) -> tuple[list[float], int]:
    """Mean over the included positions of `seqs` of KL(final || lens) per block of the lens
    (nats); the plain logit lens on every block when `lens` is None. Returns (per block,
    positions)."""
    layers = list(range(lm.n_layers)) if lens is None else lens.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    n = 0
    for ids in batches(iter(seqs), batch_size):
        x = _residuals(lm, ids, data, layers)
        for s in range(0, x.shape[1], chunk):
            xs = x[:, s:s + chunk]
            target = torch.log_softmax(lm.unembed(xs[-1]).float(), -1)
            for i, layer in enumerate(layers):
                h = xs[i] if lens is None else lens(xs[i], layer)
                sums[i] += f64(kl_rows(target, lm.unembed(h)).cpu()).sum()
        n += x.shape[1]
    return (sums / max(n, 1)).tolist(), n


def train_lens(model: str | LanguageModel, tokens: int, out: str | Path,
               data: DataConfig | None = None, batch_size: int = 8, lr: float = 1e-3,
               positions: int = 256, eval_tokens: int = 4096, seed: int = 0,
               device: str = "auto", dtype: str = "float32", progress: bool = True,
               layers: str = "all") -> dict:
    """Train a tuned lens for the blocks `layers` (default every block) of `model` on `tokens`
    packed training tokens and write DIR/config.json + DIR/lens.safetensors. Returns the
    config (with the KL table)."""
    data = data or DataConfig()
    out = Path(out)
    if (out / WEIGHTS).exists():
        raise UserError(f"{str(out)!r} already holds a lens")
    if tokens <= 0 or positions <= 0 or lr <= 0:
        raise UserError("--tokens, --positions and --lr must be positive")
    t0 = time.perf_counter()
    lm = model if isinstance(model, LanguageModel) else load_lm(model, device, dtype)
    name = model if isinstance(model, str) else lm.name
    n_layers = lm.n_layers
    chosen = resolve_layers(layers, n_layers)
    lens = TunedLens(chosen, lm.d_model, {"model": name, "n_lm_layers": n_layers})
    lens.to(lm.device)
    # the last block needs no translator: its logit lens is the model's output
    train_rows = [i for i, layer in enumerate(chosen) if layer < n_layers - 1]
    params = [lens.weight, lens.bias]
    opt = torch.optim.Adam(params, lr=lr)
    mask = torch.zeros(len(chosen), 1, 1, device=lm.device)
    mask[train_rows] = 1  # keep the last block's translator at zero
    source = TokenSource(data, lm.tokenizer, lm.eos_id, seed=seed)
    n_steps = max(1, int(tokens) // (batch_size * data.ctx_len))
    g = torch.Generator().manual_seed(seed)
    seqs = source.train_sequences(0)
    losses = []
    bar = tqdm(total=n_steps, desc="lens", disable=not progress, dynamic_ncols=True)
    for _, ids in zip(range(n_steps), batches(seqs, batch_size)):
        x = _residuals(lm, ids, data, chosen)
        if x.shape[1] == 0:
            continue
        pick = torch.randperm(x.shape[1], generator=g)[:positions].to(x.device)
        x = x[:, pick]
        with torch.no_grad():
            target = torch.log_softmax(lm.unembed(x[-1]).float(), -1)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in train_rows:  # one layer's graph at a time bounds memory by [positions, vocab]
            loss = kl_rows(target, lm.unembed(lens(x[i], chosen[i]))).mean()
            loss.backward()
            total += loss.item()
        lens.weight.grad.mul_(mask)
        lens.bias.grad.mul_(mask[:, 0])
        opt.step()
        losses.append(total / max(len(train_rows), 1))
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
    bar.close()
    lens._lu.clear()
    held = source.eval_sequences(eval_tokens) if eval_tokens > 0 else torch.zeros(0, 1)
    kl: dict = {}
    if len(held):
        zero = TunedLens(chosen, lm.d_model).to(lm.device)  # identity: the plain logit lens
        logit, n_pos = lens_kl(lm, zero, held, data, batch_size)
        tuned, _ = lens_kl(lm, lens, held, data, batch_size)
        kl = {"layers": chosen, "logit_lens": logit, "tuned_lens": tuned,
              "tokens": n_pos, "definition": "mean over held-out included positions of "
              "KL(final next-token distribution || lens distribution), nats"}
    meta = {"model": name, "n_lm_layers": n_layers, "tokens": len(losses) * batch_size *
            data.ctx_len, "steps": len(losses), "lr": lr, "positions": positions,
            "batch_size": batch_size, "seed": seed, "data": asdict(data),
            "train_kl_first_last": [losses[0], losses[-1]] if losses else None, "kl": kl,
            "seconds": round(time.perf_counter() - t0, 1)}
    lens.cpu().save(out, meta)
    return lens.meta


def format_kl(kl: dict) -> str:
    lines = [f"{'layer':>5} {'logit lens KL':>14} {'tuned lens KL':>14}"]
    for layer, a, b in zip(kl["layers"], kl["logit_lens"], kl["tuned_lens"]):
        lines.append(f"{layer:>5} {a:>14.4f} {b:>14.4f}")
    la, lb = kl["logit_lens"], kl["tuned_lens"]
    if la:
        lines.append(f"{'mean':>5} {sum(la) / len(la):>14.4f} {sum(lb) / len(lb):>14.4f}")
    return "\n".join(lines)


def lens_for_layers(path: str | Path, layers: Sequence[int], d_model: int) -> TunedLens:
    """Load a lens for an MLSAE on `layers` (checks the width and that every layer has a
    translator)."""
    lens = load_lens(path)
    if lens.d_model != d_model:
        raise UserError(f"--lens {str(path)!r}: d_model {lens.d_model} != the model's {d_model}")
    lens.positions(layers)
    return lens


RUN_LENS = "lens"  # a lens run's copy of its lens: RUN/lens/


def run_lens(run_dir: str | Path, recorded: str | None, layers: Sequence[int],
             d_model: int) -> TunedLens | None:
    """The lens of a run (None when it has none): its copy RUN/lens/ when present, else the
    recorded `--lens` source."""
    if not recorded:
        return None
    copy = Path(run_dir) / RUN_LENS
    return lens_for_layers(copy if (copy / WEIGHTS).is_file() else recorded, layers, d_model)


def sae_lens(run_dir: str | Path, sae_config: dict, layers: Sequence[int],
             d_model: int) -> TunedLens | None:
    """The lens of a trained run from its config.json (`run.train.lens`); None for no lens."""
    recorded = ((sae_config.get("run") or {}).get("train") or {}).get("lens")
    return run_lens(run_dir, recorded, layers, d_model)


# ---- CLI -------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    meta = train_lens(args.model, args.tokens, args.out, build_config(C.DataConfig, vars(args)),
                      batch_size=args.batch_size, lr=args.lr, positions=args.positions,
                      eval_tokens=args.eval_tokens, seed=args.seed, device=args.device,
                      dtype=args.dtype, layers=args.layers)
    if meta.get("kl"):
        print(format_kl(meta["kl"]))
    else:
        print("no held-out text: KL table skipped", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae lens train` on the subparsers object `sub`."""
    p = sub.add_parser("lens", help="tuned lens: train one affine translator per layer",
                       description="Tuned lens (Belrose et al. 2023) for an MLSAE with lens "
                       "(`mlsae train --lens DIR`).")
    lsub = p.add_subparsers(dest="lens_command", required=True)
    t = lsub.add_parser("train", help="train a tuned lens for every block of a model",
                        description="Train h' = h + h W_l^T + b_l per block (zero-initialised) "
                        "to minimise KL(final logits || lens logits through the final norm and "
                        "unembedding); writes DIR/config.json, DIR/lens.safetensors and "
                        "prints the held-out KL per layer against the plain logit lens.")
    t.add_argument("--model", default=C.TrainConfig.model,
                   help=f"language model (default: {C.TrainConfig.model})")
    t.add_argument("--tokens", type=number(int), default=65_536,
                   help="packed training tokens (default: 65536)")
    t.add_argument("--out", required=True, help="lens folder")
    t.add_argument("--layers", default="all",
                   help="blocks that get a translator, as for train (default: all)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    t.add_argument("--positions", type=int, default=256,
                   help="included positions per step that get the loss (default: 256)")
    t.add_argument("--eval-tokens", type=number(int), default=4096,
                   help="held-out tokens for the KL table (default: 4096)")
    t.add_argument("--seed", type=int, default=0, help="data-order seed (default: 0)")
    t.add_argument("--device", default="auto", help="torch device (default: auto)")
    t.add_argument("--dtype", default="float32", help="LM dtype (default: float32)")
    add_dataclass_options(t, C.DataConfig)
    t.set_defaults(func=_cmd_train)


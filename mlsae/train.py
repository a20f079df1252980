"""Training loop: LM forward (or an activation cache) -> resid_post of every chosen layer
-> one TopK SAE step per trainer (several trainers in a sweep, one rank each under torchrun).

A run folder holds:
  config.json, model.safetensors   the latest SAE checkpoint (SPEC §3 format)
  checkpoint/                      everything needed to resume, written atomically:
      config.json, model.safetensors, optimizer.safetensors, state.safetensors, state.json
  metrics.jsonl                    one JSON line every --log-every steps
  summary.json                     held-out per-layer FVU / MSE / L0 after training
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed import ReduceOp
from tqdm.auto import tqdm

from mlsae import config as C
from mlsae.activations import batch_activations, check_finite
from mlsae.cache import CachedActivations
from mlsae.data import TokenSource, batches, include_mask
from mlsae.distributed import Dist, all_gather_rows, all_reduce_, barrier, init_from_env
from mlsae.errors import UserError
from mlsae.lm import LanguageModel, load_lm, peek_shape, resolve_device, resolve_dtype
from mlsae.metrics import ReconstructionStats
from mlsae.runtime import freed_memory_kept
from mlsae.sae import MLSAE, geometric_median, replace_dir, sparse_decode
from mlsae.sweep import parse_sweep, sweep_name, with_overrides

# Flags that may differ on --resume: they change how a run is watched, not what it computes.
RESUME_FREE = {"device", "threads", "log_every", "save_every", "eval_tokens", "out"}


@dataclass
class RunConfig:
    sae: C.SAEConfig = field(default_factory=C.SAEConfig)
    data: C.DataConfig = field(default_factory=C.DataConfig)
    train: C.TrainConfig = field(default_factory=C.TrainConfig)

    def to_dict(self) -> dict:
        return {"sae": C.to_dict(self.sae), "data": C.to_dict(self.data),
                "train": C.to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(C.from_dict(C.SAEConfig, d["sae"]), C.from_dict(C.DataConfig, d["data"]),
                   C.from_dict(C.TrainConfig, d["train"]))


def default_run_dir(cfg: RunConfig) -> Path:
    name = Path(cfg.train.model).name.removesuffix(".gguf").replace("/", "_")
    return Path("runs") / f"{name}-x{cfg.sae.expansion_factor}-k{cfg.sae.k}"


def validate(cfg: RunConfig) -> None:
    """Checks that need no model; the rest happen once d_model is known."""
    if cfg.sae.expansion_factor <= 0:
        raise UserError(f"--expansion-factor must be positive, got {cfg.sae.expansion_factor}")
    if cfg.sae.k <= 0:
        raise UserError(f"--k must be positive, got {cfg.sae.k}")
    if cfg.train.tokens <= 0 or cfg.train.batch_size <= 0 or cfg.data.ctx_len <= 1:
        raise UserError("--tokens and --batch-size must be positive and --ctx-len at least 2")
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise UserError("--holdout-fraction must be in [0, 1)")
    if cfg.train.lr is not None and cfg.train.lr <= 0:
        raise UserError("--lr must be positive")
    resolve_dtype(cfg.train.dtype)
    resolve_dtype(cfg.train.sae_matmul_dtype, "--sae-matmul-dtype")
    if not 0 <= cfg.train.lr_decay <= 1 or cfg.train.warmup_steps < 0:
        raise UserError("--lr-decay must be in [0, 1] and --warmup-steps >= 0")
    if not 0 <= cfg.data.exclude_first < cfg.data.ctx_len:
        raise UserError("--exclude-first must be >= 0 and below --ctx-len")


class Trainer:
    """One SAE with its optimizer and counters. It never sees the LM: it takes activations
    `[layer, token, d_model]`, so several trainers can share one LM forward (sweeps)."""

    def __init__(self, cfg: RunConfig, d_model: int, layers: list[int], run_dir: Path,
                 device: torch.device, dist: Dist | None = None):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.dist = dist or Dist()
        t = cfg.train
        self.layers = layers
        self.n_latents = cfg.sae.expansion_factor * d_model
        if cfg.sae.k > self.n_latents:
            raise UserError(f"--k {cfg.sae.k} exceeds n_latents {self.n_latents} "
                            f"(expansion_factor {cfg.sae.expansion_factor} x d_model {d_model})")
        self.lr = t.lr if t.lr is not None else C.default_lr(self.n_latents)
        self.auxk = min(t.auxk if t.auxk is not None else d_model // 2, self.n_latents)
        self.tokens_per_step = t.batch_size * cfg.data.ctx_len
        self.total_steps = math.ceil(t.tokens / self.tokens_per_step)
        self.dead_tokens = int(min(t.dead_tokens, max(t.tokens / 10, 1)))
        meta = {"model": t.model, "layers": self.layers, "hook_point": "resid_post",
                "exclude_first": cfg.data.exclude_first,
                "exclude_special": cfg.data.exclude_special,
                "expansion_factor": cfg.sae.expansion_factor, "lm_dtype": t.dtype,
                "lr": self.lr, "auxk": self.auxk, "dead_tokens_effective": self.dead_tokens,
                "run": cfg.to_dict()}
        self.rng = torch.Generator().manual_seed(t.seed)  # the run's only random stream
        self.sae = MLSAE(d_model, self.n_latents, cfg.sae.k, cfg.sae.standardize,
                         cfg.sae.eps, config=meta)
        self.sae.reset_parameters(self.rng)
        self.sae.to(device)
        self.sae.matmul_dtype = resolve_dtype(t.sae_matmul_dtype, "--sae-matmul-dtype")
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, eps=6.25e-10)
        self.tokens_since_fired = torch.zeros(self.n_latents, dtype=torch.long)
        self.step = 0
        self.tokens_seen = 0  # included (trained-on) tokens, all ranks
        self.sequences = 0  # data position in the global train stream
        self.log_file = None

    # ---- one step ------------------------------------------------------------------------
    def sae_step(self, x: torch.Tensor) -> dict:
        """One optimizer step on `x [layer, token, d_model]` (this rank's share)."""
        n_layers, n_tok, d = x.shape
        d_ = self.dist
        if self.step == 0:
            with torch.no_grad():
                xt, _, _ = self.sae._standardize(all_gather_rows(x.reshape(-1, d), d_))
                self.sae.b_dec.copy_(geometric_median(xt))
        # Per-layer totals over the GLOBAL batch, so each rank's loss is its share of the
        # single-process loss: sum_x [layer, d], sum ||x||^2 [layer], tokens. Row norms and
        # sums are float32 (pairwise-summed); the cancelling difference is taken in float64.
        with torch.no_grad():
            totals = torch.cat([x.sum(1).double().flatten(),
                                torch.linalg.vector_norm(x, dim=2).double().square().sum(1),
                                torch.tensor([float(n_tok)], dtype=torch.float64,
                                             device=x.device)])
            all_reduce_(totals, d_)
            sum_x = totals[: n_layers * d].view(n_layers, d)
            sum_sq = totals[n_layers * d: n_layers * d + n_layers]
            n_all = totals[-1]
            if n_all == 0:
                return {}
            var = (sum_sq - sum_x.pow(2).sum(1) / n_all).float().clamp_min(1e-12)  # [layer]
        dead = self.tokens_since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        out = self.sae.forward_train(x.reshape(-1, d),
                                     dead=dead.to(self.device) if n_dead else None,
                                     auxk=self.auxk)
        err = out.err.view(n_layers, n_tok).sum(1)  # [layer], this rank
        loss = (err / var).mean()
        aux_loss = torch.zeros((), device=self.device)
        if out.aux_acts is not None:
            # Dead latents reconstruct the residual error in standardized space (Gao et al.).
            e = -out.resid  # x~ - x~_hat [N, d]
            e_hat = sparse_decode(out.aux_acts, out.aux_idx, self.sae.W_dec)
            with torch.no_grad():
                e_tot = all_reduce_(torch.cat([
                    e.sum(0).double(),
                    torch.linalg.vector_norm(e, dim=1).double().square().sum()[None],
                    torch.tensor([float(len(e))], dtype=torch.float64, device=e.device)]), d_)
                e_var = (e_tot[d] - e_tot[:d].pow(2).sum() / e_tot[-1]).float().clamp_min(1e-12)
            aux_loss = (e_hat - e).pow(2).sum() / e_var * min(n_dead / self.auxk, 1.0)
            loss = loss + self.cfg.train.auxk_coef * aux_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        stats = torch.cat([err.detach().double(), aux_loss.detach().double()[None]])
        all_reduce_(stats, d_)
        check_finite(stats, "loss", self.step)
        if d_.enabled:
            for p in self.sae.parameters():
                all_reduce_(p.grad, d_)
        self.sae.remove_parallel_grad()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.step()
        self.sae.normalize_decoder()

        with torch.no_grad():
            acts, idx = out.code.acts, out.code.idx
            fired = torch.bincount(idx.flatten(), weights=(acts > 1e-3).flatten().float(),
                                   minlength=self.n_latents).gt(0).int()
            l0 = (acts > 0).reshape(n_layers, n_tok, -1).sum(-1).double().sum(1)  # [layer]
            all_reduce_(fired, d_, op=ReduceOp.MAX)
            all_reduce_(l0, d_)
            self.tokens_since_fired += int(n_all)
            self.tokens_since_fired[fired.bool().cpu()] = 0
        fvu = (stats[:n_layers] / var.double()).tolist()
        self.step += 1
        self.tokens_seen += int(n_all)
        return {"loss": sum(fvu) / n_layers + self.cfg.train.auxk_coef * stats[-1].item(),
                "fvu": fvu, "l0": (l0 / n_all).tolist(), "auxk_loss": stats[-1].item(),
                "dead_fraction": n_dead / self.n_latents}

    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        scale = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        decay_steps = t.lr_decay * self.total_steps
        if decay_steps > 0:
            scale *= min(1.0, (self.total_steps - step) / decay_steps)
        return self.lr * scale

    def log(self, m: dict, rate: float) -> None:
        if not self.dist.is_main:
            return
        if self.step % self.cfg.train.log_every and self.step != self.total_steps:
            return
        if self.log_file is None:
            self.log_file = (self.run_dir / "metrics.jsonl").open("a")
        row = {"step": self.step, "tokens": self.tokens_seen, "lr": self.lr_at(self.step - 1),
               "tokens_per_s": rate, "loss": m["loss"], "fvu_mean": sum(m["fvu"]) / len(m["fvu"]),
               "auxk_loss": m["auxk_loss"], "dead_fraction": m["dead_fraction"],
               "layers": self.layers, "fvu": m["fvu"], "l0": m["l0"]}
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        """Write checkpoint/ atomically, then point the run folder's model files at it."""
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=self.run_dir))
        try:
            self.sae.write_files(tmp)
            opt_tensors = {}
            names = {id(p): n for n, p in self.sae.named_parameters()}
            for group in self.opt.param_groups:
                for p in group["params"]:
                    for key, v in self.opt.state.get(p, {}).items():
                        opt_tensors[f"{names[id(p)]}.{key}"] = v.detach().cpu().reshape(
                            v.shape if v.dim() else (1,)).contiguous()
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file({"tokens_since_fired": self.tokens_since_fired,
                       "rng": self.rng.get_state()}, str(tmp / "state.safetensors"))
            state = {"step": self.step, "tokens_seen": self.tokens_seen,
                     "sequences": self.sequences, "total_steps": self.total_steps,
                     "finished": self.step >= self.total_steps, "config": self.cfg.to_dict()}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            ckpt = self.run_dir / "checkpoint"
            replace_dir(tmp, ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for name in ("model.safetensors", "config.json"):
            link = self.run_dir / f".{name}.tmp"
            link.unlink(missing_ok=True)
            os.link(ckpt / name, link)
            os.replace(link, self.run_dir / name)

    def load(self, ckpt: Path) -> None:
        sae = MLSAE.from_pretrained(ckpt)
        with torch.no_grad():
            for n, p in self.sae.named_parameters():
                p.copy_(getattr(sae, n))
        try:
            opt_t = load_file(str(ckpt / "optimizer.safetensors"))
            st = load_file(str(ckpt / "state.safetensors"))
            state = json.loads((ckpt / "state.json").read_text())
        except Exception as e:
            raise UserError(f"--resume {str(ckpt.parent)!r}: checkpoint unreadable ({e})") \
                from None
        for n, p in self.sae.named_parameters():
            self.opt.state[p] = {
                "step": opt_t[f"{n}.step"].reshape(()),
                "exp_avg": opt_t[f"{n}.exp_avg"].to(self.device),
                "exp_avg_sq": opt_t[f"{n}.exp_avg_sq"].to(self.device),
            }
        self.tokens_since_fired = st["tokens_since_fired"].clone()
        self.rng.set_state(st["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.sequences = state["sequences"]


class _StopFlag:
    """Ctrl-C sets the flag; the loop saves between steps. A second Ctrl-C aborts."""

    def __init__(self):
        self.set = False

    def __call__(self, _sig, _frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to abort)")


def lm_stream(lm: LanguageModel, source: TokenSource, cfg: RunConfig, layers: list[int],
              start: int, device: torch.device, d_: Dist) -> Iterator[tuple[Tensor, int]]:
    """(x [layer, token, d_model] of this rank's sequences, sequences in the global batch).

    The first batch is read and checked eagerly, so an empty or all-excluded dataset fails
    before any run folder is written."""
    it = batches(source.train_sequences(start=start), cfg.train.batch_size)
    first = next(it)
    if start == 0 and not include_mask(first, lm.special_ids, cfg.data).any():
        raise UserError(f"--dataset {cfg.data.dataset!r}: every position of the first "
                        "batch is excluded (special tokens / --exclude-first)")

    def gen():
        for ids in itertools.chain([first], it):
            x, _ = batch_activations(lm, ids[d_.rank::d_.world], layers, cfg.data, device)
            yield x, len(ids)

    return gen()


def fit(trainers: list[Trainer], stream: Iterator[tuple[Tensor, int]],
        on_step: Callable[[Trainer], None] | None = None, progress: bool = True) -> bool:
    """Train every trainer on the same activations (one LM forward per batch) to its token
    budget. Returns False if stopped early by Ctrl-C (checkpoints saved), True when done."""
    lead = trainers[0]
    cfg, d_ = lead.cfg, lead.dist
    for tr in trainers:
        if d_.is_main:
            tr.run_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=lead.total_steps * lead.tokens_per_step, initial=lead.step *
               lead.tokens_per_step, unit="tok", unit_scale=True,
               disable=not progress or not d_.is_main, desc="train", dynamic_ncols=True)
    stop = _StopFlag()
    prev = signal.signal(signal.SIGINT, stop) if _main_thread() else None
    t0, tok0 = time.perf_counter(), 0
    try:
        while lead.step < lead.total_steps and not stop.set:
            x, n_seq = next(stream)
            check_finite(x, "activations", lead.step)
            tok0 += n_seq * cfg.data.ctx_len
            bar.update(n_seq * cfg.data.ctx_len)
            rate = tok0 / (time.perf_counter() - t0)
            for tr in trainers:
                m = tr.sae_step(x.to(tr.device))
                tr.sequences += n_seq
                if m:
                    tr.log(m, rate)
            if m:
                bar.set_postfix(loss=f"{m['loss']:.3f}",
                                fvu=f"{sum(m['fvu']) / len(m['fvu']):.3f}",
                                dead=f"{m['dead_fraction']:.2f}")
            if on_step is not None:
                on_step(lead)
            if lead.step % cfg.train.save_every == 0 and lead.step < lead.total_steps:
                for tr in trainers:
                    tr.save()
    finally:
        bar.close()
        for tr in trainers:
            tr.close()
        if prev is not None:
            signal.signal(signal.SIGINT, prev)
    for tr in trainers:
        tr.save()
    return not stop.set


@torch.no_grad()
def heldout_summaries(trainers: list[Trainer], lm: LanguageModel, source: TokenSource,
                      max_tokens: int, progress: bool = True) -> list[dict | None]:
    """Held-out FVU / MSE / L0 per layer for each trainer's SAE (exact float32 selection)."""
    seqs = source.eval_sequences(max_tokens)
    lead = trainers[0]
    if len(seqs) == 0:
        return [None] * len(trainers)
    stats = [ReconstructionStats(len(lead.layers), lm.d_model, tr.n_latents) for tr in trainers]
    saved = [tr.sae.matmul_dtype for tr in trainers]
    for tr in trainers:
        tr.sae.matmul_dtype = None
    for ids in tqdm(list(batches(iter(seqs), lead.cfg.train.batch_size)), desc="held-out",
                    disable=not progress, dynamic_ncols=True):
        x, _ = batch_activations(lm, ids, lead.layers, lead.cfg.data, lead.device)
        if x.shape[1] == 0:
            continue
        shape = (len(lead.layers), x.shape[1], -1)
        for tr, st in zip(trainers, stats):
            out = tr.sae(x.reshape(-1, x.shape[-1]))
            st.update(x, out.x_hat.reshape(shape), out.code.acts.reshape(shape),
                      out.code.idx.reshape(shape))
    for tr, dtype in zip(trainers, saved):
        tr.sae.matmul_dtype = dtype
    return [dict(st.result(), layers=lead.layers) if st.n else None for st in stats]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def read_run_config(run_dir: Path) -> RunConfig:
    state_path = run_dir / "checkpoint" / "state.json"
    if not state_path.is_file():
        raise UserError(f"--resume {str(run_dir)!r}: not a run folder (no checkpoint/state.json)")
    try:
        return RunConfig.from_dict(json.loads(state_path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--resume {str(run_dir)!r}: unreadable checkpoint/state.json ({e})") \
            from None


def merge_resume(stored: RunConfig, given: dict[str, object]) -> RunConfig:
    """Apply explicitly given flags to a stored config; any that changes the run is an error."""
    for section in (stored.sae, stored.data, stored.train):
        for name, value in given.items():
            if not hasattr(section, name):
                continue
            old = getattr(section, name)
            if name in RESUME_FREE:
                setattr(section, name, value)
            elif old != value:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"--resume: {flag} {value!r} disagrees with the run's {old!r}")
    return stored


def _plan(cfg: RunConfig | None, resume, given: dict, sweep: str | None):
    """(run folder, [(config, child folder)]) for a new run, a sweep, or a resume."""
    if resume is not None:
        root = Path(resume)
        meta = root / "sweep.json"
        children = ([root / n for n in json.loads(meta.read_text())["runs"]]
                    if meta.is_file() else [root])
        return root, [(merge_resume(read_run_config(c), dict(given)), c) for c in children]
    cfg = cfg or RunConfig()
    root = Path(cfg.train.out) if cfg.train.out else default_run_dir(cfg)
    if sweep:
        if not cfg.train.out:
            root = root.with_name(root.name.rsplit("-x", 1)[0] + "-sweep")
        plan = [(with_overrides(cfg, o), root / sweep_name(o)) for o in parse_sweep(sweep)]
    else:
        plan = [(cfg, root)]
    for _, folder in plan:
        if (folder / "checkpoint").exists() or (folder / "sweep.json").exists():
            raise UserError(f"{str(folder)!r} already holds a run: use --resume {root} "
                            "or another --out")
    return root, plan


def adopt_cache_manifest(cfg: RunConfig, manifest: dict) -> None:
    """A run trained from a cache takes the cache's model, layers and data settings."""
    layers = ",".join(map(str, manifest["layers"]))
    if cfg.train.layers not in ("all", layers):
        raise UserError(f"--layers {cfg.train.layers!r} disagrees with the activation cache's "
                        f"layers {layers}")
    cfg.train.model, cfg.train.layers = manifest["model"], layers
    cached = C.from_dict(C.DataConfig, manifest["data"])
    cfg.data = dataclasses.replace(cached, holdout_fraction=cfg.data.holdout_fraction,
                                   eval_dataset=cfg.data.eval_dataset)


def train(cfg: RunConfig | None = None, resume: str | os.PathLike | None = None,
          given: dict | None = None, lm: LanguageModel | None = None,
          on_step: Callable[[Trainer], None] | None = None, progress: bool = True,
          sweep: str | None = None) -> dict:
    """Train (or resume) a run, or a sweep of runs sharing one LM forward per batch.

    Returns {"run_dir", "runs", "finished", "summary", "summaries", "trainer", "trainers"}.
    `given` are explicitly set options (checked against a resumed run's config); `lm` lets a
    caller pass an already loaded model (tests, benchmarks). While it runs, glibc malloc
    keeps freed memory for reuse (`mlsae.runtime.freed_memory_kept`).
    """
    with freed_memory_kept():
        return _train(cfg, resume, given, lm, on_step, progress, sweep)


def _train(cfg, resume, given, lm, on_step, progress, sweep) -> dict:
    root, plan = _plan(cfg, resume, given or {}, sweep)
    for c, _ in plan:
        validate(c)
    lead = plan[0][0]
    if lead.train.threads:
        torch.set_num_threads(lead.train.threads)
    device = resolve_device(lead.train.device)
    dist_info = init_from_env(device)
    if dist_info.enabled and device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if lead.train.batch_size % dist_info.world:
        raise UserError(f"--batch-size {lead.train.batch_size} is not divisible by the "
                        f"{dist_info.world} ranks")
    cache = None
    if lead.train.activations:
        cache = CachedActivations(lead.train.activations, lead.train.cache_shuffle,
                                  lead.train.seed)
        for c, _ in plan:
            adopt_cache_manifest(c, cache.manifest)
        n_layers, d_model = cache.manifest["n_lm_layers"], cache.manifest["d_model"]
    elif lm is None:
        n_layers, d_model = peek_shape(lead.train.model)  # fail on bad flags before loading
    else:
        n_layers, d_model = lm.n_layers, lm.d_model
    layers = C.resolve_layers(lead.train.layers, n_layers)
    for c, _ in plan:
        if c.sae.k > c.sae.expansion_factor * d_model:
            raise UserError(f"--k {c.sae.k} exceeds n_latents {c.sae.expansion_factor * d_model}")
    if lm is None and cache is None:
        lm = load_lm(lead.train.model, str(device), lead.train.dtype)
    trainers = [Trainer(c, d_model, layers, folder, device, dist_info) for c, folder in plan]
    if resume is not None:
        for tr in trainers:
            tr.load(tr.run_dir / "checkpoint")
        if len({(tr.step, tr.sequences) for tr in trainers}) > 1:
            raise UserError(f"--resume {str(root)!r}: the sweep's runs stopped at different "
                            "steps; resume each run folder on its own")
    elif sweep and dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.json").write_text(json.dumps(
            {"sweep": sweep, "runs": [f.name for _, f in plan]}, indent=2) + "\n")
    start = trainers[0].sequences
    if cache is not None:
        stream = cache.batches(lead.train.batch_size, start, dist_info.rank, dist_info.world)
    else:
        source = TokenSource(lead.data, lm.tokenizer, lm.eos_id, seed=lead.train.seed)
        stream = lm_stream(lm, source, lead, layers, start, device, dist_info)
    finished = fit(trainers, stream, on_step=on_step, progress=progress)
    summaries: list[dict | None] = [None] * len(trainers)
    if finished and lead.train.eval_tokens > 0 and dist_info.is_main:
        if lm is None:  # trained from a cache: the held-out check still needs the LM
            lm = load_lm(lead.train.model, str(device), lead.train.dtype)
        source = TokenSource(lead.data, lm.tokenizer, lm.eos_id, seed=lead.train.seed)
        summaries = heldout_summaries(trainers, lm, source, int(lead.train.eval_tokens),
                                      progress=progress)
        for tr, summary in zip(trainers, summaries):
            if summary is not None:
                (tr.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    barrier(dist_info)
    return {"run_dir": root, "runs": [tr.run_dir for tr in trainers], "finished": finished,
            "summary": summaries[0], "summaries": summaries, "trainer": trainers[0],
            "trainers": trainers}

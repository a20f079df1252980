"""Checkpoint I/O of a training run: `<run>/checkpoint/` written atomically (a temporary
folder, then a rename), and the run folder's own `config.json` / `model.safetensors` pointed
at it, so a run folder is itself an SAE checkpoint.

checkpoint/ holds config.json + model.safetensors (the SAE, SPEC §3), optimizer.safetensors
(Adam `exp_avg`, `exp_avg_sq`, `step` per parameter), state.safetensors (the trainer's tensors:
dead-latent counters, RNG) and state.json (step, data position, the run config). Uses the SAE.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlsae.errors import CheckpointError, UserError, first_line
from mlsae.sae import MLSAE

CHECKPOINT = "checkpoint"
MODEL_FILES = ("model.safetensors", "config.json")


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing it; `dst` is never left half-written."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def optimizer_tensors(sae: MLSAE, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's state as flat tensors named `<parameter>.<key>` (CPU, contiguous)."""
    out = {}
    names = {id(p): n for n, p in sae.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                out[f"{names[id(p)]}.{key}"] = v.detach().cpu().reshape(
                    v.shape if v.dim() else (1,)).contiguous()
    return out


def save_checkpoint(run_dir: Path, sae: MLSAE, opt: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write `<run_dir>/checkpoint/` atomically, then link the run folder's model files to it.

    state.json is written last, so a temporary folder holding it is complete. A failed write
    (full disk, permissions) raises CheckpointError with one line; the previous checkpoint
    is untouched."""
    ckpt = run_dir / CHECKPOINT
    tmp = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run_dir))
        sae.write_files(tmp)
        save_file(optimizer_tensors(sae, opt), str(tmp / "optimizer.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        replace_dir(tmp, ckpt)
        link_model_files(ckpt, run_dir)
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint in {str(run_dir)!r} "
                              f"({first_line(e)}); the previous checkpoint is kept") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def find_checkpoint(run_dir: Path) -> Path | None:
    """`<run_dir>/checkpoint`, or None if the folder holds no run. A kill between the two
    renames of a swap leaves no checkpoint/ but the previous one as `.checkpoint.old`: that
    one is moved back and used."""
    ckpt = run_dir / CHECKPOINT
    old = run_dir / f".{CHECKPOINT}.old"
    if not ckpt.exists() and (old / "state.json").is_file():
        os.replace(old, ckpt)
    return ckpt if (ckpt / "state.json").is_file() else None


def link_model_files(ckpt: Path, run_dir: Path) -> None:
    """Point `<run_dir>/config.json` and `model.safetensors` at the checkpoint's: hard links
    (copies where the file system has none), each swapped in with a rename."""
    for name in MODEL_FILES:
        link = run_dir / f".{name}.tmp"
        link.unlink(missing_ok=True)
        try:
            os.link(ckpt / name, link)
        except OSError:  # no hard links here (some network and FUSE file systems)
            shutil.copyfile(ckpt / name, link)
        os.replace(link, run_dir / name)


def load_checkpoint(ckpt: Path, sae: MLSAE, opt: torch.optim.Optimizer,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore `sae`'s weights and `opt`'s Adam state from `ckpt`; returns the trainer's
    tensors (state.safetensors) and state.json."""
    saved = MLSAE.from_pretrained(ckpt)
    with torch.no_grad():
        for n in sae.tensor_names:  # parameters and the architecture's buffers (threshold)
            getattr(sae, n).copy_(getattr(saved, n))
    try:
        opt_t = load_file(str(ckpt / "optimizer.safetensors"))
        tensors = load_file(str(ckpt / "state.safetensors"))
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:
        raise UserError(f"--resume {str(ckpt.parent)!r}: checkpoint unreadable ({e})") \
            from None
    for n, p in sae.named_parameters():
        opt.state[p] = {
            "step": opt_t[f"{n}.step"].reshape(()),
            "exp_avg": opt_t[f"{n}.exp_avg"].to(device),
            "exp_avg_sq": opt_t[f"{n}.exp_avg_sq"].to(device),
        }
    return tensors, state

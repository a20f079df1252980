"""A run's SAE codes over text: the one streaming loop that `analyze` and `examples` share,
and the run folder they write into (a hub id or a checkpoint in another format is converted
once into a run folder under `runs/hub/` or `runs/converted/`). Uses activations, formats,
runs, the LM adapter and the SAE.

Positions are excluded exactly as in training (SPEC §2): `batch_activations` keeps only the
included positions, and the codes are scattered back into the `[batch, seq]` grid with zero
activation at excluded positions, so every statistic that ignores zero activations also
ignores excluded positions.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mlsae.activations import batch_activations
from mlsae.config import DataConfig
from mlsae.errors import UserError
from mlsae.evaluate import check_text_options
from mlsae.formats import detect
from mlsae.lens import TunedLens, sae_lens
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions
from mlsae.runs import (
    check_lm_matches,
    eval_batches,
    load_run_lm,
    load_sae,
    run_data_config,
    sae_layers,
)
from mlsae.sae import MLSAE


def analysis_dir(run: str | Path) -> Path:
    """`<run>/analysis/`, where every analysis command writes (created on demand)."""
    out = Path(run) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


HUB_RUNS = Path("runs") / "hub"  # hub ids, converted: runs/hub/<owner>--<name>/
CONVERTED_RUNS = Path("runs") / "converted"  # local folders: runs/converted/<name>-<hash>/
RUN_HELP = ("run folder, or a hub id or checkpoint folder in another format (seed paper, "
            "SAELens, sparsify), converted once into runs/hub/<owner>--<name>/ or "
            "runs/converted/ where the outputs then go")


def is_hub_id(ref: str) -> bool:
    """`owner/name`, as `MLSAE.from_pretrained` tells a hub repo id from a path; but not
    when `owner` is a local folder (a mistyped `runs/<name>` is a missing run folder)."""
    return (not ref.startswith((".", "/", "~")) and ref.count("/") == 1
            and not Path(ref.split("/")[0]).is_dir())


def converted_dir(ref: str | Path) -> Path:
    """Where the run folder of a hub id or a foreign-format folder lives (relative to the
    working folder): `runs/hub/<owner>--<name>/` for a hub id, `runs/converted/<folder
    name>-<8 hex digits of its absolute path>/` for a local folder."""
    path = Path(ref).expanduser()
    if path.exists():
        where = path.resolve()
        return CONVERTED_RUNS / f"{where.name}-{hashlib.sha1(str(where).encode()).hexdigest()[:8]}"
    return HUB_RUNS / str(ref).replace("/", "--")


def require_run_dir(run: str | Path, model: str | None = None) -> Path:
    """The run folder analyses write into. A hub repo id, or a folder in another format than
    mlsae's own (anything `MLSAE.from_pretrained` reads: the seed paper's, SAELens,
    sparsify), is converted once into `converted_dir(run)` (`model`: the LM, for a format
    whose checkpoint may not name it, e.g. the seed's) and that folder is used from then on;
    one line on stderr says where. A missing path that is no hub id is refused."""
    path = Path(run).expanduser()
    if (path / "config.json").is_file() and detect(path) == "mlsae":
        return path
    foreign = path.is_dir() and detect(path) is not None
    if not foreign and (path.exists() or not is_hub_id(str(run))):
        raise UserError(f"run {str(run)!r}: no such run folder (expected config.json and "
                        "model.safetensors)")
    dest = converted_dir(run)
    if (dest / "config.json").is_file():
        cfg = json.loads((dest / "config.json").read_text())  # an earlier call's
        if model and cfg.get("source_format") and cfg.get("model") != model:
            raise UserError(f"{str(dest)!r} holds {str(run)!r} converted for model "
                            f"{cfg.get('model')!r}, not {model!r}: delete it to convert again")
        print(f"{run}: using its run folder {dest}", file=sys.stderr)
        return dest
    sae = MLSAE.from_pretrained(path if foreign else str(run), model=model)
    if not sae.config.get("model") or not sae.config.get("layers"):
        what = "language model" if not sae.config.get("model") else "layers"
        raise UserError(f"{str(run)!r} names no {what}: pass --model (its layers default to "
                        f"all of the model's), or convert it with `mlsae convert {run} --out DIR "
                        "--model M --layers L` and give DIR")
    sae.config["converted_from"] = str(path.resolve() if foreign else run)
    sae.save_pretrained(dest)
    print(f"{run}: converted into the run folder {dest} (its analyses are written there)",
          file=sys.stderr)
    return dest


def stats_device(device: torch.device) -> torch.device:
    """Where float64 streaming statistics live: on CUDA next to the activations (CPU sorts
    would become the bottleneck), else the CPU (MPS has no float64)."""
    return device if device.type == "cuda" else torch.device("cpu")


@dataclass
class RunCodes:
    """A run's SAE on the LM it was trained on, ready to encode token batches."""

    sae: MLSAE
    lm: LanguageModel
    layers: list[int]  # LM block numbers, in the SAE's layer order
    data_cfg: DataConfig
    opts: TextOptions
    lens: TunedLens | None = None  # a lens run (`mlsae train --lens`): encode translated x
    run_dir: Path | None = None  # the run folder (a hub id's converted folder), outputs go here

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def stats_device(self) -> torch.device:
        return stats_device(self.lm.device)

    def text(self) -> tuple[list[Tensor], int]:
        """The run's held-out (or --dataset) text as `[batch, ctx_len]` id batches, and the
        number of tokens they hold."""
        _, batch_list, tokens = eval_batches(self.sae, self.lm, self.opts)
        return batch_list, tokens

    @torch.inference_mode()
    def encode(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Codes of `ids [batch, seq]` -> acts, idx `[layer, batch, seq, width]` (acts 0 at
        excluded positions; width k for TopK) and the include mask `[batch, seq]` (on the LM's
        device)."""
        x, mask = batch_activations(self.lm, ids, self.layers, self.data_cfg, self.lm.device)
        if self.lens is not None:
            x = self.lens.translate(x, self.layers)
        mask = mask.to(self.lm.device)
        # every layer of a token together: token-topk's per-token rule needs them (the other
        # architectures encode each vector alone); the encoder runs in row chunks
        code = self.sae.encode_layers(x)  # acts, idx [layer, token, width]
        shape = (self.n_layers, *ids.shape, code.acts.shape[-1])
        acts = torch.zeros(shape, device=self.lm.device)
        idx = torch.zeros(shape, dtype=torch.long, device=self.lm.device)
        acts[:, mask], idx[:, mask] = code.acts, code.idx
        return acts, idx, mask

    def stream(self, batch_list: list[Tensor], desc: str, progress: bool = True
               ) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor]]:
        """(sequence offset, ids, acts, idx, mask) per batch, with a progress bar in tokens."""
        total = sum(b.numel() for b in batch_list)
        offset = 0
        with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress,
                  dynamic_ncols=True) as bar:
            for ids in batch_list:
                yield (offset, ids, *self.encode(ids))
                offset += len(ids)
                bar.update(ids.numel())


def open_run(run: str | Path, opts: TextOptions, lm: LanguageModel | None = None) -> RunCodes:
    """Load a run's SAE and its LM (or check the given `lm` against it); exact float32 top-k.
    `run`: a run folder, or a hub id / foreign checkpoint (`require_run_dir`)."""
    check_text_options(opts)
    run = require_run_dir(run, opts.model)
    sae = load_sae(run, lens_ok=True)
    if lm is None:
        lm = load_run_lm(sae, opts)
    else:
        check_lm_matches(sae, lm)
    sae.to(lm.device)
    layers = sae_layers(sae)
    lens = sae_lens(run, sae.config, layers, sae.d_model)
    return RunCodes(sae, lm, layers, run_data_config(sae, opts), opts,
                    None if lens is None else lens.to(lm.device), run)


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id decoded on its own (a byte-level piece of a longer character shows as
    U+FFFD): one string per position, for display."""
    return [tokenizer.decode([int(i)]) for i in ids]

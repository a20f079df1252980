"""Process-level settings for fast CPU training.
Uses the C library through ctypes; nothing from mlsae."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from functools import cache

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_state = {"depth": 0, "applied": False}


def _libc() -> ctypes.CDLL | None:
    if os.environ.get("MLSAE_MALLOC") == "default" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of mapping fresh pages for every tensor.

    A training step allocates and frees the same ~100 MB tensors every step. glibc serves
    each block over 32 MB with a new mmap, so the kernel zero-fills its pages again on
    every step: 0.25 s of a 1.9 s SAE step on W1 (bench/train_e2e.py). Here large blocks
    come from the heap and freed memory is kept for the next step, at the price of a higher
    resident peak (+0.4 GB on W1). glibc only; MLSAE_MALLOC=default leaves malloc alone.
    Returns whether the setting was applied. `restore_malloc` undoes it.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def restore_malloc() -> None:
    """glibc's default thresholds again, and freed memory handed back to the system."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """`keep_freed_memory` for the duration of a block (nested blocks share one setting)."""
    if _state["depth"] == 0:
        _state["applied"] = keep_freed_memory()
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["applied"]:
            restore_malloc()
            _state["applied"] = False


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matmul units (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


# CPUs with native bf16 run the LM in bfloat16 under `--dtype auto`: measured on an AVX512-BF16
# EPYC (bench/lm_dtype.py, bench/RESULTS.md "LM dtype"): the LM forward 1.7x faster, and an
# MLSAE trained on bf16 activations scored the same held-out FVU on float32 activations
# (0.3574 vs 0.3574). MLSAE_CPU_BF16=0 keeps float32 (the tests do, for machine-independent
# numbers).
CPU_AUTO_BF16 = os.environ.get("MLSAE_CPU_BF16", "1") != "0"


def auto_dtype(device: torch.device) -> str:
    """The LM dtype `--dtype auto` resolves to on `device`: bfloat16 where the device computes
    it natively (CUDA with bf16 support; CPUs with AVX512-BF16/AMX unless MLSAE_CPU_BF16=0),
    else float32 (MPS included)."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and CPU_AUTO_BF16 and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def resolve_lm_dtype(dtype: str, device: torch.device) -> str:
    """`auto` -> `auto_dtype(device)`; any other name unchanged."""
    return auto_dtype(device) if dtype == "auto" else dtype


"""Process-level settings for fast CPU training."""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of mapping fresh pages for every tensor.

    A training step allocates and frees the same ~100 MB tensors every step. glibc serves
    each block over 32 MB with a new mmap, so the kernel zero-fills its pages again on
    every step: 0.25 s of a 1.9 s SAE step on W1 (bench/train_e2e.py). Here large blocks
    come from the heap and freed memory is kept for the next step, at the price of a higher
    resident peak (+0.4 GB on W1). glibc only; MLSAE_MALLOC=default leaves malloc alone.
    Returns whether the setting was applied.
    """
    if os.environ.get("MLSAE_MALLOC") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return False
    return bool(ok)

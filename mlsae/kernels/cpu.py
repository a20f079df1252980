"""Build `topk.c` with the system C compiler at first use and call it through ctypes.
Uses errors only.

The shared library is cached under `$MLSAE_CACHE_DIR` (default `~/.cache/mlsae/kernels`),
keyed by the source, the compiler flags and this CPU (it is built with -march=native, so a
cache shared by different machines keeps one build per CPU). No compiler, a failed build or
`MLSAE_NO_KERNELS=1`: callers get None and use torch instead (one warning, never an error).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from mlsae.errors import first_line

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_SOURCE = Path(__file__).with_name("topk.c")
_state: dict = {}


def _cpu_id() -> str:
    """The first processor block of /proc/cpuinfo minus its fluctuating fields: model and
    feature flags on x86 ("model name", "flags") and ARM ("CPU part", "Features")."""
    skip = ("processor", "cpu MHz", "bogomips", "BogoMIPS", "apicid", "initial apicid",
            "core id")
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(line for line in block.splitlines() if not line.startswith(skip))


def cache_dir() -> Path:
    base = os.environ.get("MLSAE_CACHE_DIR") or Path.home() / ".cache" / "mlsae"
    return Path(base) / "kernels"


def _private_temp_dir() -> Path:
    """A per-user folder in the temp dir that nobody else can have planted files in."""
    folder = Path(tempfile.gettempdir()) / f"mlsae-kernels-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{folder} is not a private folder of this user")
    return folder


def _compile(so: Path, cc: str) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent ranks never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(_SOURCE)], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS]).encode() + _cpu_id().encode())
    name = f"topk-{key.hexdigest()[:16]}.so"
    so = cache_dir() / name
    if not so.exists():
        try:
            _compile(so, cc)
        except OSError:  # cache not writable (or no compiler: the retry fails the same way)
            so = _private_temp_dir() / name
            if not so.exists():
                _compile(so, cc)
    lib = ctypes.CDLL(str(so))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    for fn in (lib.topk_rows_bf16, lib.topk_rows_f32):
        fn.argtypes, fn.restype = args, ctypes.c_int64
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be used."""
    if os.environ.get("MLSAE_NO_KERNELS", "") not in ("", "0"):
        return None
    if "lib" not in _state:
        try:
            _state["lib"] = _build()
        except (OSError, subprocess.SubprocessError) as e:
            first = first_line(getattr(e, "stderr", None) or e)
            warnings.warn(f"mlsae: CPU top-k kernel unavailable ({first}); using torch.topk",
                          stacklevel=2)
            _state["lib"] = None
    return _state["lib"]


def _pool() -> ThreadPoolExecutor:
    n = torch.get_num_threads()
    if _state.get("pool_size") != n:
        if "pool" in _state:
            _state["pool"].shutdown(wait=False)
        _state["pool"] = ThreadPoolExecutor(n, thread_name_prefix="mlsae-topk")
        _state["pool_size"] = n
    return _state["pool"]


def topk_plus_bias(pre: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Top-k along dim 1 of `pre [N, n] + bias [n]` -> (values float32 [N, k], indices int64
    [N, k]), unordered; None where the kernel does not apply (not CPU, other dtypes).
    Rows holding NaN are left to torch.topk, which ranks NaN first."""
    if pre.device.type != "cpu" or pre.dtype not in (torch.bfloat16, torch.float32):
        return None
    if pre.dim() != 2:
        raise ValueError(f"pre must be [rows, n], got shape {tuple(pre.shape)}")
    n_rows, n = pre.shape
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..{n}")
    if bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} entries for {n} columns")
    lib = library()
    if lib is None:
        return None
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    bias = bias.detach().to(dtype=torch.float32, device="cpu").contiguous()
    vals = torch.empty(n_rows, k, dtype=torch.float32)
    idx = torch.empty(n_rows, k, dtype=torch.int64)
    fn = lib.topk_rows_bf16 if pre.dtype == torch.bfloat16 else lib.topk_rows_f32
    ptrs = (pre.data_ptr(), pre.stride(0))
    tail = (n, bias.data_ptr(), k, vals.data_ptr(), idx.data_ptr())

    def run(bounds: tuple[int, int]) -> int:
        return fn(ptrs[0], ptrs[1], bounds[0], bounds[1], *tail)

    threads = max(1, min(torch.get_num_threads(), n_rows // 64))
    cuts = [n_rows * i // threads for i in range(threads + 1)]
    spans = list(zip(cuts[:-1], cuts[1:]))
    codes = [run(spans[0])] if threads == 1 else list(_pool().map(run, spans))
    if any(c < 0 for c in codes):
        raise MemoryError("mlsae top-k kernel: out of memory")
    if any(codes):
        redo = (idx[:, 0] < 0).nonzero().squeeze(1)
        v, i = (pre[redo].float() + bias).topk(k, dim=-1, sorted=False)
        vals[redo], idx[redo] = v, i
    return vals, idx

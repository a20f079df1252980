"""The compiled CPU top-k kernel against torch.topk, and its torch fallback."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlsae.kernels import cpu


def check_topk(pre: torch.Tensor, bias: torch.Tensor, k: int) -> None:
    got = cpu.topk_plus_bias(pre, bias, k)
    assert got is not None, "the kernel should build on this machine (gcc is installed)"
    vals, idx = got
    ref = pre.float() + bias
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    assert vals.shape == idx.shape == (pre.shape[0], k)
    # Same multiset of values as torch.topk (ids may differ only among equal values) ...
    want = ref.topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(vals.sort(-1).values, want)
    # ... and each id really points at its value, with no id twice in a row.
    assert torch.equal(ref.gather(1, idx), vals)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4608, 32), (100, 7), (33, 32), (5, 5), (64, 1)])
def test_matches_torch_topk(dtype, n, k):
    g = torch.Generator().manual_seed(n * k)
    pre = torch.randn(300, n, generator=g).to(dtype)
    check_topk(pre, torch.randn(n, generator=g) * 0.1, k)


def test_ties_and_constant_rows():
    pre = torch.randint(-3, 4, (200, 96)).float()  # many equal values at the k-th place
    pre[:10] = 0.5  # whole rows of one value: every element is a candidate
    check_topk(pre, torch.zeros(96), 16)


def test_strided_rows_and_large_values():
    base = torch.randn(64, 200) * 1e30
    check_topk(base[:, 10:150], torch.randn(140), 9)  # a column slice: row stride 200


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), n=st.integers(1, 90), k_frac=st.floats(0.01, 1.0),
       seed=st.integers(0, 10_000), bf16=st.booleans())
def test_property_any_shape(rows, n, k_frac, seed, bf16):
    k = max(1, min(n, round(k_frac * n)))
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(rows, n, generator=g)
    check_topk(pre.bfloat16() if bf16 else pre, torch.randn(n, generator=g), k)


def test_rejects_what_it_cannot_do():
    assert cpu.topk_plus_bias(torch.zeros(4, 8, dtype=torch.float64), torch.zeros(8), 2) is None
    with pytest.raises(ValueError, match="k=9 must be in 1..8"):
        cpu.topk_plus_bias(torch.zeros(4, 8), torch.zeros(8), 9)


def test_disabled_by_env_falls_back_to_torch(tmp_path):
    """MLSAE_NO_KERNELS=1: no library, and the SAE selects with torch.topk instead, giving
    the same code as the kernel."""
    script = (
        "import torch; from mlsae.kernels import cpu; from mlsae.sae import encoder_topk\n"
        "assert cpu.library() is None\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, W, b = (torch.randn(50, 16, generator=g), torch.randn(16, 64, generator=g),\n"
        "           torch.randn(64, generator=g))\n"
        "v, i, _, _ = encoder_topk(x, W, b, 4)\n"
        "torch.save({'v': v, 'i': i}, r'%s')\n" % (tmp_path / "off.pt"))
    env = {"MLSAE_NO_KERNELS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    off = torch.load(tmp_path / "off.pt", weights_only=True)
    from mlsae.sae import encoder_topk
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(50, 16, generator=g), torch.randn(16, 64, generator=g),
               torch.randn(64, generator=g))
    v, i, _, _ = encoder_topk(x, W, b, 4)
    assert cpu.library() is not None
    torch.testing.assert_close(v.sort(-1).values, off["v"].sort(-1).values)
    assert torch.equal(i.sort(-1).values, off["i"].sort(-1).values)


def test_missing_compiler_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_state", {})
    with pytest.warns(UserWarning, match="CPU top-k kernel unavailable"):
        assert cpu.topk_plus_bias(torch.zeros(4, 8), torch.zeros(8), 2) is None
    assert cpu.library() is None  # remembered: no second attempt, no second warning


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_state", {})
    assert cpu.library() is not None
    built = list((tmp_path / "kernels").glob("topk-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(cpu, "_state", {})
    mtime = built[0].stat().st_mtime_ns
    assert cpu.library() is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_unwritable_cache_builds_in_temp(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLSAE_CACHE_DIR", str(blocker / "sub"))  # mkdir must fail
    monkeypatch.setattr(cpu, "_state", {})
    assert cpu.library() is not None
    check_topk(torch.randn(20, 40), torch.zeros(40), 3)


def test_rows_with_nan_are_left_to_torch():
    """torch.topk ranks NaN first; rows holding NaN go through it, the others the kernel."""
    pre = torch.randn(300, 256)
    pre[5, 7] = float("nan")
    pre[9] = float("nan")
    pre[200, 255] = float("nan")
    vals, idx = cpu.topk_plus_bias(pre, torch.zeros(256), 8)
    ref = pre.topk(8, dim=-1).values
    assert torch.equal(vals.sort(-1).values.nan_to_num(1e9), ref.sort(-1).values.nan_to_num(1e9))
    assert (idx >= 0).all() and (idx < 256).all()
    assert vals[5].isnan().sum() == 1 and idx[5].tolist().count(7) == 1


def test_bias_must_match_the_columns():
    with pytest.raises(ValueError, match="bias has 7 entries for 8 columns"):
        cpu.topk_plus_bias(torch.zeros(4, 8), torch.zeros(7), 2)

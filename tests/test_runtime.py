"""The training-time malloc setting is applied once for nested blocks and undone after."""

import platform

import pytest

from mlsae import runtime


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_nested_blocks_apply_once_and_restore(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(runtime, "restore_malloc", lambda: calls.append("restore"))
    with runtime.freed_memory_kept():
        with runtime.freed_memory_kept():
            assert calls == ["keep"]
        assert calls == ["keep"]
    assert calls == ["keep", "restore"]
    with pytest.raises(RuntimeError), runtime.freed_memory_kept():
        raise RuntimeError("restored on errors too")
    assert calls == ["keep", "restore", "keep", "restore"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_real_mallopt_and_opt_out(monkeypatch):
    assert runtime.keep_freed_memory() is True
    runtime.restore_malloc()
    monkeypatch.setenv("MLSAE_MALLOC", "default")
    assert runtime.keep_freed_memory() is False

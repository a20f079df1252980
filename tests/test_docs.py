"""`mlsae --version`, and the docs build's docstring check (docs/hooks/docstrings.py): it
finds every public name without a docstring, and the API reference as it stands has none.
The docs build itself (strict, notebooks executed) runs in scripts/test.sh."""

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlsae.cli import main

ROOT = Path(__file__).resolve().parents[1]


def pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"$', text, re.M).group(1)


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mlsae {pyproject_version()}"


def test_version_flag_of_the_installed_command():
    out = subprocess.run([sys.executable, "-m", "mlsae", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"mlsae {pyproject_version()}"


def load_hook():
    pytest.importorskip("griffe", reason="griffe comes with the docs extra")
    spec = importlib.util.spec_from_file_location("docs_hook",
                                                  ROOT / "docs" / "hooks" / "docstrings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hook_finds_each_missing_docstring(tmp_path):
    hook = load_hook()
    import griffe

    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Toy package."""\n')
    (pkg / "mod.py").write_text(textwrap.dedent('''
        """A module."""
        from dataclasses import dataclass

        def documented():
            """Has one."""

        def bare():
            pass

        def _private():
            pass

        @dataclass
        class Config:
            """A config."""

            good: int = 1
            """Documented field."""
            bad: int = 2
            LIMIT = 3

        class Thing:
            """A class."""

            def method(self):
                pass

            @property
            def size(self):
                return 1

            def fine(self):
                """Documented."""
    '''))
    toy = griffe.GriffeLoader(search_paths=[str(tmp_path)]).load("toy")
    mod = toy["mod"]
    assert hook.undocumented(mod, None) == ["toy.mod.bare", "toy.mod.Config.bad",
                                            "toy.mod.Thing.method", "toy.mod.Thing.size"]
    assert hook.undocumented(mod["Thing"], ["fine"]) == []
    assert hook.undocumented(mod["Thing"], ["fine", "size"]) == ["toy.mod.Thing.size"]
    assert hook.undocumented(mod["bare"], None) == ["toy.mod.bare"]


def test_hook_reads_directives_and_their_members(tmp_path):
    hook = load_hook()
    (tmp_path / "a.md").write_text("# A\n\n::: mlsae.sae.MLSAE\n    options:\n"
                                   "      members: [encode, decode]\n\n::: mlsae.train.run.train\n")
    assert hook.directives(tmp_path) == [("mlsae.sae.MLSAE", ["encode", "decode"], "a.md"),
                                         ("mlsae.train.run.train", None, "a.md")]


def test_api_reference_has_no_undocumented_public_name():
    hook = load_hook()
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    package = loader.load("mlsae")
    loader.resolve_aliases(implicit=False, external=False)
    found = hook.directives(ROOT / "docs" / "reference")
    assert len(found) >= 25  # the reference pages name the public API
    missing = []
    for ident, members, _page in found:
        obj = package[ident.removeprefix("mlsae.")]
        obj = obj.final_target if obj.is_alias else obj
        missing += hook.undocumented(obj, members)
    assert missing == []

"""The package's architecture, checked from its source: every module says what it is for, data
flows one way (text -> tokens -> activations -> SAE -> training -> metrics/analyses -> files and
server -> CLI), there are no import cycles, and no module uses another's private names."""

import ast
import importlib
import pkgutil
from pathlib import Path

import mlsae

ROOT = Path(mlsae.__file__).parent

# Rank of each room in the flow; a module may import only from rooms of lower or equal rank.
RANK = {
    "errors": 0, "runtime": 0, "kernels": 0, "metrics": 0, "plots": 0,
    "config": 1, "options": 1,
    "data": 2, "lm": 2,
    "activations": 3, "sae": 3, "formats": 3, "splice": 3, "lens": 3,
    "train": 4,
    "runs": 5, "evaluate": 5,
    "analysis": 6, "baselines": 6, "compare": 6, "export": 6, "synth": 6,
    "pareto": 6, "circuits": 6,
    "server": 7, "cli": 8, "__main__": 9,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported mlsae module, names taken from it) for every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlsae"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:  # `from mlsae import config` imports the module
                    found.append((sub, []))
                else:
                    found.append((node.module, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("mlsae")]
    return found


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "mlsae"


def test_every_module_has_a_docstring():
    for name, path in modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 30, f"{name} has no docstring saying what it is for"


def test_imports_flow_one_way_and_no_private_names():
    mods = modules()
    for name, path in mods.items():
        if name == "mlsae":
            continue
        for dep, names in imports(path, set(mods)):
            if dep == "mlsae":
                continue
            assert RANK[room(dep)] <= RANK[room(name)], f"{name} imports upward: {dep}"
            if room(dep) != room(name):
                assert not any(n.startswith("_") for n in names), \
                    f"{name} reads a private name of {dep}: {names}"


def test_no_import_cycles():
    mods = modules()
    graph = {n: {d for d, _ in imports(p, set(mods)) if d in mods and d != n}
             for n, p in mods.items()}
    for name in graph:  # a package imports its own submodules: that is not a cycle
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_packages_do_not_shadow_their_modules():
    """`mlsae.analysis.analyze` must stay a module after import (no function re-exported under
    a module's name)."""
    for pkg_name in ("mlsae.analysis", "mlsae.train", "mlsae.data", "mlsae.activations"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg_name}.{info.name}")
            assert type(getattr(pkg, info.name)).__name__ == "module", \
                f"{pkg_name}.{info.name} is shadowed by a non-module"

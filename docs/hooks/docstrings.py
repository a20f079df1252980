"""MkDocs hook: every public name the API reference documents must have a docstring.

It reads the `::: identifier` directives of docs/reference/*.md (with their `members:` list
when one is given), loads those objects statically with griffe (what mkdocstrings renders)
and logs one warning per public function, class, method, property or dataclass field
without a docstring. `mkdocs build --strict` turns the warnings into a failed build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import griffe

log = logging.getLogger("mkdocs.hooks.docstrings")

DIRECTIVE = re.compile(r"^::: *([\w.]+)\s*$")
MEMBERS = re.compile(r"^\s+members:\s*\[(.*)\]\s*$")
# Dunder and framework methods whose meaning is fixed elsewhere (Python, torch.nn.Module).
EXEMPT = {"forward", "extra_repr"}
CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]+$")  # class constants: hidden from the reference too


def directives(reference: Path) -> list[tuple[str, list[str] | None, str]]:
    """[(identifier, members or None, page)] of every `:::` directive under `reference`."""
    found = []
    for page in sorted(reference.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            m = DIRECTIVE.match(line)
            if not m:
                continue
            members = None
            for opt in lines[i + 1:i + 12]:
                if opt.strip() and not opt.startswith((" ", "\t")):
                    break
                mm = MEMBERS.match(opt)
                if mm:
                    members = [s.strip().strip("'\"") for s in mm.group(1).split(",") if s.strip()]
            found.append((m.group(1), members, page.name))
    return found


def is_dataclass(obj) -> bool:
    return obj.is_class and "dataclass" in obj.labels


def undocumented(obj, members: list[str] | None) -> list[str]:
    """Paths of `obj` and of its public members (those in `members`, if given) that have no
    docstring. Inherited members are the parent's business; aliases (imports) are skipped."""
    missing = [] if obj.docstring else [obj.path]
    if not (obj.is_class or obj.is_module):
        return missing
    for name, member in obj.members.items():
        if member.is_alias or name.startswith("_") or name in EXEMPT or CONSTANT.match(name):
            continue
        if members is not None and name not in members:
            continue
        if obj.is_module and obj.exports is not None and name not in obj.exports:
            continue
        if member.is_attribute and not (is_dataclass(obj) or "property" in member.labels):
            continue
        if member.is_class:
            missing += undocumented(member, None)
        elif not member.docstring:
            missing.append(member.path)
    return missing


def on_pre_build(config, **kwargs) -> None:
    root = Path(config.config_file_path).parent
    loader = griffe.GriffeLoader(search_paths=[str(root)])
    package = loader.load("mlsae")
    loader.resolve_aliases(implicit=False, external=False)
    total = 0
    for ident, members, page in directives(Path(config.docs_dir) / "reference"):
        try:
            obj = package[ident.removeprefix("mlsae.")] if ident != "mlsae" else package
            obj = obj.final_target if obj.is_alias else obj
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            log.warning("reference/%s: ::: %s names nothing in the package", page, ident)
            continue
        for path in undocumented(obj, members):
            log.warning("reference/%s: public name %s has no docstring", page, path)
            total += 1
    if total:
        log.warning("%d public names in the API reference have no docstring", total)

"""Text sources -> a resumable stream of text pieces: CPython's own text (`pydoc`, `python`,
`python-source`, offline), local .txt/.jsonl/.parquet files or folders, and `datasets` hub
datasets (streamed). Uses only mlsae.errors.

A source yields `(state, text, doc_end)`: `state` is a small JSON-able position from which
`pieces(state)` yields this piece again (a file and byte offset, a parquet row, a `datasets`
state_dict), so a stream resumes without reading what came before. Nothing is read whole:
a .txt file is read in pieces of about `TXT_PIECE` bytes that end at a line break; the pieces
of one file form ONE document (the packer joins them without EOS and puts EOS at the end of
the file), so a file below `TXT_PIECE` bytes tokenizes exactly as the whole file did before.
.jsonl lines and parquet rows are one document each; parquet is read by row group.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from mlsae.errors import UserError, first_line

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_PIECE = 1 << 18  # bytes per .txt piece (cut after the last line break in it)
BUILTIN_TEXT = ("pydoc", "python", "python-source")
# Folders of the standard library skipped by `python` and `python-source`: test suites
# (fixtures in odd encodings, generated data) and installed third-party packages.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "ensurepip", "_vendor"}


# ---- CPython's own text --------------------------------------------------------------------
def _stdlib_files() -> list[tuple[str, Path]]:
    """(module-ish relative path, file) of every .py of the standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test_")]
        for f in files:
            if f.endswith(".py") and not f.startswith("test_"):
                p = Path(folder) / f
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _text_cache(name: str) -> Path:
    """Where the built `python` documents are kept (parsing the standard library takes
    10-40 s): $MLSAE_CACHE_DIR/text (default ~/.cache/mlsae/text), one file per Python build
    and standard library folder."""
    base = Path(os.environ.get("MLSAE_CACHE_DIR") or Path.home() / ".cache" / "mlsae")
    key = hashlib.sha1(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{name}|1".encode())
    return base / "text" / f"{name}-{python_version()}-{key.hexdigest()[:12]}.json"


@cache
def builtin_documents(name: str) -> tuple[str, ...]:
    """Documents of `pydoc` (the pydoc topics), `python` (the pydoc topics, then every
    docstring of the standard library's Python source, one document per module) or
    `python-source` (the standard library's .py files). Same documents in the same order for
    a given Python version; test suites and site-packages are left out. `python` is built
    once per Python build and kept in `_text_cache` (a corrupt or missing file is rebuilt)."""
    from pydoc_data.topics import topics

    pydoc = tuple(topics[key] for key in sorted(topics))
    if name == "pydoc":
        return pydoc
    cache_file = _text_cache(name) if name == "python" else None
    if cache_file is not None and cache_file.is_file():
        try:
            return tuple(json.loads(cache_file.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    docs = []
    for rel, path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if name == "python-source":
            docs.append(source)
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        parts = _docstrings(tree, module)
        if parts:
            docs.append("\n\n".join(parts))
    if name == "python-source":
        return tuple(docs)
    out = pydoc + tuple(docs)
    try:  # best effort: a read-only home only costs the parse next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out), encoding="utf-8")
        tmp.replace(cache_file)
    except OSError:
        pass
    return out


def _docstrings(tree: ast.AST, prefix: str) -> list[str]:
    """"qualified name\\n\\ndocstring" for the module, its classes and functions, in source
    order."""
    out = []
    doc = ast.get_docstring(tree, clean=True) if isinstance(tree, ast.Module) else None
    if doc:
        out.append(f"{prefix}\n\n{doc}")
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(f"{name}\n\n{doc}")
            if isinstance(node, ast.ClassDef):
                out.extend(_docstrings(node, name))
    return out


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


# ---- local files ---------------------------------------------------------------------------
def _utf8(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {offset + e.start})") from None


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or first_line(e)}") from None


def _txt_pieces(path: Path, offset: int) -> Iterator[tuple[int, str, bool]]:
    with _open(path) as f:
        f.seek(offset)
        carry, pending = b"", None
        while True:
            chunk = f.read(TXT_PIECE)
            data = carry + chunk
            cut = len(data)
            if chunk:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line break in a whole piece: cut at a character boundary
                    cut = len(data)
                    while cut > 0 and data[cut - 1] & 0xC0 == 0x80:
                        cut -= 1
                    if cut > 0 and data[cut - 1] >= 0xC0:
                        cut -= 1
            piece, carry = data[:cut], data[cut:]
            if piece:
                if pending is not None:
                    yield pending[0], pending[1], False
                pending = (offset, _newlines(_utf8(piece, path, offset)))
                offset += len(piece)
            if not chunk:
                break
        if pending is not None:
            yield pending[0], pending[1], True


def _newlines(text: str) -> str:
    # universal newlines, as Path.read_text did
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _jsonl_pieces(path: Path, offset: int, column: str) -> Iterator[tuple[int, str, bool]]:
    with _open(path) as f:
        f.seek(offset)
        for line in iter(f.readline, b""):
            start, offset = offset, offset + len(line)
            text = _utf8(line, path, start)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"{path}: byte {start}: not valid JSON") from None
            if not isinstance(row, dict) or column not in row:
                cols = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path}: byte {start}: no text column {column!r} "
                                f"(columns: {cols}); set --text-column")
            yield start, str(row[column]), True


def _parquet_file(path: Path, column: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise UserError(f"cannot read {path} as parquet: {first_line(e)}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}: no text column {column!r} (columns: {', '.join(names)}); "
                        "set --text-column")
    return pf


def _parquet_pieces(path: Path, row: int, column: str) -> Iterator[tuple[int, str, bool]]:
    pf = _parquet_file(path, column)
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n <= row:
            first += n
            continue
        values = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
        for i in range(max(0, row - first), n):
            yield first + i, str(values[i]), True
        first += n


def local_files(spec: str) -> list[Path] | None:
    """The files of a local file or folder `spec` (sorted), or None if `spec` is not local."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"--dataset {spec!r}: folder has no .txt/.jsonl/.parquet files")
        return files
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise UserError(f"--dataset {spec!r}: expected a .txt, .jsonl or .parquet file")
        return [path]
    if path.suffix in TEXT_SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"--dataset {spec!r}: no such file or folder")
    return None


def check_file(path: Path, column: str) -> None:
    """Fail early (one line) on a file that cannot be read: unreadable, not UTF-8 at its
    start, or without the text column. The rest is checked as it streams."""
    if path.suffix == ".parquet":
        _parquet_file(path, column)
        return
    with _open(path) as f:
        head = f.read(1 << 16)
    cut = len(head)
    while cut > 0 and len(head) == 1 << 16 and head[cut - 1] & 0x80:
        cut -= 1  # do not judge a character cut by the 64 KiB boundary
    _utf8(head[:cut], path, 0)
    if path.suffix == ".jsonl":
        next(_jsonl_pieces(path, 0, column), None)


class Source:
    """A resumable stream of `(state, text, doc_end)` pieces; see the module docstring."""

    def pieces(self, state=None) -> Iterator[tuple[object, str, bool]]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise a one-line UserError now if the source cannot be read."""


class DocumentList(Source):
    def __init__(self, docs):
        self.docs = docs

    def pieces(self, state=None):
        for i in range(int(state or 0), len(self.docs)):
            yield i, self.docs[i], True


class LocalFiles(Source):
    def __init__(self, files: list[Path], column: str):
        self.files, self.column = files, column

    def check(self) -> None:
        for p in self.files:
            check_file(p, self.column)

    def pieces(self, state=None):
        f0, off0 = state if state is not None else (0, 0)
        for i in range(f0, len(self.files)):
            path, off = self.files[i], off0 if i == f0 else 0
            if path.suffix == ".txt":
                it = _txt_pieces(path, off)
            elif path.suffix == ".jsonl":
                it = _jsonl_pieces(path, off, self.column)
            else:
                it = _parquet_pieces(path, off, self.column)
            for pos, text, end in it:
                yield [i, pos], text, end


class HubDataset(Source):
    """A `datasets` dataset in streaming mode; the state is its `state_dict()`, so a resumed
    stream continues from the saved shard and row without re-reading what came before."""

    def __init__(self, spec: str, split: str, column: str, config: str | None = None,
                 data_files: str | None = None):
        self.spec, self.split, self.column = spec, split, column
        self.config, self.data_files = config, data_files

    def _what(self) -> str:
        cfg = f" config {self.config!r}" if self.config else ""
        return f"dataset {self.spec!r}{cfg} split {self.split!r}"

    def _open(self):
        import datasets

        kw = {}
        if self.config:
            kw["name"] = self.config
        if self.data_files:
            files = [f.strip() for f in self.data_files.split(",") if f.strip()]
            kw["data_files"] = files[0] if len(files) == 1 else files
        try:
            return datasets.load_dataset(self.spec, split=self.split, streaming=True, **kw)
        except Exception as e:  # datasets raises many types for a missing or unreachable id
            raise UserError(f"cannot open {self._what()}: {first_line(e)}") from None

    def check(self) -> None:
        ds = self._open()
        try:
            first = next(iter(ds))
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"cannot read {self._what()}: {first_line(e)}") from None
        if self.column not in first:
            raise UserError(f"dataset {self.spec!r} has no text column {self.column!r} "
                            f"(columns: {', '.join(first)}); set --text-column")

    def pieces(self, state=None):
        ds = self._open()
        if state is not None:
            ds.load_state_dict(state)
        it = iter(ds)
        while True:
            before = ds.state_dict()
            try:
                row = next(it)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"cannot read {self._what()}: {first_line(e)}") from None
            if self.column not in row:
                raise UserError(f"dataset {self.spec!r} has no text column {self.column!r} "
                                f"(columns: {', '.join(row)}); set --text-column")
            yield before, str(row[self.column]), True


def open_source(spec: str, text_column: str, split: str = "train", config: str | None = None,
                data_files: str | None = None) -> Source:
    """The Source named by a --dataset value."""
    if spec in BUILTIN_TEXT:
        return DocumentList(builtin_documents(spec))
    files = local_files(spec)
    if files is not None:
        return LocalFiles(files, text_column)
    return HubDataset(spec, split, text_column, config, data_files)


def local_documents(spec: str, text_column: str) -> list[str] | None:
    """Every document of a built-in or local source, in memory (small sources and tests), or
    None if `spec` is a hub id. The pieces of a .txt file are joined back into one string."""
    src = open_source(spec, text_column)
    if isinstance(src, HubDataset):
        return None
    docs, cur = [], []
    for _, text, end in src.pieces():
        cur.append(text)
        if end:
            docs.append("".join(cur))
            cur = []
    return docs


def hub_documents(spec: str, split: str, text_column: str, config: str | None = None,
                  data_files: str | None = None) -> Iterator[str]:
    """Stream the documents of a `datasets` hub dataset."""
    src = HubDataset(spec, split, text_column, config, data_files)
    src.check()
    for _, text, _ in src.pieces():
        yield text

"""Text sources -> documents: CPython's `pydoc` prose, local .txt/.jsonl/.parquet files or
folders, and `datasets` hub datasets (streamed). Uses only mlsae.config and mlsae.errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mlsae.errors import UserError, first_line

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: not valid JSON") from None
                if text_column not in row:
                    raise UserError(
                        f"{path}:{n}: no text column {text_column!r} "
                        f"(columns: {', '.join(row)}); set --text-column"
                    )
                yield str(row[text_column])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise UserError(
                f"{path}: no text column {text_column!r} "
                f"(columns: {', '.join(table.column_names)}); set --text-column"
            )
        yield from (str(t) for t in table.column(text_column).to_pylist())


def local_documents(spec: str, text_column: str) -> list[str] | None:
    """Documents of `pydoc` or a local file/folder, or None if `spec` is not local."""
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"--dataset {spec!r}: folder has no .txt/.jsonl/.parquet files")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise UserError(f"--dataset {spec!r}: expected a .txt, .jsonl or .parquet file")
        files = [path]
    elif path.suffix in TEXT_SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"--dataset {spec!r}: no such file or folder")
    else:
        return None
    return [doc for p in files for doc in _read_file(p, text_column)]


def hub_documents(spec: str, split: str, text_column: str) -> Iterator[str]:
    """Stream documents of a `datasets` hub dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split, streaming=True)
        first = next(iter(ds))
    except StopIteration:
        return
    except Exception as e:  # datasets raises many types for a missing or unreachable id
        raise UserError(f"cannot open dataset {spec!r} split {split!r}: "
                        f"{first_line(e)}") from None
    if text_column not in first:
        raise UserError(
            f"dataset {spec!r} has no text column {text_column!r} "
            f"(columns: {', '.join(first)}); set --text-column"
        )
    for row in ds:
        yield str(row[text_column])

import json

import pytest
import torch
from conftest import byte_tokenizer

from mlsae.config import DataConfig
from mlsae.data import TokenSource, include_mask, is_holdout, local_documents, pack
from mlsae.data.sources import open_source
from mlsae.errors import UserError

EOS = 257


def test_pack_joins_with_eos_and_drops_tail():
    tok = byte_tokenizer()
    seqs = [s.tolist() for s in pack(["ab", "", "cde", "fg"], tok, EOS, 3)]
    a, b, c, d, e, f, g = (tok(ch, add_special_tokens=False)["input_ids"][0] for ch in "abcdefg")
    assert seqs == [[a, b, EOS], [c, d, e], [EOS, f, g]]  # the final [EOS] tail is dropped


def test_include_mask():
    ids = torch.tensor([[5, 6, 257, 7], [256, 1, 2, 258]])
    cfg = DataConfig()
    m = include_mask(ids, [256, 257, 258], cfg)
    assert m.tolist() == [[False, True, False, True], [False, True, True, False]]
    cfg = DataConfig(exclude_first=0, exclude_special=False)
    assert include_mask(ids, [256, 257, 258], cfg).all()
    cfg = DataConfig(exclude_first=2, exclude_special=False)
    assert include_mask(ids, [], cfg)[:, :2].sum() == 0


def _source(path, **kw):
    cfg = DataConfig(dataset=str(path), ctx_len=16, **kw)
    return TokenSource(cfg, byte_tokenizer(), EOS, seed=3)


def _all_seqs(path):
    return list(pack(local_documents(str(path), "text"), byte_tokenizer(), EOS, 16))


def _take(it, n):
    return [s for _, s in zip(range(n), it)]


def test_holdout_is_disjoint_and_complete(text_file):
    src = _source(text_file, holdout_fraction=0.2, shuffle_buffer=0)
    all_seqs = _all_seqs(text_file)
    want_held = [s for j, s in enumerate(all_seqs) if is_holdout(j, 0.2)]
    want_train = [s for j, s in enumerate(all_seqs) if not is_holdout(j, 0.2)]
    assert 0.1 < len(want_held) / len(all_seqs) < 0.3
    # one epoch of the unshuffled train stream is exactly the non-held-out sequences
    train = _take(src.train_sequences(0), len(want_train) + 2)
    assert torch.equal(torch.stack(train), torch.stack(want_train + want_train[:2]))
    assert torch.equal(src.eval_sequences(10**9), torch.stack(want_held))


def _block_order(train, size, seed, epochs):
    """Independent restatement of the shuffle: blocks of `size`, each permuted by
    randperm(seeded by seed, epoch, block)."""
    out = []
    for e in range(epochs):
        for b in range(0, len(train), size):
            chunk = train[b:b + size]
            g = torch.Generator().manual_seed(seed * 100_003 + e + (b // size) * 1_000_003)
            out += [chunk[i] for i in torch.randperm(len(chunk), generator=g).tolist()]
    return out


def test_block_shuffle_matches_its_definition(text_file):
    train = [s for j, s in enumerate(_all_seqs(text_file)) if not is_holdout(j, 0.05)]
    src = _source(text_file, shuffle_buffer=7)
    got = _take(src.train_sequences(0), 2 * len(train))
    want = _block_order(train, 7, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not all(torch.equal(a, b) for a, b in zip(got, train))  # it did shuffle


def test_legacy_config_keeps_the_old_full_permutation(text_file):
    """A config written before --shuffle-buffer (no field) permutes the whole epoch as
    before: randperm(n, seed * 100003 + epoch) of the train sequences."""
    from mlsae.config import from_dict, to_dict

    d = to_dict(DataConfig(dataset=str(text_file), ctx_len=16))
    del d["shuffle_buffer"], d["prepend_bos"], d["exclude_outliers"]
    cfg = from_dict(DataConfig, d)
    assert cfg.shuffle_buffer is None and cfg.prepend_bos is False
    assert cfg.exclude_outliers == 0 and DataConfig().exclude_outliers == 20
    src = TokenSource(cfg, byte_tokenizer(), EOS, seed=3)
    train = [s for j, s in enumerate(_all_seqs(text_file)) if not is_holdout(j, 0.05)]
    got = _take(src.train_sequences(0), 2 * len(train))
    want = []
    for e in range(2):
        g = torch.Generator().manual_seed(3 * 100_003 + e)
        want += [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # a block that holds the whole epoch (pydoc at the default 1024) gives the same order
    new = _take(_source(text_file, shuffle_buffer=len(train)).train_sequences(0),
                2 * len(train))
    assert all(torch.equal(a, b) for a, b in zip(new, want))


class CountingTokenizer:
    """The byte tokenizer, counting the characters it was asked to encode."""

    def __init__(self):
        self.tok, self.chars = byte_tokenizer(), 0

    def __call__(self, text, **kw):
        self.chars += len(text)
        return self.tok(text, **kw)


@pytest.mark.parametrize("with_index", [True, False])
def test_train_stream_resumes_at_any_position(text_file, tmp_path, with_index, monkeypatch):
    from mlsae.data import sources

    monkeypatch.setattr(sources, "TXT_PIECE", 256)  # many pieces: a resume reads a few
    src = _source(text_file, shuffle_buffer=7)
    index = tmp_path / "data_index.jsonl" if with_index else None
    n = sum(1 for j in range(len(_all_seqs(text_file))) if not is_holdout(j, 0.05))
    full = _take(src.train_sequences(0, index=index), 2 * n + 5)
    for start in (0, 7, 13, n - 1, n + 3, 2 * n - 2):
        tok = CountingTokenizer()
        resumed = TokenSource(src.cfg, tok, EOS, seed=3)
        part = _take(resumed.train_sequences(start, index=index, record=False), 5)
        assert all(torch.equal(a, b) for a, b in zip(part, full[start:start + 5]))
        if with_index:  # re-read from the recorded block, not from the start
            assert tok.chars < 4 * 256
        else:
            assert tok.chars >= start * 15
    if with_index:
        entries = [json.loads(x) for x in index.read_text().splitlines()]
        assert [e["position"] for e in entries][:3] == [7, 14, 21]


def test_txt_streams_in_pieces_as_one_document(tmp_path, monkeypatch):
    """A .txt file is read in pieces cut after a line break; the pieces form one document,
    so the packing equals that of the whole text (byte tokenizer: tokens do not merge)."""
    from mlsae.data import sources

    monkeypatch.setattr(sources, "TXT_PIECE", 50)
    text = "".join(f"line {i} é ü\n" + ("x" * (i % 70)) for i in range(300))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text("second file\r\nwith CRLF\n")
    pieces = list(sources.open_source(str(tmp_path), "text").pieces())
    assert len(pieces) > 20 and sum(end for _, _, end in pieces) == 2
    assert all(len(t.encode()) <= 2 * 50 for _, t, _ in pieces)
    src = TokenSource(DataConfig(dataset=str(tmp_path), ctx_len=16, shuffle_buffer=0,
                                 holdout_fraction=0.0), byte_tokenizer(), EOS)
    want = list(pack([text, "second file\nwith CRLF\n"], byte_tokenizer(), EOS, 16))
    got = [s for _, s, _ in src.packed()]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    # every mark restarts the packing exactly at its sequence
    marks = [(j, m) for j, _, m in src.packed()]
    for j, m in marks[::17]:
        again = next((s for k, s, _ in src.packed(mark=m) if k == j))
        assert torch.equal(again, want[j])


def test_prepend_bos(text_file):
    src = _source(text_file, prepend_bos=True, shuffle_buffer=0, holdout_fraction=0.0)
    seqs = [s for _, s, _ in src.packed()]
    want = list(pack(local_documents(str(text_file), "text"), byte_tokenizer(), EOS, 15))
    assert len(seqs) == len(want)
    assert all(s[0] == 256 and torch.equal(s[1:], w) for s, w in zip(seqs, want))
    # position 0 (BOS) is excluded, as every special token
    assert not include_mask(torch.stack(seqs[:2]), [256, 257, 258], src.cfg)[:, 0].any()


def test_eval_dataset_replaces_holdout(text_file, tmp_path):
    other = tmp_path / "eval.txt"
    other.write_text("held out text " * 50)
    src = _source(text_file, eval_dataset=str(other), shuffle_buffer=0)
    n = len(_all_seqs(text_file))
    train = _take(src.train_sequences(0), n)
    assert all(torch.equal(a, b) for a, b in zip(train, _all_seqs(text_file)))
    ev = src.eval_sequences(10**9)
    assert ev.shape[1] == 16 and len(ev) == (14 * 50 + 1) // 16


def test_jsonl_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n"
                                      + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three", "four", "five", "six"]}), tmp_path / "b.parquet",
                   row_group_size=3)
    (tmp_path / "c.txt").write_text("seven")
    (tmp_path / "ignored.csv").write_text("x")
    want = ["one", "two", "three", "four", "five", "six", "seven"]
    assert local_documents(str(tmp_path), "body") == want
    # every piece's state restarts the stream at that piece (file offset, parquet row)
    src = open_source(str(tmp_path), "body")
    pieces = list(src.pieces())
    for i, (state, _, _) in enumerate(pieces):
        assert [t for _, t, _ in src.pieces(json.loads(json.dumps(state)))] == want[i:]
    with pytest.raises(UserError, match="no text column 'text'"):
        local_documents(str(tmp_path / "a.jsonl"), "text")


@pytest.mark.parametrize("spec,msg", [
    ("/no/such/file.txt", "no such file"),
    ("./missing_dir", "no such file or folder"),
])
def test_bad_dataset_paths(spec, msg):
    with pytest.raises(UserError, match=msg):
        local_documents(spec, "text")


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no .txt"):
        local_documents(str(tmp_path), "text")


def test_empty_dataset_has_no_sequences(tmp_path):
    (tmp_path / "e.txt").write_text("")
    src = _source(tmp_path / "e.txt")
    with pytest.raises(UserError, match="no training sequence"):
        next(src.train_sequences(0))


def test_bad_files_fail_up_front_with_one_line(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte 3\)$"):
        _source(bad)
    late = tmp_path / "late.txt"  # valid at the start: found when the stream reaches it
    late.write_bytes(b"a" * 70_000 + b"\xff")
    src = _source(late, shuffle_buffer=0)
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 70000\)"):
        list(src.packed())
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p.parquet: no text column 'text' \(columns: body\)"):
        _source(tmp_path / "p.parquet")
    ok = tmp_path / "ok.txt"
    ok.write_text("fine")
    real_open = type(ok).open

    def deny(self, *a, **kw):
        if self.name == "ok.txt":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *a, **kw)

    monkeypatch.setattr(type(ok), "open", deny)
    with pytest.raises(UserError, match=r"cannot read .*ok.txt: Permission denied$"):
        _source(ok)


def test_builtin_python_text_is_deterministic():
    from mlsae.data.sources import builtin_documents

    pydoc_docs = local_documents("pydoc", "text")
    assert len(pydoc_docs) > 50 and sum(map(len, pydoc_docs)) > 400_000
    python = builtin_documents("python")
    assert python[:len(pydoc_docs)] == tuple(pydoc_docs)
    assert any(d.startswith("json\n\nJSON (JavaScript Object Notation)") for d in python)
    assert any("json.dumps\n\nSerialize ``obj`` to a JSON formatted ``str``." in d
               for d in python)
    source = builtin_documents("python-source")
    import json as json_module
    import pathlib
    want = pathlib.Path(json_module.__file__).read_text()
    assert want in source
    # the order is the sorted relative paths: computed again from scratch, same result
    builtin_documents.cache_clear()
    assert builtin_documents("python-source") == source


def test_python_text_is_kept_in_the_cache_folder(tmp_path, monkeypatch):
    from mlsae.data import sources

    monkeypatch.setenv("MLSAE_CACHE_DIR", str(tmp_path))
    path = sources._text_cache("python")
    assert path.parent == tmp_path / "text" and sources.python_version() in path.name
    path.parent.mkdir(parents=True)
    path.write_text('["kept"]')
    sources.builtin_documents.cache_clear()
    try:
        assert sources.builtin_documents("python") == ("kept",)
    finally:
        sources.builtin_documents.cache_clear()


def test_hub_dataset_streams_splits_and_resumes_from_its_state(tmp_path):
    """A real `datasets` streaming dataset (the packaged json builder on local files, so no
    network): packed and split like any source; a resume restarts from the recorded
    state_dict and tokenizes only from there."""
    text = "".join(f"document {i} " * (i % 9 + 1) for i in range(400))
    rows = [{"text": text[i:i + 97]} for i in range(0, len(text), 97)]
    for k in range(3):  # three files: three shards
        with open(tmp_path / f"part{k}.jsonl", "w") as f:
            for r in rows[k::3]:
                f.write(json.dumps(r) + "\n")
    files = ",".join(str(tmp_path / f"part{k}.jsonl") for k in range(3))
    docs = [r["text"] for k in range(3) for r in rows[k::3]]
    cfg = DataConfig(dataset="json", data_files=files, ctx_len=16, holdout_fraction=0.2,
                     shuffle_buffer=5)
    src = TokenSource(cfg, byte_tokenizer(), EOS, seed=1)
    all_seqs = list(pack(docs, byte_tokenizer(), EOS, 16))
    train = [s for j, s in enumerate(all_seqs) if not is_holdout(j, 0.2)]
    index = tmp_path / "data_index.jsonl"
    full = _take(src.train_sequences(0, index=index), len(train) + 12)
    want = _block_order(train, 5, 1, 2)
    assert all(torch.equal(a, b) for a, b in zip(full, want))
    assert torch.equal(src.eval_sequences(16 * 4),
                       torch.stack([s for j, s in enumerate(all_seqs) if is_holdout(j, 0.2)][:4]))
    for start in (len(train) // 2 + 1, len(train) + 3):
        tok = CountingTokenizer()
        resumed = TokenSource(cfg, tok, EOS, seed=1)
        part = _take(resumed.train_sequences(start, index=index, record=False), 5)
        assert all(torch.equal(a, b) for a, b in zip(part, full[start:start + 5]))
        assert tok.chars < 20 * 97  # a few rows, not the stream before `start`


def test_hub_dataset_bad_config_and_missing_column(tmp_path):
    """Real `datasets` errors, offline: an unknown config of a local dataset folder and a
    missing text column each give one line."""
    from mlsae.data.sources import HubDataset

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match=r"^cannot open dataset .* config 'nope' split 'train':"
                       r" BuilderConfig 'nope' not found. Available: \['default'\]$"):
        HubDataset(str(tmp_path), "train", "text", config="nope").check()
    cfg = DataConfig(dataset="json", data_files=str(tmp_path / "a.jsonl"))
    with pytest.raises(UserError, match=r"^dataset 'json' has no text column 'text' "
                       r"\(columns: body\); set text_column$"):
        TokenSource(cfg, byte_tokenizer(), EOS)

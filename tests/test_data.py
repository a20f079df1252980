import json

import pytest
import torch
from conftest import byte_tokenizer

from mlsae.config import DataConfig
from mlsae.data import TokenSource, include_mask, is_holdout, local_documents, pack
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


def test_holdout_is_disjoint_and_complete(text_file):
    src = _source(text_file, holdout_fraction=0.2)
    all_seqs = list(pack(local_documents(str(text_file), "text"), byte_tokenizer(), EOS, 16))
    train = src._local_split("train", False)
    held = src.eval_sequences(10**9)
    assert len(train) + len(held) == len(all_seqs)
    assert 0.1 < len(held) / len(all_seqs) < 0.3
    want_held = [s for j, s in enumerate(all_seqs) if is_holdout(j, 0.2)]
    assert torch.equal(held, torch.stack(want_held))
    want_train = [s for j, s in enumerate(all_seqs) if not is_holdout(j, 0.2)]
    assert torch.equal(train, torch.stack(want_train))


def test_train_stream_resumes_at_any_position(text_file):
    src = _source(text_file)
    n = len(src._local_split("train", False))
    full = [s for _, s in zip(range(2 * n + 5), src.train_sequences(0))]
    for start in (0, 7, n - 1, n + 3):
        part = [s for _, s in zip(range(10), src.train_sequences(start))]
        assert all(torch.equal(a, b) for a, b in zip(part, full[start:start + 10]))
    # each epoch is a permutation of the train sequences, in a new order
    first = torch.stack(full[:n])
    second = torch.stack(full[n:2 * n])
    assert not torch.equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))


def test_eval_dataset_replaces_holdout(text_file, tmp_path):
    other = tmp_path / "eval.txt"
    other.write_text("held out text " * 50)
    src = _source(text_file, eval_dataset=str(other))
    assert len(src._local_split("train", False)) == len(
        list(pack(local_documents(str(text_file), "text"), byte_tokenizer(), EOS, 16)))
    ev = src.eval_sequences(10**9)
    assert ev.shape[1] == 16 and len(ev) == (14 * 50 + 1) // 16


def test_jsonl_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n"
                                      + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("five")
    (tmp_path / "ignored.csv").write_text("x")
    assert local_documents(str(tmp_path), "body") == ["one", "two", "three", "four", "five"]
    with pytest.raises(UserError, match="no text column 'text'"):
        local_documents(str(tmp_path / "a.jsonl"), "text")
    with pytest.raises(UserError, match="no text column 'text'"):
        local_documents(str(tmp_path / "b.parquet"), "text")


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


def test_pydoc_default_source():
    docs = local_documents("pydoc", "text")
    assert len(docs) > 50 and sum(map(len, docs)) > 400_000


def _fake_hub(monkeypatch, rows):
    """Stand-in for `datasets.load_dataset(..., streaming=True)`: no network in tests."""
    import datasets

    def load_dataset(spec, split, streaming):
        assert streaming and spec == "owner/corpus" and split == "train"
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_dataset_streams_splits_and_resumes(monkeypatch, text_file):
    text = text_file.read_text()
    rows = [{"text": text[i:i + 2000]} for i in range(0, len(text), 2000)]
    _fake_hub(monkeypatch, rows)
    src = TokenSource(DataConfig(dataset="owner/corpus", ctx_len=16, holdout_fraction=0.2),
                      byte_tokenizer(), EOS)
    all_seqs = list(pack([r["text"] for r in rows], byte_tokenizer(), EOS, 16))
    want_train = [s for j, s in enumerate(all_seqs) if not is_holdout(j, 0.2)]
    train = [s for _, s in zip(range(len(want_train) + 3), src.train_sequences(0))]
    assert all(torch.equal(a, b) for a, b in zip(train, want_train + want_train[:3]))
    resumed = [s for _, s in zip(range(5), src.train_sequences(len(want_train) - 2))]
    assert all(torch.equal(a, b) for a, b in zip(resumed, want_train[-2:] + want_train[:3]))
    held = src.eval_sequences(16 * 4)
    assert torch.equal(held, torch.stack([s for j, s in enumerate(all_seqs)
                                          if is_holdout(j, 0.2)][:4]))


def test_hub_dataset_missing_column(monkeypatch):
    from mlsae.data import hub_documents

    _fake_hub(monkeypatch, [{"body": "x"}])
    with pytest.raises(UserError, match="no text column 'text' .*columns: body"):
        next(hub_documents("owner/corpus", "train", "text"))

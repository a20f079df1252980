"""Bad data and model input of issue 12 through the CLI: one line on stderr, exit code 2,
nothing written. Real files and the real `datasets` / `transformers` code paths, offline; the
one stand-in is a `datasets.load_dataset` that raises the library's own message for an
unknown config of a hub dataset (no network in tests)."""

import pytest
from conftest import make_tiny_lm

from mlsae.cli import main


def base(model_dir, dataset, out):
    return ["train", "--model", str(model_dir), "--dataset", str(dataset), "--ctx-len", "32",
            "--batch-size", "2", "--tokens", "128", "--out", str(out), "--expansion-factor",
            "2", "--k", "4", "--eval-tokens", "0"]


def check(args, capsys, out, msg):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not out.exists()
    return err


def test_non_utf8_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    check(base(tiny_model_dir, bad, tmp_path / "run"), capsys, tmp_path / "run",
          f"{bad}: not UTF-8 text (byte 3)")


def test_unreadable_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("text " * 100)
    real_open = type(f).open

    def deny(self, *a, **kw):  # root reads anything, so chmod cannot make this file unreadable
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *a, **kw)

    monkeypatch.setattr(type(f), "open", deny)
    check(base(tiny_model_dir, f, tmp_path / "run"), capsys, tmp_path / "run",
          f"cannot read {f}: Permission denied")


def test_parquet_without_text_column(tiny_model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["x" * 100] * 10, "id": list(range(10))}), p)
    check(base(tiny_model_dir, p, tmp_path / "run"), capsys, tmp_path / "run",
          f"{p}: no text column 'text' (columns: body, id); set --text-column")


def test_unknown_dataset_config(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import datasets

    def load_dataset(spec, split, streaming, name=None, **kw):
        raise ValueError(f"BuilderConfig '{name}' not found. Available: ['wikitext-2-raw-v1',"
                         " 'wikitext-103-raw-v1']\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = base(tiny_model_dir, "wikitext", tmp_path / "run") + ["--dataset-config", "nope"]
    check(args, capsys, tmp_path / "run",
          "cannot open dataset 'wikitext' config 'nope' split 'train': BuilderConfig 'nope' "
          "not found. Available: ['wikitext-2-raw-v1', 'wikitext-103-raw-v1']")


def test_unknown_revision(text_file, tmp_path, capsys):
    """Offline, a hub model at any revision cannot load: the message names the revision
    (with a network, a revision that does not exist fails the same way)."""
    args = base("EleutherAI/pythia-70m-deduped", text_file, tmp_path / "run")
    check(args + ["--revision", "step999999999"], capsys, tmp_path / "run",
          "cannot load model 'EleutherAI/pythia-70m-deduped' revision 'step999999999': ")


def test_ctx_len_above_position_limit(tmp_path, text_file, capsys):
    lm = make_tiny_lm("gpt2", n_layers=2)
    lm.model.config.n_positions = 64
    lm.model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp_path / "gpt2")
    args = base(tmp_path / "gpt2", text_file, tmp_path / "run")
    args[args.index("--ctx-len") + 1] = "128"
    check(args, capsys, tmp_path / "run",
          f"--ctx-len 128 exceeds the 64 positions of model '{tmp_path / 'gpt2'}'")


@pytest.mark.parametrize("flag,value,msg", [
    ("--blocks", "model.nope", "--blocks 'model.nope': LlamaForCausalLM has no ModuleList"),
])
def test_bad_blocks(tiny_model_dir, text_file, tmp_path, capsys, flag, value, msg):
    check(base(tiny_model_dir, text_file, tmp_path / "run") + [flag, value], capsys,
          tmp_path / "run", msg)


@pytest.mark.parametrize("flag,value,msg", [
    ("--shuffle-buffer", "-1", "--shuffle-buffer must be >= 0"),
    ("--exclude-outliers", "0.5", "--exclude-outliers must be 0 (off) or a factor above 1"),
])
def test_bad_data_flags(tiny_model_dir, text_file, tmp_path, capsys, flag, value, msg):
    check(base(tiny_model_dir, text_file, tmp_path / "run") + [flag, value], capsys,
          tmp_path / "run", msg)

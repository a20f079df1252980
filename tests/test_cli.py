"""Bad input: one line on stderr, exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest

from mlsae.cli import main


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def base(tiny_model_dir, text_file, out):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file),
            "--ctx-len", "32", "--batch-size", "2", "--tokens", "128", "--out", str(out),
            "--expansion-factor", "2", "--k", "4", "--eval-tokens", "64"]


@pytest.mark.parametrize("extra,msg", [
    (["--layers", "7"], "layer 7 is out of range; the model has 4 blocks"),
    (["--layers", "1-x"], "--layers '1-x' is malformed"),
    (["--k", "0"], "--k must be positive"),
    (["--k", "100"], "--k 100 exceeds n_latents 64"),
    (["--expansion-factor", "0"], "--expansion-factor must be positive"),
    (["--exclude-first", "32"], "--exclude-first must be >= 0 and below --ctx-len"),
    (["--model", "/no/such/dir"], "not a model folder"),
    (["--model", "nope.gguf"], "no such .gguf file"),
    (["--dataset", "/no/such.txt"], "no such file"),
    (["--dtype", "float64"], "--dtype 'float64'"),
])
def test_bad_train_input(tiny_model_dir, text_file, tmp_path, capsys, extra, msg):
    code, err = run_cli(base(tiny_model_dir, text_file, tmp_path / "run") + extra, capsys)
    assert code == 2
    assert msg in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_datasets(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    specials = tmp_path / "specials.txt"
    specials.write_text("<eos>" * 500)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "some text"}) + "\n")
    for path, msg in [(empty, "no training sequence"), (specials, "every position"),
                      (rows, "no text column 'text'")]:
        out = tmp_path / f"run-{path.stem}"
        code, err = run_cli(base(tiny_model_dir, path, out), capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_resume_errors(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base(tiny_model_dir, text_file, out)) == 0
    capsys.readouterr()
    code, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert code == 2 and "not a run folder" in err
    code, err = run_cli(["train", "--resume", str(out), "--k", "8"], capsys)
    assert code == 2 and "--k 8 disagrees with the run's 4" in err
    ckpt = out / "checkpoint" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    code, err = run_cli(["train", "--resume", str(out), "--model", str(tiny_model_dir)],
                        capsys)
    assert code == 2 and "corrupt model.safetensors" in err, err


def test_train_cli_prints_per_layer_summary(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(base(tiny_model_dir, text_file, tmp_path / "run") + ["--layers", "0,2"]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "FVU" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = [line.split() for line in out.splitlines()]
    table = {int(r[0]): float(r[1]) for r in lines if r and r[0].isdigit()}
    assert set(table) == {0, 2}
    assert abs(table[2] - summary["per_layer"]["fvu"][1]) < 1e-4


def test_no_traceback_from_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlsae", "train", "--layers", "0-",
                           "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mlsae train: error:")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--k", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a number" in err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--expansion-factor", "--k", "--layers", "--dataset", "--text-column",
                 "--ctx-len", "--holdout-fraction", "--eval-dataset", "--tokens", "--resume",
                 "--batch-size", "--lr", "--seed", "--device", "--dtype", "--exclude-first"):
        assert flag in out
    assert "(default: smollm2-135m)" in out

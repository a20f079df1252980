"""Analysis commands on a hub id or a checkpoint in another format (issue 13): converted once
into a run folder under runs/hub/ (runs/converted/ for a local folder), whose outputs equal
those of the same SAE saved as a native run folder. The hub is a local stand-in
(`huggingface_hub.snapshot_download` patched): no test touches the network."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_formats import write_seed

from mlsae.analysis.codes import converted_dir
from mlsae.cli import main
from mlsae.export import convert

REF = "tim-lawson/mlsae-tiny-x4-k8"  # the seed's naming; "tiny" is no model: --model needed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A seed-format checkpoint served by a stand-in hub; the calls it got."""
    import huggingface_hub

    write_seed(tmp_path / "snap", d=32)
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append(repo_id)
        if repo_id != REF:
            raise OSError(f"404 Client Error: Repository Not Found for {repo_id}\nmore")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return calls


def analyze_args(ref, tiny_model_dir, text_file, model=True):
    return (["analyze", str(ref)] + (["--model", str(tiny_model_dir)] if model else [])
            + ["--dataset", str(text_file), "--tokens", "256", "--batch-size", "4",
               "--ctx-len", "32", "--device", "cpu"])


def outputs(folder: Path) -> tuple[dict, dict]:
    summary = json.loads((folder / "analysis" / "summary.json").read_text())
    summary.pop("seconds")
    return summary, load_file(str(folder / "analysis" / "dists.safetensors"))


def test_analyze_hub_id_converts_once_and_equals_native_run(hub, tmp_path, tiny_model_dir,
                                                             text_file, capsys):
    assert main(analyze_args(REF, tiny_model_dir, text_file)) == 0, capsys.readouterr().err
    folder = Path("runs/hub/tim-lawson--mlsae-tiny-x4-k8")
    assert converted_dir(REF) == folder
    err = capsys.readouterr().err
    assert f"{REF}: converted into the run folder {folder}" in err
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["source_format"] == "seed" and cfg["converted_from"] == REF
    assert cfg["model"] == str(tiny_model_dir) and cfg["layers"] == [0, 1, 2, 3]  # --model
    assert not (tmp_path / "snap" / "analysis").exists()  # nothing written into the "hub"
    got_summary, got_dists = outputs(folder)

    # the same SAE as a native run folder (mlsae convert), analysed the same way
    convert(tmp_path / "snap", tmp_path / "native", model=str(tiny_model_dir))
    assert main(analyze_args(tmp_path / "native", tiny_model_dir, text_file)) == 0
    assert "converted" not in capsys.readouterr().err
    want_summary, want_dists = outputs(tmp_path / "native")
    assert got_summary == want_summary and got_summary["included_tokens"] > 0
    assert got_dists.keys() == want_dists.keys()
    assert all(torch.equal(got_dists[k], want_dists[k]) for k in want_dists)

    # a later call reuses the folder: no second download, one line saying where
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(analyze_args(REF, tiny_model_dir, text_file)) == 0
    err = capsys.readouterr().err
    assert f"{REF}: using its run folder {folder}" in err
    assert hub == [REF] and (folder / "model.safetensors").stat().st_mtime_ns == before
    assert outputs(folder)[0] == want_summary
    # ... and refuses a --model other than the one it was converted for
    other = tmp_path / "other_model"
    assert main(["analyze", REF, "--model", str(other), "--prompt", "x",
                 "--prompts-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert "converted for model" in err and "delete it" in err and len(err.splitlines()) == 1


def test_report_and_examples_on_a_converted_hub_id(hub, tiny_model_dir, text_file, capsys):
    args = ["examples", REF, "--model", str(tiny_model_dir), "--dataset", str(text_file),
            "--tokens", "128", "--batch-size", "4", "--ctx-len", "32", "--device", "cpu",
            "--top", "2", "--window", "2"]
    assert main(args) == 0, capsys.readouterr().err
    folder = Path("runs/hub/tim-lawson--mlsae-tiny-x4-k8")
    assert (folder / "analysis" / "examples.sqlite").is_file()
    assert main(["examples", REF, "--show", "0"]) == 0
    assert main(["report", REF]) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / 'report' / 'index.html'}" in out
    assert hub == [REF]


def test_local_seed_folder_is_converted_not_written_into(hub, tmp_path, tiny_model_dir,
                                                          text_file, capsys):
    snap = tmp_path / "snap"
    assert main(analyze_args(snap, tiny_model_dir, text_file)) == 0, capsys.readouterr().err
    folder = converted_dir(snap)
    assert folder.parent == Path("runs/converted") and folder.name.startswith("snap-")
    assert (folder / "analysis" / "summary.json").is_file()
    assert not (snap / "analysis").exists() and hub == []
    assert json.loads((folder / "config.json").read_text())["converted_from"] == str(snap)


@pytest.mark.parametrize("ref,msg", [
    ("no/such/run", "no such run folder"),          # two slashes: a path, not a hub id
    ("./missing", "no such run folder"),
    ("someone/missing", "not downloadable from the hub (404 Client Error"),
    (REF, "names no layers: pass --model"),           # "tiny" is not a model: nothing written
])
def test_bad_references_one_line_exit_2(hub, ref, msg, tiny_model_dir, text_file, capsys):
    assert main(analyze_args(ref, tiny_model_dir, text_file, model=False)) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err
    assert not Path("runs").exists()


def test_serve_a_hub_id(hub, tiny_model_dir, capsys):
    """`create_app` (what `mlsae serve` runs) on a hub id: converted once, then served; its
    codes equal the checkpoint's own encoding."""
    from fastapi.testclient import TestClient

    from mlsae.sae import MLSAE
    from mlsae.server.app import create_app

    app = create_app(REF, model=str(tiny_model_dir), device="cpu")
    folder = Path("runs/hub/tim-lawson--mlsae-tiny-x4-k8")
    assert (folder / "config.json").is_file() and hub == [REF]
    client = TestClient(app)
    info = client.get("/api/info").json()
    sae = MLSAE.from_pretrained(folder)
    assert info["layers"] == sae.layers and info["n_latents"] == sae.n_latents
    with pytest.raises(Exception, match="no such run folder"):
        create_app("./missing", model=str(tiny_model_dir), device="cpu")


def test_mistyped_run_folder_is_not_looked_up_on_the_hub(hub, tiny_model_dir, text_file,
                                                         capsys):
    Path("runs").mkdir()
    assert main(analyze_args("runs/typo", tiny_model_dir, text_file)) == 2
    err = capsys.readouterr().err.strip()
    assert "no such run folder" in err and len(err.splitlines()) == 1 and hub == []

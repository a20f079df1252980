"""Paths of devices this CPU machine does not have. Apple MPS has no float64: every float64
statistic of training must be made by `mlsae.metrics.f64`, which moves the tensor to the host
first on such a device (checked with a stand-in tensor, and by reading the source)."""

import ast
from pathlib import Path

import torch

import mlsae
from mlsae.metrics import f64

ROOT = Path(mlsae.__file__).parent
# Modules whose statistics may run on an accelerator.
DEVICE_MODULES = [*sorted((ROOT / "train").glob("*.py")), ROOT / "metrics.py", ROOT / "lens.py",
                  ROOT / "evaluate.py"]


class FakeMPSTensor:
    """Records what is done to it; `.double()` refuses unless the data moved to the host."""

    def __init__(self):
        self.device = torch.device("mps")
        self.calls = []

    def detach(self):
        self.calls.append("detach")
        return self

    def cpu(self):
        self.calls.append("cpu")
        return torch.ones(3)

    def double(self):
        raise AssertionError("float64 on a device without float64")


def test_f64_moves_to_host_where_the_device_has_no_float64():
    t = FakeMPSTensor()
    out = f64(t)
    assert t.calls == ["detach", "cpu"] and out.dtype == torch.float64
    assert out.device.type == "cpu"


def test_f64_stays_on_devices_with_float64():
    x = torch.arange(4.0, requires_grad=True)
    out = f64(x)
    assert out.dtype == torch.float64 and not out.requires_grad


def float64_sites(path: Path) -> list[str]:
    """`.double()` calls and `float64` tensors created on a given device, outside f64."""
    bad = []
    tree = ast.parse(path.read_text())
    allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               and f.name == "f64" for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in allowed:
            fn = node.func
            if isinstance(fn, ast.Attribute) and fn.attr == "double":
                bad.append(f"{path.name}:{node.lineno} .double()")
            kws = {k.arg: k.value for k in node.keywords}
            dtype = kws.get("dtype")
            if ("device" in kws and isinstance(dtype, ast.Attribute)
                    and dtype.attr in ("float64", "double")):
                bad.append(f"{path.name}:{node.lineno} float64 on a device")
    return bad


def test_device_statistics_make_float64_only_through_f64():
    bad = [site for p in DEVICE_MODULES for site in float64_sites(p)]
    assert bad == [], bad


def test_auto_dtype_follows_the_hardware(monkeypatch):
    from mlsae import runtime

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.auto_dtype(torch.device("cuda")) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.auto_dtype(torch.device("cuda")) == "float32"
    assert runtime.auto_dtype(torch.device("mps")) == "float32"
    monkeypatch.setattr(runtime, "CPU_AUTO_BF16", True)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.auto_dtype(torch.device("cpu")) == "bfloat16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.auto_dtype(torch.device("cpu")) == "float32"
    assert runtime.resolve_lm_dtype("float16", torch.device("cuda")) == "float16"


def test_run_records_the_resolved_dtype_and_resumes_with_auto(tiny_lm, text_file, tmp_path):
    import json
    import os
    import signal

    from test_train import small_cfg

    from mlsae.train import train

    def stop(trainer):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = small_cfg(text_file, tmp_path / "run", eval_tokens=0)
    assert cfg.train.dtype == "auto"
    train(cfg, lm=tiny_lm, on_step=stop, progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["lm_dtype"] == "float32" and meta["run"]["train"]["dtype"] == "float32"
    res = train(resume=tmp_path / "run", given={"dtype": "auto"}, lm=tiny_lm, progress=False)
    assert res["finished"]


def test_bf16_training_is_scored_on_float32_activations(tiny_model_dir, text_file, tmp_path):
    """With the LM in bfloat16 for training, the held-out summary scores FLOAT32 activations
    (the float32 model the bf16 copy was cast from), compared here with a float32 LM."""
    import json

    from test_train import small_cfg

    from mlsae.data import TokenSource, include_mask
    from mlsae.lm import load_lm
    from mlsae.sae import MLSAE
    from mlsae.train import train

    cfg = small_cfg(text_file, tmp_path / "run", model=str(tiny_model_dir), dtype="bfloat16",
                    layers="0,2")
    res = train(cfg, progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["lm_dtype"] == "bfloat16"
    lm32 = load_lm(str(tiny_model_dir), "cpu", "float32")
    data = res["trainer"].cfg.data
    seqs = TokenSource(data, lm32.tokenizer, lm32.eos_id).eval_sequences(512)
    mask = include_mask(seqs, lm32.special_ids, data)
    x = lm32.resid_post(seqs, [0, 2])[:, mask].double()
    sae = MLSAE.from_pretrained(tmp_path / "run")
    for i in range(2):
        x_hat = sae(x[i].float()).x_hat.detach().double()
        fvu = ((x_hat - x[i]) ** 2).sum() / ((x[i] - x[i].mean(0)) ** 2).sum()
        assert abs(fvu.item() - res["summary"]["per_layer"]["fvu"][i]) < 1e-4

"""Several checkpoints evaluated together (`evaluate_many`, `mlsae eval A B ...`) against each
evaluated alone; the SAE-independent cache and its invalidation; folder expansion; dtype."""

import json
import shutil

import pytest
from conftest import make_tiny_lm
from test_lens_runs import CTX, LAYERS, make_run, random_lens

import mlsae.evaluate as ev
from mlsae.cli import main
from mlsae.compare import compare
from mlsae.errors import UserError
from mlsae.evaluate import EvalCache, evaluate, evaluate_many
from mlsae.formats import detect
from mlsae.lm import cast_lm
from mlsae.options import TextOptions
from mlsae.runs import expand_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKENS = 4 * CTX * 3  # 3 batches of 4 sequences
VOLATILE = ("seconds", "out")


def opts(text_file, **kw):
    return TextOptions(**dict(dict(tokens=TOKENS, batch_size=4, dataset=str(text_file),
                                   ctx_len=CTX), **kw))


def strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def zoo(tiny_model_dir, text_file, tmp_path_factory):
    """Checkpoints of the tiny Llama: a plain MLSAE, a lens run, a baselines folder (one
    single-layer run per layer), a SAELens export of one layer, a copy of the plain run that
    counts other positions (exclude_first 5), and a sweep folder of two runs."""
    root = tmp_path_factory.mktemp("zoo")
    plain = root / "plain"
    make_run(plain, tiny_model_dir, text_file)
    lens_dir = root / "lens"
    random_lens(lens_dir, seed=0)
    lens_run = root / "lensrun"
    make_run(lens_run, tiny_model_dir, text_file, lens_dir)
    base = root / "baselines"
    for layer in LAYERS:
        make_run(base / f"layer_{layer}", tiny_model_dir, text_file, layers=[layer],
                 seed=10 + layer, n_latents=64, k=4)
    (base / "fvu_matrix.csv").write_text("train_layer\n")  # what `mlsae baselines` leaves
    single = root / "single"
    make_run(single, tiny_model_dir, text_file, layers=[LAYERS[-1]], seed=5, n_latents=64, k=4)
    exported = root / "exported"
    assert main(["export", str(single), "--out", str(exported)]) == 0
    foreign = exported / f"layer_{LAYERS[-1]}"
    shifted = root / "shifted"
    shutil.copytree(plain, shifted)
    cfg = json.loads((shifted / "config.json").read_text())
    cfg["run"]["data"]["exclude_first"] = 5
    (shifted / "config.json").write_text(json.dumps(cfg))
    sweep = root / "sweep"
    for name, k in (("k4", 4), ("k8", 8)):
        make_run(sweep / name, tiny_model_dir, text_file, seed=20 + k, k=k)
    (sweep / "sweep.json").write_text(json.dumps({"sweep": "k=4,8", "runs": ["k4", "k8"]}))
    return {"plain": plain, "lens": lens_run, "baselines": base, "foreign": foreign,
            "shifted": shifted, "sweep": sweep}


def test_expand_checkpoints(zoo, tmp_path):
    base = zoo["baselines"]
    got = expand_checkpoints([str(zoo["plain"]), str(base), str(zoo["sweep"]), "owner/name",
                              str(zoo["plain"])])
    assert got == [str(zoo["plain"])] + [str(base / f"layer_{v}") for v in LAYERS] + [
        str(zoo["sweep"] / "k4"), str(zoo["sweep"] / "k8"), "owner/name"]
    many = tmp_path / "many"
    for name in ("layer_10", "layer_2"):
        shutil.copytree(base / f"layer_{LAYERS[0]}", many / name)
    assert expand_checkpoints([many]) == [str(many / "layer_2"), str(many / "layer_10")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a checkpoint nor a folder of checkpoints"):
        expand_checkpoints([tmp_path / "empty"])


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_together_equals_alone_float32(zoo, tiny_lm, text_file, tmp_path, ablation):
    """An MLSAE, a lens run, a baselines folder, a SAELens checkpoint and a run counting other
    positions, in one pass: every eval.json equals the checkpoint's own evaluation, exactly."""
    cks = [str(zoo["plain"]), str(zoo["lens"]), *expand_checkpoints([zoo["baselines"]]),
           str(zoo["foreign"]), str(zoo["shifted"])]
    assert detect(zoo["foreign"]) == "saelens"
    o = opts(text_file)
    together = evaluate_many(cks, o, [tmp_path / f"t{i}.json" for i in range(len(cks))],
                             ablation=ablation, lm=tiny_lm, progress=False, cache=False)
    for i, c in enumerate(cks):
        alone = evaluate(c, o, out=tmp_path / f"a{i}.json", ablation=ablation, lm=tiny_lm,
                         progress=False, cache=False)
        assert strip(together[i]) == strip(alone), c
        written = json.loads((tmp_path / f"t{i}.json").read_text())
        assert strip(written) == strip(json.loads((tmp_path / f"a{i}.json").read_text()))
    assert together[1]["lens"] and "lens" not in together[0]
    assert together[-1]["included_tokens"] < together[0]["included_tokens"]  # other positions
    assert min(together[0]["per_layer"]["dce"]) > 0  # real splices, not a no-op


def test_together_equals_alone_bfloat16(zoo, tiny_lm, text_file, tmp_path):
    """With the LM in bfloat16, together vs alone agree to 1e-6 relative (observed: exactly),
    and both stay near the float32 numbers (CE within 2%)."""
    bf = cast_lm(tiny_lm, "bfloat16")
    cks = [str(zoo["plain"]), str(zoo["lens"]), str(zoo["baselines"] / f"layer_{LAYERS[0]}")]
    o = opts(text_file)
    together = evaluate_many(cks, o, [tmp_path / f"t{i}.json" for i in range(len(cks))],
                             lm=bf, progress=False, cache=False)
    for i, c in enumerate(cks):
        alone = evaluate(c, o, out=tmp_path / f"a{i}.json", lm=bf, progress=False, cache=False)
        f32 = evaluate(c, o, out=tmp_path / f"f{i}.json", lm=tiny_lm, progress=False,
                       cache=False)
        assert together[i]["lm_dtype"] == "bfloat16" and f32["lm_dtype"] == "float32"
        for key in ("fvu", "ce_clean", "ce_recon", "ce_zero", "kl", "l0"):
            assert together[i]["per_layer"][key] == pytest.approx(
                alone["per_layer"][key], rel=1e-6, abs=1e-9), (c, key)
            if key.startswith("ce"):
                assert together[i]["per_layer"][key] == pytest.approx(
                    f32["per_layer"][key], rel=2e-2), (c, key)


def test_cli_eval_several_and_folders(zoo, text_file, tmp_path, capsys):
    """`mlsae eval RUN BASEDIR SWEEP --out-dir D` writes one file per checkpoint, each equal
    to `mlsae eval` of that checkpoint alone; it says up front what it will evaluate."""
    flags = ["--dataset", str(text_file), "--ctx-len", str(CTX), "--tokens", str(TOKENS),
             "--batch-size", "4", "--no-cache"]
    out = tmp_path / "together"
    assert main(["eval", str(zoo["plain"]), str(zoo["baselines"]), str(zoo["sweep"]),
                 "--out-dir", str(out), *flags]) == 0
    err = capsys.readouterr().err
    n = 1 + len(LAYERS) + 2
    assert f"evaluating {n} checkpoints on {TOKENS} tokens: 3 batches of 4 x {CTX}" in err
    assert "first batch took" in err
    names = ["plain"] + [f"layer_{v}" for v in LAYERS] + ["k4", "k8"]
    assert sorted(p.stem for p in out.iterdir()) == sorted(names)
    for name, src in [("plain", zoo["plain"]), ("k8", zoo["sweep"] / "k8"),
                      (f"layer_{LAYERS[1]}", zoo["baselines"] / f"layer_{LAYERS[1]}")]:
        assert main(["eval", str(src), "--out", str(tmp_path / "alone.json"), *flags]) == 0
        alone = json.loads((tmp_path / "alone.json").read_text())
        assert strip(json.loads((out / f"{name}.json").read_text())) == strip(alone), name
    capsys.readouterr()
    assert main(["eval", str(zoo["plain"]), str(zoo["sweep"]), "--out", "x.json",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert "--out names one file" in err and len(err.strip().splitlines()) == 1


def test_compare_evaluates_the_missing_together(zoo, tiny_lm, text_file, tmp_path,
                                                monkeypatch):
    """compare evaluates the MLSAE and its baselines lacking eval.json in ONE evaluate_many
    call, with the same numbers as each alone."""
    run = tmp_path / "run"
    shutil.copytree(zoo["plain"], run)
    shutil.copytree(zoo["baselines"], run / "baselines")
    calls = []
    real = ev.evaluate_many

    def spy(cks, *a, **kw):
        calls.append(list(cks))
        return real(cks, *a, **kw)

    monkeypatch.setattr("mlsae.compare.evaluate_many", spy)
    compare(run, run / "baselines", out_dir=tmp_path / "cmp", opts=opts(text_file),
            lm=tiny_lm, progress=False, cache=False)
    assert len(calls) == 1 and len(calls[0]) == 1 + len(LAYERS)
    got = json.loads((run / "baselines" / f"layer_{LAYERS[0]}" / "eval.json").read_text())
    alone = evaluate(zoo["baselines"] / f"layer_{LAYERS[0]}", opts(text_file),
                     out=tmp_path / "a.json", lm=tiny_lm, progress=False, cache=False)
    assert strip(dict(got, checkpoint=None)) == strip(dict(alone, checkpoint=None))


def count_continuations(monkeypatch) -> list:
    """Count the spliced continuations (`_Head.hidden_from` with a layer below the last)."""
    seen = []
    real = ev._Head.hidden_from

    def spy(self, ids, layer, resid):
        seen.append(ids.shape[0])
        return real(self, ids, layer, resid)

    monkeypatch.setattr(ev._Head, "hidden_from", spy)
    return seen


def test_cache_reuses_and_invalidates(zoo, tiny_lm, text_file, tmp_path, monkeypatch):
    """The ablation sums are kept per batch and reused exactly; a changed model, text, dtype
    or setting (ablation, counted positions) is another key: nothing stale is read."""
    o, plain = opts(text_file), zoo["plain"]
    n_abl = len(LAYERS) * 3  # (layer, ablation) pairs x batches
    uncached = evaluate(plain, o, out=tmp_path / "u.json", lm=tiny_lm, progress=False,
                        cache=False)

    def run(cache, **kw):
        kw.setdefault("lm", tiny_lm)
        res = evaluate_many([kw.pop("ck", plain)], kw.pop("o", o), [tmp_path / "c.json"],
                            progress=False, cache=cache, **kw)[0]
        return res, cache.hits, cache.misses

    res, hits, misses = run(EvalCache(tmp_path / "cache"))
    assert (hits, misses) == (0, n_abl) and strip(res) == strip(uncached)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3  # one file per batch
    seen = count_continuations(monkeypatch)
    res, hits, misses = run(EvalCache(tmp_path / "cache"))
    assert (hits, misses) == (n_abl, 0) and strip(res) == strip(uncached)
    cached_batch_seqs = sum(seen)
    seen.clear()
    evaluate(plain, o, out=tmp_path / "u2.json", lm=tiny_lm, progress=False, cache=False)
    assert cached_batch_seqs < sum(seen)  # the ablation continuations were skipped
    # invalidation: each change misses every entry, and the numbers are the fresh ones
    other_text = tmp_path / "other.txt"
    other_text.write_text(text_file.read_text()[::-1])
    other_lm = make_tiny_lm("llama", n_layers=4, d=32, seed=7)
    cases = {"model": dict(lm=other_lm), "dtype": dict(lm=cast_lm(tiny_lm, "bfloat16")),
             "text": dict(o=opts(other_text)), "ctx_len": dict(o=opts(text_file, ctx_len=24)),
             "ablation": dict(ablation="mean"), "positions": dict(ck=zoo["shifted"])}
    for name, kw in cases.items():
        fresh_kw = dict(kw)
        res, hits, misses = run(EvalCache(tmp_path / "cache"), **kw)
        assert hits == 0 and misses > 0, name
        want = evaluate_many([fresh_kw.pop("ck", plain)], fresh_kw.pop("o", o),
                             [tmp_path / "f.json"], progress=False, cache=False,
                             **dict(dict(lm=tiny_lm), **fresh_kw))[0]
        assert strip(res) == strip(want), name
    # a hit is read, not recomputed: a doctored entry shows up in ce_zero
    path = sorted((tmp_path / "cache").glob("*.json"))
    doctored = 0
    for p in path:
        data = json.loads(p.read_text())
        data["ce"] = {k: v + 1000.0 for k, v in data["ce"].items()}
        p.write_text(json.dumps(data))
        doctored += 1
    res, hits, _ = run(EvalCache(tmp_path / "cache"))
    assert hits == n_abl and doctored
    assert all(z > u + 5 for z, u in zip(res["per_layer"]["ce_zero"],
                                           uncached["per_layer"]["ce_zero"]))


def test_dtype_auto_follows_the_device(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """`--dtype auto` loads the LM as training would: float32 here (MLSAE_CPU_BF16=0 in the
    tests), bfloat16 where `auto_dtype` says the device computes it natively."""
    import mlsae.runtime as rt

    run = tmp_path / "run"
    make_run(run, tiny_model_dir, text_file)
    o = opts(text_file, dtype="auto", tokens=4 * CTX)
    res = evaluate(run, o, out=tmp_path / "a.json", progress=False, cache=False)
    assert res["lm_dtype"] == "float32" and res["options"]["dtype"] == "auto"
    monkeypatch.setattr(rt, "auto_dtype", lambda device: "bfloat16")
    res = evaluate(run, o, out=tmp_path / "b.json", progress=False, cache=False)
    assert res["lm_dtype"] == "bfloat16"

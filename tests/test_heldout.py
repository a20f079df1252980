"""Held-out text stays held out whatever the flags (issue 12): with --ctx-len or --model
overrides, every evaluated window lies inside the run's own held-out sequences, checked
against an independent re-packing of the run's text; and a run trained from an activation
cache takes the cache's split."""

import pytest
from conftest import byte_tokenizer, save_tiny_model

from mlsae.config import DataConfig, RunConfig, SAEConfig, TrainConfig
from mlsae.data import is_holdout, local_documents, pack
from mlsae.errors import UserError
from mlsae.options import TextOptions
from mlsae.runs import eval_batches
from mlsae.sae import MLSAE
from mlsae.train.plan import adopt_cache_manifest

RUN_CTX, FRAC = 32, 0.3


def _sae(model: str, text_file) -> MLSAE:
    cfg = RunConfig(SAEConfig(), DataConfig(dataset=str(text_file), ctx_len=RUN_CTX,
                                            holdout_fraction=FRAC), TrainConfig(model=model))
    return MLSAE(32, 64, 4, config={"model": model, "layers": [0, 1], "run": cfg.to_dict()})


def _heldout_runs(text_file) -> list[list[int]]:
    """Brute force: pack the run's text, mark held-out sequences, join adjacent ones."""
    seqs = [s.tolist() for s in pack(local_documents(str(text_file), "text"), byte_tokenizer(),
                                      257, RUN_CTX)]
    runs, prev = [], -2
    for j, s in enumerate(seqs):
        if is_holdout(j, FRAC):
            if j == prev + 1:
                runs[-1] += s
            else:
                runs.append(list(s))
            prev = j
    train = [s for j, s in enumerate(seqs) if not is_holdout(j, FRAC)]
    return runs, train


def _inside(window: list[int], runs: list[list[int]]) -> bool:
    n = len(window)
    return any(run[i:i + n] == window for run in runs for i in range(len(run) - n + 1))


@pytest.mark.parametrize("ctx_len", [8, 20, RUN_CTX, 64])
def test_every_window_lies_inside_held_out_text(tiny_lm, tiny_model_dir, text_file, ctx_len):
    sae = _sae(str(tiny_model_dir), text_file)
    runs, train = _heldout_runs(text_file)
    opts = TextOptions(ctx_len=ctx_len, tokens=10**6, batch_size=4)
    cfg, batch_list, tokens = eval_batches(sae, tiny_lm, opts)
    windows = [w.tolist() for b in batch_list for w in b]
    assert cfg.ctx_len == ctx_len and all(len(w) == ctx_len for w in windows)
    assert len(windows) > 0 and tokens == len(windows) * ctx_len
    assert all(_inside(w, runs) for w in windows)
    if ctx_len <= RUN_CTX:  # the held-out text is used: one window per slot of each run
        assert len(windows) == sum(len(r) // ctx_len for r in runs)
    # the check has teeth: windows of the NEW packing's held-out sequences (the old way)
    # were mostly trained-on text
    naive = [s.tolist() for j, s in enumerate(pack(local_documents(str(text_file), "text"),
                                                     byte_tokenizer(), 257, ctx_len))
             if is_holdout(j, FRAC)]
    if ctx_len != RUN_CTX:
        assert sum(_inside(w, runs) for w in naive) < 0.6 * len(naive)


def test_other_model_windows_are_held_out_text(tiny_lm, tmp_path, text_file):
    """--model with another tokenizer: the run's held-out text is decoded and re-tokenized;
    every window's text is a piece of the held-out text."""
    run_model = save_tiny_model(tmp_path / "run_model")
    sae = _sae(str(run_model), text_file)
    runs, _ = _heldout_runs(text_file)
    tok = byte_tokenizer()
    held_text = [tok.decode(r) for r in runs]
    opts = TextOptions(model="another", ctx_len=16, tokens=10**6, batch_size=4)
    _, batch_list, _ = eval_batches(sae, tiny_lm, opts)
    windows = [w.tolist() for b in batch_list for w in b]
    assert len(windows) > 0
    for w in windows:
        assert any(tok.decode(w) in t for t in held_text)


def test_ctx_len_above_the_model_limit(tiny_lm, tiny_model_dir, text_file):
    sae = _sae(str(tiny_model_dir), text_file)
    limit = tiny_lm.model.config.max_position_embeddings
    with pytest.raises(UserError, match=f"^ctx_len {limit + 1} exceeds the {limit} "
                       "positions of model"):
        eval_batches(sae, tiny_lm, TextOptions(ctx_len=limit + 1))


def test_cache_run_takes_the_cache_split():
    manifest = {"model": "m", "layers": [0, 1], "data": DataConfig(
        holdout_fraction=0.1, eval_dataset=None).__dict__}
    cfg = RunConfig()
    adopt_cache_manifest(cfg, manifest, given={})
    assert cfg.data.holdout_fraction == 0.1 and cfg.train.model == "m"
    cfg = RunConfig(data=DataConfig(holdout_fraction=0.1))
    adopt_cache_manifest(cfg, manifest, given={"holdout_fraction": 0.1})
    with pytest.raises(UserError, match=r"^holdout_fraction 0.2 disagrees with the "
                       r"activation cache's 0.1 \(the cache fixes the data and the held-out "
                       r"split\)$"):
        adopt_cache_manifest(RunConfig(), manifest, given={"holdout_fraction": 0.2})
    with pytest.raises(UserError, match="eval_dataset 'x.txt' disagrees"):
        adopt_cache_manifest(RunConfig(), manifest, given={"eval_dataset": "x.txt"})

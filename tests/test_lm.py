import pytest
import torch
from conftest import ARCHS, make_tiny_lm

from mlsae.config import resolve_layers
from mlsae.errors import UserError
from mlsae.lm import find_blocks, load_lm


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    return make_tiny_lm(request.param, n_layers=3)


def test_finds_blocks(lm):
    assert lm.n_layers == 3
    assert find_blocks(lm.model) is lm.blocks


def test_resid_post_matches_hidden_states(lm):
    ids = torch.randint(0, 256, (2, 9))
    resid = lm.resid_post(ids, [0, 1, 2])
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    assert resid.shape == (3, 2, 9, 32)
    # hidden_states[l+1] is block l's output, except the last slot, which most models
    # replace with the final-normed output: that is not resid_post.
    for layer in (0, 1):
        torch.testing.assert_close(resid[layer], hs[layer + 1], rtol=0, atol=0)


def test_stops_after_last_needed_block(lm):
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, b in enumerate(lm.blocks)]
    try:
        lm.resid_post(torch.randint(0, 256, (1, 5)), [0, 1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_splice_identity_gives_clean_logits_exactly(lm):
    ids = torch.randint(0, 256, (2, 7))
    clean = lm.logits(ids)
    resid = lm.resid_post(ids, [0, 1, 2])
    for layer in range(3):
        assert torch.equal(lm.logits_from(ids, layer, resid[layer]), clean)


def test_splice_matches_a_hook_replacement(lm):
    """Replacing resid_post at layer 1 equals a full forward whose block 1 output is swapped."""
    ids = torch.randint(0, 256, (2, 7))
    new = torch.randn(2, 7, 32)

    def swap(_m, _a, out):
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    h = lm.blocks[1].register_forward_hook(swap)
    try:
        with torch.no_grad():
            ref = lm.model(ids, use_cache=False).logits
    finally:
        h.remove()
    got = lm.logits_from(ids, 1, new)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, lm.logits(ids))


@pytest.mark.parametrize("spec,want", [
    ("all", list(range(30))), ("0,3,7", [0, 3, 7]), ("0-29", list(range(30))),
    ("0-29:2", list(range(0, 30, 2))), ("5", [5]), ("3-5,1", [1, 3, 4, 5]),
])
def test_resolve_layers(spec, want):
    assert resolve_layers(spec, 30) == want


@pytest.mark.parametrize("spec,msg", [
    ("30", "out of range"), ("-1", "malformed"), ("a,b", "malformed"), ("5-2", "malformed"),
    ("0-29:0", "malformed"), ("", "malformed"),
])
def test_resolve_layers_errors(spec, msg):
    with pytest.raises(UserError, match=msg):
        resolve_layers(spec, 30)


def test_load_local_folder(tiny_model_dir):
    lm = load_lm(str(tiny_model_dir))
    assert lm.n_layers == 4 and lm.d_model == 32 and lm.eos_id == 257


@pytest.mark.parametrize("name,msg", [
    ("/nonexistent/model", "not a model folder"),
    ("missing.gguf", "no such .gguf file"),
    ("a/b/c", "not a hub id"),
])
def test_load_errors(name, msg):
    with pytest.raises(UserError, match=msg):
        load_lm(name)


def test_unknown_hub_id_offline():
    with pytest.raises(UserError, match="cannot load model"):
        load_lm("no-such-owner/no-such-model")


def test_known_block_path_wins_over_other_stacks():
    """A second ModuleList of the same length elsewhere does not confuse the known path."""
    from torch import nn

    lm = make_tiny_lm("llama", n_layers=3)
    lm.model.extra = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert find_blocks(lm.model) is lm.model.model.layers


def test_generic_search_refuses_ambiguity_and_blocks_overrides():
    from torch import nn

    class Wrapper(nn.Module):  # a multimodal-like wrapper at no known path
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.vision = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.text = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    lm = make_tiny_lm("llama", n_layers=3)
    w = Wrapper(lm.model.config)
    with pytest.raises(UserError, match=r"^Wrapper has several stacks of 3 blocks \(vision, "
                       r"text\); choose one with blocks PATH$"):
        find_blocks(w)
    assert find_blocks(w, "text") is w.text
    del w.vision
    assert find_blocks(w) is w.text  # one stack: the generic search finds it
    with pytest.raises(UserError, match="blocks 'nope'"):
        find_blocks(w, "nope")


def test_blocks_flag_through_load_lm(tiny_model_dir):
    lm = load_lm(str(tiny_model_dir), blocks="model.layers")
    assert lm.blocks is lm.model.model.layers


def test_prepend_bos_follows_the_tokenizer_convention(text_file):
    """Default (None): BOS first iff the tokenizer adds it (Gemma-style), recorded by
    settle_data; the byte tokenizer adds none, so nothing changes for it."""
    from conftest import byte_tokenizer
    from tokenizers.processors import TemplateProcessing

    from mlsae.config import DataConfig, RunConfig
    from mlsae.data import TokenSource
    from mlsae.data.split import adds_bos
    from mlsae.train.plan import settle_data

    plain = byte_tokenizer()
    gemma_like = byte_tokenizer()
    gemma_like._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 256)])
    assert not adds_bos(plain) and adds_bos(gemma_like)
    for tok, want in ((plain, False), (gemma_like, True)):
        cfg = RunConfig(data=DataConfig(dataset=str(text_file), ctx_len=16))
        settle_data(cfg, tok)
        assert cfg.data.prepend_bos is want
        src = TokenSource(DataConfig(dataset=str(text_file), ctx_len=16), tok, 257)
        first = next(s for _, s, _ in src.packed())
        assert (first[0].item() == 256) is want

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

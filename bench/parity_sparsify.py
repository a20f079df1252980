"""Quality parity: mlsae vs EleutherAI sparsify on the same single-layer work, one process.

Work: SmolLM2-135M resid_post of block 15, expansion 8, k 32, ctx 256, 8 sequences per step,
65536 training tokens (32 steps), CPython's pydoc text. Both trainers see the SAME 256
training sequences in the same order (mlsae's packing and epoch-0 shuffle), and both SAEs
are scored on the SAME held-out tokens (mlsae's held-out split, position 0 and special
tokens excluded) by the same FVU code (`mlsae.metrics.ReconstructionStats`).

sparsify runs with its own defaults (SignSGD + schedule-free, lr 5e-3/sqrt(n/2^14), no
AuxK, b_dec = batch mean, no standardization), except `log_to_wandb=False`. By default it
trains on every position (it cannot exclude position 0); `--sparsify-exclude-special` passes
`exclude_tokens=<special ids>`.

    .venv/bin/pip install -c <(echo torch==2.13.0) eai-sparsify==1.3.3
    .venv/bin/python bench/parity_sparsify.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mlsae import DataConfig, SAEConfig, TrainConfig
from mlsae.activations import batch_activations
from mlsae.data import TokenSource, batches
from mlsae.lm import load_lm
from mlsae.metrics import ReconstructionStats
from mlsae.train import RunConfig, train

LAYER, K, EXPANSION, CTX, BATCH, TOKENS = 15, 32, 8, 256, 8, 65536


def heldout_fvu(encode_decode, eval_x: torch.Tensor) -> float:
    stats = ReconstructionStats(1, eval_x.shape[-1], 1)
    x_hat = encode_decode(eval_x)
    stats.update(eval_x[None], x_hat[None], torch.ones(1, len(eval_x), 1),
                 torch.zeros(1, len(eval_x), 1, dtype=torch.long))
    return stats.result()["per_layer"]["fvu"][0]


def run_sparsify(lm, train_seqs: torch.Tensor, exclude: list[int], out: Path) -> tuple:
    from datasets import Dataset
    from sparsify import SaeConfig, SparseCoder, Trainer
    from sparsify import TrainConfig as SpTrainConfig

    ds = Dataset.from_dict({"input_ids": train_seqs.tolist()}).with_format(
        "torch", columns=["input_ids"])
    cfg = SpTrainConfig(SaeConfig(k=K, expansion_factor=EXPANSION), batch_size=BATCH,
                        layers=[LAYER], init_seeds=[0], log_to_wandb=False,
                        save_dir=str(out), run_name="sp", exclude_tokens=exclude)
    trainer = Trainer(cfg, ds, lm.model)
    opt = trainer.optimizers[0]
    desc = f"{type(opt).__name__} lr={opt.param_groups[0]['lr']:.3g}"
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae = SparseCoder.load_from_disk(out / "sp" / cfg.hookpoints[0], device="cpu")

    @torch.no_grad()
    def enc_dec(x):
        acts, idx, _ = sae.encode(x)
        return sae.decode(acts, idx)

    return enc_dec, seconds, desc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsify-exclude-special", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_lm("smollm2-135m")
    data = DataConfig(ctx_len=CTX)
    source = TokenSource(data, lm.tokenizer, lm.eos_id, seed=0)
    train_seqs = torch.stack([s for _, s in zip(range(TOKENS // CTX),
                                                source.train_sequences(0))])
    eval_seqs = source.eval_sequences(10**9)
    eval_x = torch.cat([batch_activations(lm, ids, [LAYER], data)[0][0]
                        for ids in batches(iter(eval_seqs), BATCH)])
    print(f"train {len(train_seqs)} seqs x {CTX}; held-out {len(eval_x)} tokens "
          f"(of {eval_seqs.numel()})")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg = RunConfig(SAEConfig(expansion_factor=EXPANSION, k=K), data,
                        TrainConfig(layers=str(LAYER), tokens=TOKENS, batch_size=BATCH,
                                    out=f"{tmp}/mlsae", eval_tokens=0))
        res = train(cfg, lm=lm)
        mlsae_s = time.perf_counter() - t0
        sae = res["trainer"].sae
        mlsae_fvu = heldout_fvu(lambda x: sae(x).x_hat.detach(), eval_x)
        exclude = lm.special_ids if args.sparsify_exclude_special else []
        enc_dec, sp_s, sp_desc = run_sparsify(lm, train_seqs, exclude, Path(tmp) / "sp")
        sp_fvu = heldout_fvu(enc_dec, eval_x)
    result = {"mlsae_heldout_fvu": mlsae_fvu, "sparsify_heldout_fvu": sp_fvu,
              "mlsae_train_s": mlsae_s, "sparsify_train_s": sp_s,
              "sparsify_optimizer": sp_desc, "sparsify_exclude_tokens": exclude,
              "mlsae_lr": res["trainer"].lr, "eval_tokens": len(eval_x)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""`mlsae export`: write a checkpoint in another library's format (SAELens: one folder per
layer), optionally uploading it to a hub repo; `mlsae convert`: the other way, any format
`mlsae.formats` reads (seed paper, SAELens, sparsify; local or on the hub) into an mlsae
checkpoint folder, which every command (analyze, examples, serve, ...) then takes. Uses runs,
formats and the SAE.

    mlsae export RUN --format saelens --out DIR [--layers 0,5] [--push-to-hub me/repo]
    mlsae convert tim-lawson/mlsae-pythia-70m-deduped-x64-k32 --out runs/seed-pythia70m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlsae.errors import UserError
from mlsae.formats import EXPORTERS, FORMATS
from mlsae.formats import export as export_sae
from mlsae.runs import load_sae
from mlsae.sae import MLSAE


def export(checkpoint: str | Path, out: str | Path, format: str = "saelens",
           layers: list[int] | None = None, push_to_hub: str | None = None,
           private: bool = False, token: str | None = None) -> dict:
    """Export `checkpoint` to folder `out`; with `push_to_hub`, upload `out` to that repo.
    Returns the exporter's result plus "repo" when uploaded."""
    sae = load_sae(checkpoint, why="SAELens has no tuned lens, so the exported SAE would "
                   "encode untranslated resid_post and reconstruct the wrong space; export is "
                   "refused")
    if layers is not None and sae.layers is not None:
        bad = [v for v in layers if v not in sae.layers]
        if bad:
            raise UserError(f"layer {bad[0]} is not one of the checkpoint's layers")
    res = export_sae(sae, out, format, layers=layers)
    if push_to_hub:
        res["repo"] = upload(out, push_to_hub, private=private, token=token)
    return res


def upload(folder: str | Path, repo_id: str, private: bool = False,
           token: str | None = None) -> str:
    """Upload every file under `folder` to the hub model repo `repo_id` (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                      commit_message="mlsae export")
    return repo_id


def convert(source: str | Path, out: str | Path, format: str | None = None,
            model: str | None = None, layers: list[int] | None = None,
            subfolder: str | None = None, revision: str | None = None) -> MLSAE:
    """Read `source` (a folder or hub repo id, in any format mlsae reads) and save it as an
    mlsae checkpoint in `out` (config.json + model.safetensors); returns the SAE."""
    sae = MLSAE.from_pretrained(source, format=format, model=model, layers=layers,
                                subfolder=subfolder, revision=revision)
    sae.save_pretrained(out)
    return sae


# ---- CLI ---------------------------------------------------------------------------------
def _cmd_convert(args: argparse.Namespace) -> int:
    from mlsae.config import resolve_layers

    layers = resolve_layers(args.layers, 2**31) if args.layers else None
    sae = convert(args.source, args.out, args.format, args.model, layers, args.subfolder,
                  args.revision)
    fmt = sae.config.get("source_format", "mlsae")
    print(f"wrote {args.out} (from {fmt}: {sae.n_latents} latents, k {sae.k}, model "
          f"{sae.config.get('model')}, layers {sae.layers})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mlsae.config import resolve_layers

    layers = resolve_layers(args.layers, 2**31) if args.layers else None
    res = export(args.checkpoint, args.out, args.format, layers=layers,
                 push_to_hub=args.push_to_hub, private=args.private)
    print(f"wrote {len(res['folders'])} {args.format} folder(s) under {args.out}")
    if "repo" in res:
        print(f"uploaded to {res['repo']}")
    return 0


def add_commands(sub) -> None:
    """Register `mlsae export` and `mlsae convert` on the subparsers object `sub`."""
    p = sub.add_parser(
        "export", help="write a checkpoint as SAELens folders (one per layer)",
        description="Write an MLSAE (or any checkpoint mlsae reads) in another format: "
        "saelens writes OUT/layer_<l>/{cfg.json, sae_weights.safetensors}, loadable with "
        "sae_lens.SAE.load_from_disk; every folder holds the same dictionary.")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or hub repo id")
    p.add_argument("--format", default="saelens", choices=sorted(EXPORTERS),
                   help="target format (default: saelens)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", help="only these layers (0,3,7 or 0-29:2; default: all)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload OUT to this hub repo")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "convert", help="read a seed-paper, SAELens or sparsify SAE into an mlsae checkpoint",
        description="Read a checkpoint in any format mlsae reads (the seed paper's "
        "tim-lawson/mlsae repos, SAELens and sparsify folders; a folder or a hub repo id) and "
        "save it as an mlsae checkpoint folder that every command takes.")
    p.add_argument("source", help="folder or hub repo id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=sorted(FORMATS), help="source format (default: "
                   "detected from the files)")
    p.add_argument("--model", help="the LM, when the checkpoint does not name it (the seed's "
                   "repo ids do: mlsae-<model>-x<R>-k<k>)")
    p.add_argument("--layers", help="its layers, when the checkpoint does not say (default: "
                   "all layers of the model for the seed's)")
    p.add_argument("--subfolder", help="a folder inside the source (e.g. layer_3)")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.set_defaults(func=_cmd_convert)

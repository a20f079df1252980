"""`mlsae export`: write a checkpoint in another library's format (SAELens: one folder per
layer), optionally uploading it to a hub repo. Uses runs (to read the checkpoint, in any
format `mlsae.formats` reads) and formats (the exporters).

    mlsae export RUN --format saelens --out DIR [--layers 0,5] [--push-to-hub me/repo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlsae.errors import UserError
from mlsae.formats import EXPORTERS
from mlsae.formats import export as export_sae
from mlsae.runs import load_sae


def export(checkpoint: str | Path, out: str | Path, format: str = "saelens",
           layers: list[int] | None = None, push_to_hub: str | None = None,
           private: bool = False, token: str | None = None) -> dict:
    """Export `checkpoint` to folder `out`; with `push_to_hub`, upload `out` to that repo.
    Returns the exporter's result plus "repo" when uploaded."""
    sae = load_sae(checkpoint)
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


# ---- CLI ---------------------------------------------------------------------------------
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
    """Register `mlsae export` on the subparsers object `sub`."""
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

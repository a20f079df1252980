"""`mlsae serve RUN`: an interactive explorer of a trained run in the browser. The top of
the tree with the CLI: uses the analyses, runs, the LM adapter and the SAE.

One process: FastAPI + uvicorn serve a JSON API and the plain HTML/CSS/JS front end shipped
in `static/`. Views: Prompt (tokens, layers x latents heatmap, a token's latents per layer),
Latent (layer distribution and max-activating examples from the analysis files) and Logits
(next tokens: clean, with the SAE reconstruction spliced in, and steered). FastAPI is only
imported when the command runs, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import signal
import sys

from mlsae.analysis.codes import RUN_HELP

DEFAULT_MAX_PROMPT_TOKENS = 256  # the default training ctx_len: longer is out of distribution


def _cmd_serve(args: argparse.Namespace) -> int:
    from mlsae.server.app import create_app
    from mlsae.server.runner import bind, make_server, url_of

    with bind(args.host, args.port) as sock:  # a busy port fails before the model loads
        print(f"loading {args.run} ...", file=sys.stderr)
        app = create_app(args.run, max_prompt_tokens=args.max_prompt_tokens, model=args.model,
                         device=args.device)
        url = url_of(sock)
        print(f"mlsae explorer: {url}  (API docs: {url}/docs; Ctrl-C stops)", flush=True)
        server = make_server(app)
        server.run(sockets=[sock])
    if server.should_exit:  # stopped by Ctrl-C / SIGTERM, which uvicorn's asyncio runner may
        sig = (getattr(server, "_captured_signals", None) or [signal.SIGINT])[-1]  # swallow
        return 128 + int(sig)
    return 0


def add_commands(sub) -> None:
    """Register `mlsae serve` on the subparsers object `sub`."""
    p = sub.add_parser("serve", help="interactive explorer of a run in the browser",
                       description="Serve the explorer (prompt heatmaps, latent examples, "
                       "logits, steering) for a trained run; prints its URL, opens nothing.")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: "
                   "127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free "
                   "port)")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help=f"longest prompt accepted, in tokens (default: "
                   f"{DEFAULT_MAX_PROMPT_TOKENS})")
    p.add_argument("--model", help="language model (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    p.set_defaults(func=_cmd_serve)

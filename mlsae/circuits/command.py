"""`mlsae graph RUN --prompt TEXT` (or `--prompts FILE`): attribution graphs over the MLSAE's
latents, checked causally, written as circuit-tracer JSON; and its Python function `graph`.
The top of mlsae.circuits: uses every module of it, and runs / lm / options.

A prompt is read like the explorer reads it: the EOS token that starts every packed training
document, then the prompt's tokens; the graph explains the prediction after its last token.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mlsae.analysis.codes import require_run_dir
from mlsae.circuits.analysis import self_edges, summarise
from mlsae.circuits.attribution import ERROR, LATENT, MLP, Graph, Target, attribute
from mlsae.circuits.causal import causal_checks, exactness, latent_means
from mlsae.circuits.effects import integrated_effects
from mlsae.circuits.graphio import add_graph_metadata, graph_json, write_json
from mlsae.circuits.influence import prune
from mlsae.circuits.linear import MODES, Capture, capture, check_supported
from mlsae.errors import UserError
from mlsae.lm import LanguageModel, max_positions
from mlsae.options import TextOptions, add_dataclass_options, build_config
from mlsae.runs import load_run_lm, load_sae, own_data_config, run_data_config, sae_layers
from mlsae.sae import MLSAE

METRICS = ("logit", "logit-diff")
SELECT = ("influence", "effect")


@dataclass
class GraphConfig:
    """What to explain and how (defaults follow circuit-tracer where it has one)."""

    prompt: str | None = None
    """the prompt text (the graph explains the next token after it)"""
    prompts: str | None = None
    """a text file with one prompt per line, optionally `prompt<TAB>target[<TAB>contrast]`
    (`\\n` in a line is a newline); writes one graph per prompt and summary.json with the
    cross-prompt self-edge analysis into --out"""
    target: str | None = None
    """the target token (exactly one token, e.g. ' x'; default: the model's top prediction)"""
    contrast: str | None = None
    """with --metric logit-diff: the token whose logit is subtracted"""
    metric: str = "logit"
    """logit (the target's logit minus the mean logit) or logit-diff (logit(target) -
    logit(contrast))"""
    mode: str = "jacobian"
    """jacobian (gradients flow through the MLPs) or frozen-mlp (each MLP output is a node;
    the graph is exactly additive)"""
    layers: str | None = None
    """spliced layers, e.g. 0,1,2 or 10-20 (default: all of the run's)"""
    node_threshold: float = 0.8
    """pruning: keep the nodes holding this share of the total influence"""
    edge_threshold: float = 0.98
    """pruning: keep the edges holding this share of the edge influence"""
    select: str = "influence"
    """which latents the pruned graph keeps: influence (circuit-tracer's rule: those holding
    --node-threshold of the influence) or effect (the --max-latents latents with the largest
    |effect| on the metric in the real model, by integrated gradients; the other node kinds
    still by influence)"""
    max_latents: int = 200
    """with --select effect: how many latents the pruned graph keeps (ignored otherwise)"""
    effect_steps: int = 8
    """integrated-gradient steps of each latent's effect (the nodes' `effect`, the
    faithfulness curve by effect); 0 skips the effects (not with --select effect)"""
    means_tokens: int = 1024
    """held-out tokens the latents' mean activations (for mean ablation) come from"""
    exactness_nodes: int = 8
    """frozen-mlp: source nodes whose edges the exactness check re-measures"""
    out: str | None = None
    """output .json (--prompt) or folder (--prompts); default: RUN/graphs/"""
    model: str | None = None
    """language model (default: the run's)"""
    device: str = "auto"
    """auto, cpu, cuda, mps"""


def parse_layers(text: str | None, available: list[int]) -> list[int]:
    """`0,1,5` / `10-20` -> sorted layers, each one the run has."""
    if text is None:
        return list(available)
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--layers {text!r}: expected numbers and ranges such as 0,2,5-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(range(lo, hi + 1))
    missing = sorted(out - set(available))
    if missing:
        raise UserError(f"--layers: the run has no layer {missing[0]} (its layers: "
                        f"{_span(available)})")
    return sorted(out)


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def one_token(lm: LanguageModel, text: str, flag: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"{flag} {text!r} is {len(ids)} tokens, not one "
                        f"({[lm.tokenizer.decode([i]) for i in ids][:5]})")
    return int(ids[0])


def tokenize(lm: LanguageModel, text: str, limit: int) -> torch.Tensor:
    """`[1, 1 + T]`: EOS, then the prompt's tokens (as the explorer reads a prompt)."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty (it has no tokens)")
    if len(ids) + 1 > limit:
        raise UserError(f"the prompt has {len(ids)} tokens (+1 leading EOS); the context is "
                        f"{limit} tokens")
    return torch.tensor([[lm.eos_id, *ids]], dtype=torch.long)


def context_limit(sae: MLSAE, lm: LanguageModel) -> int:
    """The run's ctx_len (what the SAE was trained on), or the model's limit if smaller."""
    ctx = own_data_config(sae).ctx_len
    lim = max_positions(lm.model.config)
    return min(ctx, lim) if lim else ctx


def make_target(lm: LanguageModel, logits_last: torch.Tensor, cfg: GraphConfig,
                target: str | None, contrast: str | None = None) -> Target:
    if cfg.metric not in METRICS:
        raise UserError(f"--metric {cfg.metric!r}: choose one of {', '.join(METRICS)}")
    dec = lm.tokenizer.decode
    tok = one_token(lm, target, "--target") if target is not None else int(logits_last.argmax())
    contrast = contrast if contrast is not None else cfg.contrast
    if cfg.metric == "logit-diff":
        if contrast is None or target is None:
            raise UserError("--metric logit-diff needs --target and --contrast")
        con = one_token(lm, contrast, "--contrast")
        return Target("logit-diff", tok, dec([tok]), con, dec([con]))
    if contrast is not None:
        raise UserError("--contrast needs --metric logit-diff")
    return Target("logit", tok, dec([tok]))


class GraphSession:
    """A run's SAE and LM, ready to build graphs (the means are computed once)."""

    def __init__(self, run: str | Path, cfg: GraphConfig, lm: LanguageModel | None = None,
                 sae: MLSAE | None = None):
        if cfg.mode not in MODES:
            raise UserError(f"--mode {cfg.mode!r}: choose one of {', '.join(MODES)}")
        for name in ("node_threshold", "edge_threshold"):
            v = getattr(cfg, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
        if cfg.select not in SELECT:
            raise UserError(f"--select {cfg.select!r}: choose one of {', '.join(SELECT)}")
        if cfg.max_latents < 1 or cfg.effect_steps < 0:
            raise UserError("--max-latents must be >= 1 and --effect-steps >= 0")
        if cfg.select == "effect" and cfg.effect_steps < 1:
            raise UserError("--select effect needs --effect-steps >= 1")
        if sae is None:
            run = require_run_dir(run, cfg.model)
            sae = load_sae(run, why="mlsae graph does not apply the lens")
        self.run, self.cfg, self.sae = Path(run), cfg, sae
        self.layers = parse_layers(cfg.layers, sae_layers(self.sae))
        self.lm = lm if lm is not None else load_run_lm(
            self.sae, TextOptions(model=cfg.model, device=cfg.device))
        check_supported(self.lm)
        self.sae.to(self.lm.device).eval()
        self.data_cfg = run_data_config(self.sae, TextOptions())
        self.limit = context_limit(self.sae, self.lm)
        self._means = None

    def means(self):
        if self._means is None:
            t = time.perf_counter()
            m, info = latent_means(self.sae, self.lm, self.layers, self.cfg.means_tokens)
            info["seconds"] = time.perf_counter() - t
            self._means = (m, info)
        return self._means

    def trace(self, prompt: str, target: str | None = None, contrast: str | None = None,
              progress: bool = False) -> tuple[Capture, Graph]:
        """One prompt's clean capture and its whole (unpruned, unchecked) graph."""
        cap = capture(self.sae, self.lm, tokenize(self.lm, prompt, self.limit), self.layers,
                      self.data_cfg)
        tgt = make_target(self.lm, cap.logits[-1], self.cfg, target if target is not None
                          else self.cfg.target, contrast)
        return cap, attribute(self.sae, self.lm, cap, tgt, self.cfg.mode, prompt,
                              progress=progress)

    def build(self, prompt: str, target: str | None = None, progress: bool = False,
              contrast: str | None = None, causal: bool = True) -> tuple[Graph, dict]:
        """The graph of one prompt and its JSON (pruned, with the checks)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        cap, g = self.trace(prompt, target, contrast, progress=progress)
        t1 = time.perf_counter()
        effects = effect_info = chosen = None
        if cfg.effect_steps > 0 and (causal or cfg.select == "effect"):
            means = self.means()[0]  # once per session, not counted as the prompt's effects
            te = time.perf_counter()
            effects, effect_info = integrated_effects(self.sae, self.lm, cap, g, means,
                                                      cfg.effect_steps)
            effect_info["seconds"] = time.perf_counter() - te
        if cfg.select == "effect":
            lat = (g.kind == LATENT).nonzero()[:, 0]
            chosen = lat[torch.argsort(effects[lat].abs(), descending=True)[:cfg.max_latents]]
        t1e = time.perf_counter()
        pr = prune(g, cfg.node_threshold, cfg.edge_threshold, latents=chosen)
        t2 = time.perf_counter()
        result = None
        if causal:
            means, info = self.means()
            circuit = pr.nodes[g.kind[pr.nodes] == LATENT]
            result = causal_checks(self.sae, self.lm, cap, g, means, circuit, pr.influence,
                                   effects=effects)
            result["select"] = cfg.select
            result["effects"] = effect_info
            result["linearised"] = causal_checks(self.sae, self.lm, cap, g, means, circuit,
                                                 pr.influence, model="linearised")
            result["means"] = info
        t3 = time.perf_counter()
        if cfg.mode == "frozen-mlp" and cfg.exactness_nodes > 0:
            src = (g.kind == LATENT) | (g.kind == ERROR) | (g.kind == MLP)
            cand = src.nonzero()[:, 0]
            top = cand[torch.argsort(pr.influence[cand], descending=True)]
            g.checks["exactness"] = exactness(self.sae, self.lm, cap, g,
                                              top[:cfg.exactness_nodes])
        selfe = self_edges(g, pr)
        g.timing.update(capture_and_edges_s=t1 - t0, prune_s=t2 - t1e,
                        effects_s=effect_info["seconds"] if effect_info else 0.0,
                        causal_s=t3 - t2,
                        checks_total_s=time.perf_counter() - t3, total_s=time.perf_counter()
                        - t0)
        slug = _slug(prompt)
        data = graph_json(g, pr, slug, f"mlsae:{self.run.name}",
                          {"causal": result, "self_edges": selfe, "run": str(self.run),
                           "model": self.lm.name}, effects=effects)
        return g, data


def _slug(prompt: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:40] or "prompt"
    return s


def read_prompts(path: str | Path) -> list[tuple[str, str | None, str | None]]:
    """(prompt, target, contrast) per non-empty line of a --prompts file
    (`prompt[<TAB>target[<TAB>contrast]]`, `\\n` a newline)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts {str(path)!r}: no such file")
    lines = []
    for line in file.read_text().splitlines():
        if line.strip():
            parts = [p.replace("\\n", "\n") for p in line.split("\t")] + [None, None]
            lines.append((parts[0], parts[1] or None, parts[2] or None))
    if not lines:
        raise UserError(f"--prompts {str(path)!r} holds no prompt")
    return lines


def graph(run: str | Path, cfg: GraphConfig, lm: LanguageModel | None = None,
          sae: MLSAE | None = None, progress: bool = True) -> dict:
    """Build, check and write the graph of `cfg.prompt` (or of every line of
    `cfg.prompts`); returns the JSON written (or, for --prompts, the summary)."""
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise UserError("give --prompt TEXT or --prompts FILE (one of them)")
    lines = read_prompts(cfg.prompts) if cfg.prompts is not None else []
    session = GraphSession(run, cfg, lm, sae)
    if cfg.prompt is not None:
        _, data = session.build(cfg.prompt, progress=progress)
        slug = data["metadata"]["slug"]
        out = Path(cfg.out) if cfg.out else session.run / "graphs" / f"{slug}.json"
        write_json(data, out)
        _report(data, out)
        return data
    folder = Path(cfg.out) if cfg.out else session.run / "graphs"
    for text, tgt, con in lines:  # every line checked before minutes of work
        tokenize(session.lm, text, session.limit)
        for tok, flag in ((tgt, "--target"), (con, "--contrast")):
            if tok is not None:
                one_token(session.lm, tok, flag)
    rows = []
    for i, (text, tgt, con) in enumerate(lines):
        _, data = session.build(text, tgt, progress=False, contrast=con)
        slug = f"{i:03d}-{data['metadata']['slug']}"
        data["metadata"]["slug"] = slug
        out = write_json(data, folder / f"{slug}.json")
        add_graph_metadata(data["metadata"], folder)
        _report(data, out)
        m = data["metadata"]["mlsae"]
        rows.append({"slug": slug, "prompt": text, "target": m["target"],
                     "pruned": m["pruned_graph"], "full": m["full_graph"],
                     "faithfulness": m["causal"]["faithfulness"],
                     "completeness": m["causal"]["completeness"],
                     "curve": m["causal"]["curve"],
                     "faithfulness_linearised": m["causal"]["linearised"]["faithfulness"],
                     "completeness_linearised": m["causal"]["linearised"]["completeness"],
                     "curve_linearised": m["causal"]["linearised"]["curve"],
                     "effect_curve": m["causal"].get("effect_curve"),
                     "self_edges": m["self_edges"],
                     "checks": m["checks"], "seconds": m["timing"]["total_s"]})
    summary = {"run": str(session.run), "config": asdict(cfg), "prompts": rows,
               "self_edges": summarise([r["self_edges"] for r in rows]),
               "means": session.means()[1]}
    write_json(summary, folder / "summary.json")
    print(f"wrote {folder / 'summary.json'}")
    return summary


def _report(data: dict, out: Path) -> None:
    m = data["metadata"]["mlsae"]
    nan = {"faithfulness": float("nan"), "completeness": float("nan")}
    c = m["causal"] or dict(nan, linearised=nan)
    print(f"{out}: {m['mode']}, target {m['target']['token_str']!r} "
          f"(p={m['target']['probability']:.3f}); full {m['full_graph']['nodes']} nodes / "
          f"{m['full_graph']['edges']} edges; pruned {m['pruned_graph']['nodes']} nodes "
          f"({m['pruned_graph']['latents']} latents) / {m['pruned_graph']['links']} links; "
          f"faithfulness {c['faithfulness']:.3f} "
          f"(linearised {c['linearised']['faithfulness']:.3f}), "
          f"completeness {c['completeness']:.3f}; "
          f"{m['timing']['total_s']:.1f} s")


def _cmd_graph(args: argparse.Namespace) -> int:
    cfg = build_config(GraphConfig, vars(args))
    graph(args.run, cfg, progress=sys.stderr.isatty())
    return 0


def add_commands(sub) -> None:
    """Register `mlsae graph` on the subparsers object `sub`."""
    from mlsae.analysis.codes import RUN_HELP

    p = sub.add_parser("graph", help="attribution graph over the MLSAE's latents, checked "
                       "causally (circuit-tracer JSON)",
                       description="Attribution graph of one prompt's next-token prediction "
                       "over the latents at every spliced layer (with error, MLP and "
                       "embedding nodes), pruned by influence, with faithfulness / "
                       "completeness by mean ablation; see docs/guides/circuits.md.")
    p.add_argument("run", help=RUN_HELP)
    add_dataclass_options(p, GraphConfig)
    p.set_defaults(func=_cmd_graph)

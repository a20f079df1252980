"""What the explorer computes: a run's SAE and LM on one prompt, and its analysis files.

Every public method takes the one lock for its whole duration: `LanguageModel.logits_from`
swaps block `forward`s, `resid_post` installs hooks, and fast tokenizers refuse concurrent
use, so model work must not interleave. (The analysis files are read per request, so files
written by `mlsae analyze` / `mlsae examples` while the server runs are picked up.)

Prompts. Token 0 is the EOS token that starts every document in the packed training text,
so a prompt reads like the start of a training document; like every excluded position
(position 0, special tokens: `mlsae.data.include_mask` with the run's settings; and, with the
run's `exclude_outliers`, every token whose resid_post norm at any of the SAE's layers exceeds
that factor times the layer's median over the prompt's included tokens, as in training and
`mlsae.activations.batch_activations`) it is shown, marked excluded, but it is left out of the
heatmap statistics, the reconstruction splice and steering.

Lens runs (`mlsae train --lens`). The SAE encodes translated vectors h' = lens.translate(x_l):
the prompt, token and latent views show codes of h'; the logits splice uses
lens.inverse(SAE(h')) (the exact inverse, original space); steering adds
factor * (std'_t + eps) * W_dec[f] to h' (std'_t of h'_t) and maps the result back with the
inverse, i.e. x_l(t) changes by that vector through (I + W_l^T)^{-1}.

Steering adds `factor * (std_t + eps) * W_dec[f]` to resid_post of layer l at every included
position t, where std_t is the standard deviation over d_model of that position's own vector
(the SAE's per-vector standardization). That is exactly the change in the SAE's decoded
output when latent f's activation grows by `factor` (decode maps x~ to x~ * (std + eps) + mu,
and W_dec rows are unit vectors of the standardized space), so factor is in the units of the
activations the explorer shows, and it scales with each position's residual norm instead of
being one fixed vector that is tiny at some positions and huge at others. For scale: a
standardized vector has norm sqrt(d_model) (24 for SmolLM2), so factor sqrt(d_model) adds a
vector about as long as the residual's centred part; each answer reports the ratio of norms.
(An SAE in the seed paper's "unbiased_eps_div" convention un-standardizes with std_t alone:
`MLSAE.out_scale` gives the factor for either.)
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from mlsae.activations.capture import exclude_outliers
from mlsae.analysis.features import FEATURES, logit_effects, read_latent
from mlsae.analysis.layer_dist import heatmap_latents, prompt_distribution
from mlsae.analysis.top_examples import query_examples
from mlsae.data import include_mask
from mlsae.errors import UserError
from mlsae.lens import TunedLens
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions
from mlsae.runs import run_data_config, sae_layers
from mlsae.sae import MLSAE
from mlsae.server import models as M

DISTS = Path("analysis") / "dists.safetensors"
EXAMPLES = Path("analysis") / "examples.sqlite"
# Refuse absurd inputs before tokenizing them: no tokenizer makes tokens shorter than 1
# character on average over a long text, 64 is generous for byte-level pieces.
MAX_CHARS_PER_TOKEN = 64
STEERING_DOC = ("x_l(t) += factor * (std_t + eps) * W_dec[f] at every included position t, "
                "std_t the standard deviation over d_model of x_l(t) (the SAE's per-vector "
                "standardization): the same as raising latent f's activation by factor in "
                "the SAE's decoder")
STEERING_DOC_LENS = ("lens run: h' = lens(x_l) (the tuned lens the SAE encodes); h'(t) += "
                     "factor * (std'_t + eps) * W_dec[f] at every included position t, std'_t "
                     "the standard deviation over d_model of h'(t), then x_l = the exact "
                     "inverse of the lens: the same as raising latent f's activation by factor "
                     "in the SAE's decoder")


class NotFound(UserError):
    """A resource named in the URL (a latent) does not exist: HTTP 404."""


class Explorer:
    """A run's SAE with its LM, ready to answer the API's questions (see module docstring)."""

    def __init__(self, run_dir: str | Path, sae: MLSAE, lm: LanguageModel,
                 max_prompt_tokens: int, lens: TunedLens | None = None):
        self.run_dir = Path(run_dir)
        self.sae, self.lm, self.lens = sae, lm, lens
        self.layers = sae_layers(sae)
        self.data_cfg = run_data_config(sae, TextOptions())
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = threading.Lock()

    # ---- checks ------------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not a layer of the SAE (its layers: "
                            f"{_span(self.layers)})")

    def _check_latent(self, latent: int, error: type[UserError] = UserError) -> None:
        if not 0 <= latent < self.sae.n_latents:
            raise error(f"latent {latent} does not exist (the SAE has latents "
                        f"0..{self.sae.n_latents - 1})")

    def tokenize(self, text: str) -> Tensor:
        """`[1, 1 + T]`: EOS, then the prompt's tokens (at most max_prompt_tokens)."""
        cap = self.max_prompt_tokens
        if len(text) > cap * MAX_CHARS_PER_TOKEN:
            raise UserError(f"the prompt is too long ({len(text)} characters; the limit is "
                            f"{cap} tokens)")
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("the prompt is empty (it has no tokens)")
        if len(ids) > cap:
            raise UserError(f"the prompt has {len(ids)} tokens; the limit is {cap} "
                            "(mlsae serve --max-prompt-tokens)")
        return torch.tensor([[self.lm.eos_id, *ids]], dtype=torch.long)

    # ---- model work (under the lock) -------------------------------------------------------
    def _tokens(self, ids: Tensor, mask: Tensor) -> list[M.Token]:
        return [M.Token(position=i, id=t, text=self.lm.tokenizer.decode([t]), included=m)
                for i, (t, m) in enumerate(zip(ids[0].tolist(), mask[0].tolist()))]

    @torch.inference_mode()
    def _capture(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """resid_post of the SAE's layers `[layer, 1, T, d]` and the include mask `[1, T]`
        (CPU): the run's exclusions, outliers included (module docstring)."""
        resid = self.lm.resid_post(ids, self.layers)
        mask = include_mask(ids, self.lm.special_ids, self.data_cfg)
        return resid, exclude_outliers(resid, mask, self.data_cfg).cpu()

    def _translate(self, x: Tensor, layer: int) -> Tensor:
        """What the SAE encodes of `x [T, d]` at LM block `layer` (float32): x, or for a lens
        run its translation."""
        x = x.float()
        return x if self.lens is None else self.lens.translate(x[None], [layer])[0]

    def _inverse(self, y: Tensor, layer: int) -> Tensor:
        """Back from the SAE's space to resid_post at `layer` (the exact inverse of the lens)."""
        return y if self.lens is None else self.lens.inverse(y[None], [layer])[0]

    @torch.inference_mode()
    def _codes(self, resid: Tensor) -> tuple[Tensor, Tensor]:
        """acts, idx `[layer, T, width]` at every position (excluded ones too, for display) from
        `resid [layer, 1, T, d]`."""
        # every layer of a token together, as `mlsae analyze` does: token-topk's per-token
        # rule needs them (the other architectures encode each vector alone); row chunks
        # bound the dense pre-activations
        x = torch.stack([self._translate(resid[i, 0], layer)
                         for i, layer in enumerate(self.layers)])  # [layer, T, d]
        code = self.sae.encode_layers(x)
        return code.acts.cpu(), code.idx.cpu()

    def info(self) -> M.Info:
        cfg = self.data_cfg
        return M.Info(run=str(self.run_dir), model=self.lm.name, d_model=self.sae.d_model,
                      n_latents=self.sae.n_latents, k=self.sae.k, layers=self.layers,
                      lm_layers=self.lm.n_layers, max_prompt_tokens=self.max_prompt_tokens,
                      exclude_first=cfg.exclude_first, exclude_special=cfg.exclude_special,
                      exclude_outliers=float(getattr(cfg, "exclude_outliers", 0.0) or 0.0),
                      lens=self._lens_source(),
                      has_distributions=(self.run_dir / DISTS).is_file(),
                      has_examples=(self.run_dir / EXAMPLES).is_file(),
                      steering=STEERING_DOC if self.lens is None else STEERING_DOC_LENS)

    def _lens_source(self) -> str | None:
        if self.lens is None:
            return None
        return ((self.sae.config.get("run") or {}).get("train") or {}).get("lens") or "lens"

    def prompt(self, req: M.PromptRequest) -> M.PromptResponse:
        with self._lock:
            ids = self.tokenize(req.prompt)
            resid, mask = self._capture(ids)
            acts, idx = self._codes(resid)
            tokens = self._tokens(ids, mask)
        totals = prompt_distribution(idx, acts, self.sae.n_latents, mask[0])  # [layer, n]
        latents, probs = heatmap_latents(totals, req.top_latents)
        heat = M.Heatmap(latents=latents.tolist(), values=probs.tolist(),
                         totals=totals[:, latents].tolist())
        return M.PromptResponse(tokens=tokens, layers=self.layers, heatmap=heat)

    def token(self, req: M.TokenRequest) -> M.TokenResponse:
        with self._lock:
            ids = self.tokenize(req.prompt)
            if req.position >= ids.shape[1]:
                raise UserError(f"position {req.position} is past the prompt's last token "
                                f"({ids.shape[1] - 1})")
            resid, mask = self._capture(ids)
            acts, idx = self._codes(resid)  # the whole prompt: the same numbers as its heatmap
            token = self._tokens(ids, mask)[req.position]
        vals, order = acts[:, req.position].sort(-1, descending=True)  # [layer, k]
        ids_ = idx[:, req.position].gather(-1, order)
        per_layer = [M.LayerLatents(layer=layer, latents=[
            M.LatentValue(latent=i, activation=a)
            for i, a in zip(ids_[p, : req.top].tolist(), vals[p, : req.top].tolist()) if a > 0])
            for p, layer in enumerate(self.layers)]
        return M.TokenResponse(token=token, layers=per_layer)

    @torch.inference_mode()
    def logits(self, req: M.LogitsRequest) -> M.LogitsResponse:
        with self._lock:
            if req.layer is not None:
                self._check_layer(req.layer)
            ids = self.tokenize(req.prompt)
            clean = self.lm.logits(ids)[0, -1].float().log_softmax(-1).cpu()
            spliced = None
            if req.layer is not None:
                all_resid, mask = self._capture(ids)
                resid = all_resid[self.layers.index(req.layer)]  # [1, T, d]
                mask = mask.to(resid.device)
                if mask.any():  # excluded positions keep their own vectors, as in eval
                    y = self._translate(resid[mask], req.layer)
                    x_hat = self._inverse(self.sae.decode(self.sae.encode(y)), req.layer)
                    resid[mask] = x_hat.to(resid.dtype)
                logp = self.lm.logits_from(ids, req.layer, resid)[0, -1].float()
                spliced = self._compare(clean, logp.log_softmax(-1).cpu(), req.layer, req.top)
            return M.LogitsResponse(position=ids.shape[1] - 1,
                                    clean=self._top(clean, req.top), spliced=spliced)

    @torch.inference_mode()
    def steer(self, req: M.SteerRequest) -> M.SteerResponse:
        with self._lock:
            self._check_latent(req.latent)
            self._check_layer(req.layer)
            ids = self.tokenize(req.prompt)
            clean = self.lm.logits(ids)[0, -1].float().log_softmax(-1).cpu()
            all_resid, mask = self._capture(ids)
            resid = all_resid[self.layers.index(req.layer)]  # [1, T, d]
            mask = mask.to(resid.device)
            x = resid[0].float()
            y = self._translate(x, req.layer)  # what the SAE encodes
            std = self.sae.encode(y).std  # [T, 1], the SAE's own per-vector std
            add = req.factor * self.sae.out_scale(std) * self.sae.W_dec[req.latent].float()
            add = add * mask[0, :, None]  # excluded positions are left alone
            if self.lens is not None:  # the change of x_l that makes h' change by `add`
                add = self._inverse(y + add, req.layer) - self._inverse(y, req.layer)
                add = add * mask[0, :, None]
            rel = (add.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12))[mask[0]]
            logp = self.lm.logits_from(ids, req.layer, (x + add)[None].to(resid.dtype))
            steered = self._compare(clean, logp[0, -1].float().log_softmax(-1).cpu(),
                                    req.layer, req.top)
            return M.SteerResponse(latent=req.latent, factor=req.factor,
                                   relative_norm=rel.mean().item() if rel.numel() else 0.0,
                                   clean=self._top(clean, req.top), steered=steered)

    # ---- circuits ------------------------------------------------------------------------
    def graph(self, req: M.GraphRequest) -> M.GraphResponse:
        """The pruned attribution graph of the prompt (mlsae.circuits), causal checks left to
        `mlsae graph` (they need the latents' means over held-out text)."""
        from mlsae.circuits.command import GraphConfig, GraphSession

        if self.lens is not None:
            raise UserError("the graph view does not apply a lens run's tuned lens")
        cfg = GraphConfig(prompt=req.prompt, metric=req.metric, mode=req.mode,
                          node_threshold=req.node_threshold, edge_threshold=req.edge_threshold)
        with self._lock:
            self.tokenize(req.prompt)  # the explorer's own prompt limits
            session = GraphSession(self.run_dir, cfg, lm=self.lm, sae=self.sae)
            _, data = session.build(req.prompt, req.target, contrast=req.contrast, causal=False)
        return M.GraphResponse(**data)

    @torch.inference_mode()
    def intervene(self, req: M.InterveneRequest) -> M.InterveneResponse:
        """Top next tokens with latents scaled at their layers through `MLSAE.spliced` (the
        error term added back, so only the edits change the output)."""
        from contextlib import ExitStack

        if self.lens is not None:
            raise UserError("interventions do not apply a lens run's tuned lens")
        by_layer: dict[int, dict[int, float]] = {}
        for e in req.edits:
            self._check_latent(e.latent)
            self._check_layer(e.layer)
            by_layer.setdefault(e.layer, {})[e.latent] = e.scale
        with self._lock:
            ids = self.tokenize(req.prompt)
            clean = self.lm.logits(ids)[0, -1].float().log_softmax(-1).cpu()
            with ExitStack() as stack:
                for layer, latents in by_layer.items():
                    stack.enter_context(self.sae.spliced(self.lm, layers=[layer], error=True,
                                                         latents=latents))
                edited = self.lm.logits(ids)[0, -1].float().log_softmax(-1).cpu()
            cmp = self._compare(clean, edited, req.edits[0].layer, req.top)
            return M.InterveneResponse(edits=req.edits, kl=cmp.kl, clean=self._top(clean, req.top),
                                       top=cmp.top, increased=cmp.increased,
                                       decreased=cmp.decreased)

    def _top(self, logp: Tensor, n: int) -> list[M.TokenProb]:
        p, ids = logp.exp().topk(min(n, len(logp)))
        return [M.TokenProb(id=i, text=self.lm.tokenizer.decode([i]), prob=v)
                for i, v in zip(ids.tolist(), p.tolist())]

    def _compare(self, clean: Tensor, logp: Tensor, layer: int, n: int) -> M.Modified:
        """Top tokens of `logp` and the largest probability changes against `clean`."""
        p, p0 = logp.exp(), clean.exp()
        delta = p - p0
        n = min(n, len(p))

        def rows(order: Tensor) -> list[M.TokenChange]:
            return [M.TokenChange(id=i, text=self.lm.tokenizer.decode([i]), prob=p[i].item(),
                                  clean_prob=p0[i].item(), delta=delta[i].item())
                    for i in order.tolist()]

        # 0 * log 0 = 0: a token masked to -inf in both would otherwise give NaN
        kl = torch.where(p0 > 0, p0 * (clean - logp), 0.0).sum().clamp_min(0).item()
        return M.Modified(layer=layer, kl=kl, top=rows(p.topk(n).indices),
                          increased=rows(delta.topk(n).indices),
                          decreased=rows((-delta).topk(n).indices))

    # ---- analysis files --------------------------------------------------------------------
    def latent(self, latent: int, layer: int | None, limit: int,
               per_layer: int = 3) -> M.LatentResponse:
        self._check_latent(latent, NotFound)
        if layer is not None:
            self._check_layer(layer)
        examples = self._examples(latent, layer, limit)
        by_layer = []
        if examples.available:
            db = self.run_dir / EXAMPLES
            for c in examples.layers:
                rows = query_examples(db, latent, c.layer)[:per_layer]
                with self._lock:
                    by_layer.append(M.LayerExamples(layer=c.layer,
                                                    examples=[self._example(r) for r in rows]))
        return M.LatentResponse(latent=latent, distribution=self._distribution(latent),
                                examples=examples, logit_effect=self._logit_effect(latent),
                                density=self._density(latent), examples_by_layer=by_layer)

    def _logit_effect(self, latent: int, top: int = 10) -> M.LogitEffect:
        """Computed from the LM's own final norm and unembedding (mlsae.analysis.features)."""
        with self._lock:
            try:
                hi_v, hi_i, lo_v, lo_i = logit_effects(
                    self.lm, self.sae.W_dec.detach()[latent:latent + 1].float(), top)
            except UserError as e:
                return M.LogitEffect(available=False, hint=str(e))

            def rows(vals: Tensor, ids: Tensor) -> list[M.TokenValue]:
                return [M.TokenValue(id=i, text=self.lm.tokenizer.decode([i]), value=v)
                        for i, v in zip(ids[0].tolist(), vals[0].tolist())]

            return M.LogitEffect(available=True, top=rows(hi_v, hi_i),
                                 bottom=rows(lo_v, lo_i))

    def _density(self, latent: int) -> M.Density:
        hint = (f"no {FEATURES}: run `mlsae features {self.run_dir}` for the activation "
                "density per layer")
        try:
            got = read_latent(self.run_dir, latent)
        except (IndexError, ValueError, RuntimeError):
            got, hint = None, (f"{FEATURES} does not match this SAE: run `mlsae features "
                               f"{self.run_dir}` again")
        if got is None:
            return M.Density(available=False, hint=hint)
        return M.Density(available=True, layers=got["layers"], bin_edges=got["bin_edges"],
                         counts=got["density"], included_tokens=got["included_tokens"])

    def _distribution(self, latent: int) -> M.Distribution:
        path = self.run_dir / DISTS
        if not path.is_file():
            return M.Distribution(available=False, hint=f"no {DISTS}: run `mlsae analyze "
                                  f"{self.run_dir}` to compute the layer distributions")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            counts, totals = f.get_slice("counts"), f.get_slice("totals")
            if counts.get_shape() != [len(self.layers), self.sae.n_latents]:
                return M.Distribution(available=False, hint=f"{DISTS} does not match this "
                                      f"SAE's shape: run `mlsae analyze {self.run_dir}` again")
            c = counts[:, latent : latent + 1][:, 0]
            t = totals[:, latent : latent + 1][:, 0].double()
        probs = t / t.sum() if t.sum() > 0 else torch.zeros_like(t)
        included = meta.get("included_tokens")
        layers = json.loads(meta["layers"]) if "layers" in meta else self.layers
        return M.Distribution(available=True, layers=layers, counts=c.tolist(),
                              totals=t.tolist(), probs=probs.tolist(),
                              included_tokens=int(included) if included else None)

    def _examples(self, latent: int, layer: int | None, limit: int) -> M.Examples:
        """The stored examples of (latent, layer); `examples.sqlite` keys layers by LM block
        (`mlsae.analysis.examples`). No layer given: the layer of the strongest example."""
        db = self.run_dir / EXAMPLES
        if not db.is_file():
            return M.Examples(available=False, hint=f"no {EXAMPLES}: run `mlsae examples "
                              f"{self.run_dir}` to collect max-activating examples")
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            per_layer = [M.LayerExampleCount(layer=lay, count=n, max_activation=a)
                         for lay, n, a in con.execute(
                             "SELECT layer, COUNT(*), MAX(activation) FROM examples "
                             "WHERE latent = ? GROUP BY layer ORDER BY layer", (latent,))]
        finally:
            con.close()
        if layer is None:
            best = max(per_layer, key=lambda c: c.max_activation, default=None)
            layer = best.layer if best else self.layers[0]
        rows = query_examples(db, latent, layer)[:limit]
        with self._lock:  # the tokenizer is shared with model work
            examples = [self._example(r) for r in rows]
        return M.Examples(available=True, layer=layer, layers=per_layer, examples=examples)

    def _example(self, row: dict) -> M.Example:
        toks = row["context_tokens"] or []
        start = row["context_start"] if row["context_start"] is not None else row["pos"]
        return M.Example(rank=row["rank"], activation=row["activation"], seq=row["seq"],
                         pos=row["pos"], tokens=[self.lm.tokenizer.decode([t]) for t in toks],
                         acts=row["context_acts"] or [], max_index=row["pos"] - start)


def _span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))

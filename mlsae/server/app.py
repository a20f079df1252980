"""The explorer's FastAPI app: a JSON API under /api (OpenAPI schema at /openapi.json, docs at
/docs) and the static front end (mlsae/server/static) at /.

Errors are always `{"detail": "<one message>"}`: 404 for a latent in the URL that does not
exist, 422 for any other bad input (validation, unknown layer, empty or over-long prompt).
Endpoints are plain `def`s, so they run in the server's thread pool; `Explorer` serialises
model work with its lock.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from mlsae.analysis.codes import require_run_dir
from mlsae.errors import UserError
from mlsae.lens import TunedLens, sae_lens
from mlsae.lm import LanguageModel
from mlsae.options import TextOptions
from mlsae.runs import check_lm_matches, load_run_lm, load_sae, sae_layers
from mlsae.sae import MLSAE
from mlsae.server import DEFAULT_MAX_PROMPT_TOKENS
from mlsae.server import models as M
from mlsae.server.explorer import Explorer, NotFound

STATIC = Path(__file__).parent / "static"
ERRORS = {404: {"model": M.ErrorBody}, 422: {"model": M.ErrorBody}}


def create_app(run_dir: str | Path, lm: LanguageModel | None = None, sae: MLSAE | None = None,
               max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, model: str | None = None,
               device: str = "auto") -> FastAPI:
    """The explorer for the run in `run_dir`. `sae` defaults to the run's checkpoint, `lm` to
    the run's model (or `model`) loaded on `device`; a given `lm` is checked against the SAE.
    A lens run (`mlsae train --lens`) is served through its lens (mlsae.server.explorer)."""
    if max_prompt_tokens < 1:  # checked before minutes of model loading
        raise UserError(f"--max-prompt-tokens must be positive, got {max_prompt_tokens}")
    run_dir = require_run_dir(run_dir, model)  # a hub id or foreign folder: converted once
    sae, lm, lens = _load(run_dir, lm, sae, model, device)
    explorer = Explorer(run_dir, sae, lm, max_prompt_tokens, lens)
    app = FastAPI(title="mlsae explorer", summary="Prompt, latent and logit views of a "
                  "multi-layer SAE run", description=explorer.info().steering)
    _add_error_handlers(app)
    _add_routes(app, explorer)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _load(run_dir: str | Path, lm: LanguageModel | None, sae: MLSAE | None,
          model: str | None, device: str) -> tuple[MLSAE, LanguageModel, TunedLens | None]:
    sae = sae if sae is not None else load_sae(run_dir, lens_ok=True)
    if lm is None:
        lm = load_run_lm(sae, TextOptions(model=model, device=device))
    else:
        check_lm_matches(sae, lm)
    sae.to(lm.device).eval()
    lens = sae_lens(run_dir, sae.config, sae_layers(sae), sae.d_model)  # None: no lens
    return sae, lm, None if lens is None else lens.to(lm.device)


def _add_routes(app: FastAPI, ex: Explorer) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info", response_model=M.Info)
    def info() -> M.Info:
        """The run: model, SAE shape, layers, limits, which analysis files exist."""
        return ex.info()

    @app.post("/api/prompt", response_model=M.PromptResponse, responses=ERRORS)
    def prompt(req: M.PromptRequest) -> M.PromptResponse:
        """Tokens and the layers x latents heatmap of the prompt's top latents."""
        return ex.prompt(req)

    @app.post("/api/token", response_model=M.TokenResponse, responses=ERRORS)
    def token(req: M.TokenRequest) -> M.TokenResponse:
        """One token's top latents at every layer, with their activations."""
        return ex.token(req)

    @app.get("/api/latents/{latent}", response_model=M.LatentResponse, responses=ERRORS)
    def latent(latent: int, layer: int | None = Query(None, description="LM block (default: "
               "the layer of the strongest example)"),
               limit: int = Query(20, ge=1, le=200, description="examples")) -> M.LatentResponse:
        """Layer distribution over the dataset and max-activating examples at one layer."""
        return ex.latent(latent, layer, limit)

    @app.post("/api/logits", response_model=M.LogitsResponse, responses=ERRORS)
    def logits(req: M.LogitsRequest) -> M.LogitsResponse:
        """Top next tokens, clean and with the SAE reconstruction spliced in at a layer."""
        return ex.logits(req)

    @app.post("/api/steer", response_model=M.SteerResponse, responses=ERRORS)
    def steer(req: M.SteerRequest) -> M.SteerResponse:
        """Top next tokens after adding factor x W_dec[latent] (un-standardized) at a layer."""
        return ex.steer(req)

    @app.post("/api/graph", response_model=M.GraphResponse, responses=ERRORS)
    def graph(req: M.GraphRequest) -> M.GraphResponse:
        """The prompt's pruned attribution graph over the latents (circuit-tracer JSON)."""
        return ex.graph(req)

    @app.post("/api/intervene", response_model=M.InterveneResponse, responses=ERRORS)
    def intervene(req: M.InterveneRequest) -> M.InterveneResponse:
        """Top next tokens after scaling (0: ablating) latents at their layers."""
        return ex.intervene(req)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    def invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(UserError)
    def user_error(_req: Request, exc: UserError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 422
        return JSONResponse({"detail": str(exc)}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """pydantic's error list as one line: `factor: Input should be a valid number; ...`."""
    parts = []
    for err in exc.errors():
        if err["type"] == "json_invalid":  # its loc is a character offset, not a field
            parts.append(f"the request body is not valid JSON ({err['ctx']['error']})")
            continue
        where = ".".join(str(p) for p in err["loc"][1:])  # drop "body" / "query" / "path"
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)

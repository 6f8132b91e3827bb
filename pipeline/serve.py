"""`bertcache serve`: a checkpoint's encoder + head behind HTTP (FastAPI + uvicorn), with micro-batching.

Concurrent requests are gathered for up to `max_wait_ms` into one `Predictor.predict_proba` call, which
sorts the texts by length and cuts them into token-budget batches (`Encoder.encode`, the one place
batching lives). That call runs on a single worker thread: the event loop keeps accepting requests, and
torch is never entered from two threads at once. Each request gets its own slice of the results back.

Limits answer with JSON `{"detail": "...", "errors": [...]}`: 413 for a body over `max_body_bytes`
(checked before parsing), 400 for malformed JSON, 422 for a well-formed body that breaks a rule (wrong
types, empty list, empty or blank text, too many texts, a text over `max_chars` characters: long texts
are refused, never cut short; a text within the limit is truncated to the encoder's max_length tokens,
as in `bertcache predict`).

No `from __future__ import annotations` here: FastAPI reads the endpoint's annotations, and the request
model is built per app (its limits come from the arguments).
"""
import socket
from contextlib import asynccontextmanager

from ._version import __version__
from .batching import MAX_BATCH_TEXTS, MAX_BATCH_TOKENS, MAX_WAIT_MS, MicroBatcher
from .errors import UserError

# Defaults, visible in one place.
HOST = "127.0.0.1"
PORT = 8000
MAX_TEXTS = 64             # texts per request
MAX_CHARS = 2000           # characters per text; longer texts are refused (422), not truncated
MAX_BODY_BYTES = 1 << 20   # 64 texts x 2000 characters fit even written as \uXXXX escapes
INSTALL_HINT = "pip install 'bertcache[serve]'"


def require_server() -> None:
    """Fail with the install command (before any model is loaded) when the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"bertcache serve needs FastAPI and uvicorn ({e.name} is not installed): "
                        f"{INSTALL_HINT}") from e


# -- the app --------------------------------------------------------------------------------------

def create_app(predictor, *, batching: bool = True, max_wait_ms: float | None = None,
               max_batch_texts: int = MAX_BATCH_TEXTS, max_batch_tokens: int = MAX_BATCH_TOKENS,
               max_texts: int = MAX_TEXTS, max_chars: int = MAX_CHARS, max_body_bytes: int = MAX_BODY_BYTES):
    """A FastAPI app serving a `pipeline.predict.Predictor`: POST /predict, GET /health, GET /info."""
    require_server()
    from typing import Annotated

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

    for name, value in (("max_texts", max_texts), ("max_chars", max_chars), ("max_body_bytes", max_body_bytes),
                        ("max_batch_texts", max_batch_texts), ("max_batch_tokens", max_batch_tokens)):
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    encoder = predictor.encoder
    if max_wait_ms is None:
        max_wait_ms = MAX_WAIT_MS["cpu" if encoder.device.type == "cpu" else "gpu"]
    if max_wait_ms < 0:
        raise UserError(f"--max-wait-ms must be 0 or more, not {max_wait_ms}")
    prefix_chars = len(encoder.prefix or "")

    def estimate_tokens(text: str) -> int:
        # Roughly at most one token per character (BERT and XLM-R vocabularies), plus [CLS] and [SEP].
        return min(prefix_chars + len(text) + 2, encoder.max_length)

    batcher = MicroBatcher(predictor.predict_proba, estimate_tokens, batching=batching, max_wait_ms=max_wait_ms,
                           max_batch_texts=max_batch_texts, max_batch_tokens=max_batch_tokens)
    limits = {"max_texts_per_request": max_texts, "max_chars_per_text": max_chars,
              "max_body_bytes": max_body_bytes,
              "long_texts": f"refused: a text over {max_chars} characters gets 422; a shorter text is truncated "
                            f"to {encoder.max_length} tokens by the encoder, as in `bertcache predict`"}
    info = _info(predictor, limits, {"enabled": batching, "max_wait_ms": max_wait_ms,
                                     "max_batch_texts": max_batch_texts, "max_batch_tokens": max_batch_tokens,
                                     "encoder_batch_tokens": encoder.batch_tokens})

    # The constraints also make pydantic refuse lone surrogates ("\ud800"), which the tokenizer cannot take.
    Text = Annotated[str, StringConstraints(min_length=1, max_length=max_chars, pattern=r"\S")]
    PredictRequest = create_model(
        "PredictRequest", __config__=ConfigDict(extra="forbid", strict=True),
        texts=(Annotated[list[Text], Field(min_length=1, max_length=max_texts,
                                           description=f"1 to {max_texts} non-blank texts of at most "
                                                       f"{max_chars} characters")], ...))

    class Prediction(BaseModel):
        text: str
        label: str
        label_id: int
        probs: dict[str, float]

    class PredictResponse(BaseModel):
        predictions: list[Prediction]

    class Problem(BaseModel):
        loc: list[str | int]
        msg: str

    class ErrorResponse(BaseModel):
        detail: str
        errors: list[Problem] | None = None

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="bertcache", version=__version__, lifespan=lifespan,
                  description=f"Classifier head {predictor.checkpoint} over the frozen encoder "
                              f"{encoder.model_ref}.")
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        status, detail, problems = describe_validation_errors(exc.errors(), max_texts, max_chars)
        return JSONResponse({"detail": detail, "errors": problems}, status_code=status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)

    error_responses = {code: {"model": ErrorResponse, "description": text} for code, text in
                       ((400, "The body is not valid JSON"),
                        (413, f"The body is larger than {max_body_bytes} bytes"),
                        (422, "Wrong types, no texts, a blank text, too many texts or a text too long"))}

    @app.post("/predict", response_model=PredictResponse, responses=error_responses)
    async def predict(body: PredictRequest):  # type: ignore[valid-type]
        """Label, label id and class probabilities per text, in the order sent."""
        texts = list(body.texts)
        probs = await batcher.predict_proba(texts)
        return {"predictions": predictor.results(texts, probs)}

    @app.get("/health")
    async def health():
        """Liveness, and how many requests, texts and encoder calls have been served."""
        return {"status": "ok", "batching": batching, **batcher.stats}

    @app.get("/info")
    async def get_info():
        """The encoder, head, labels, training metrics and request limits of this server."""
        return info

    return app


class _BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` with 413 before anything parses it.

    A declared Content-Length is checked up front; a body without one (chunked) is counted as it
    arrives, and the count going over raises a 413 HTTPException that FastAPI answers.
    """

    def __init__(self, app, max_bytes: int):
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

        self.app, self.max_bytes = app, max_bytes
        # Looked up once: `from fastapi import ...` per request was a fifth of the event loop's time.
        self._HTTPException, self._JSONResponse = HTTPException, JSONResponse

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes: send fewer or shorter texts"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        HTTPException, JSONResponse = self._HTTPException, self._JSONResponse
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await JSONResponse({"detail": "the Content-Length header is not a number"},
                                          status_code=400)(scope, receive, send)
            if too_big:
                return await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted_receive, send)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null", bytes: "not JSON"}


def describe_validation_errors(errors, max_texts: int, max_chars: int) -> tuple[int, str, list[dict]]:
    """(status, one-line summary, [{loc, msg}]) for FastAPI's validation errors of a /predict body."""
    shape = 'send a JSON object {"texts": ["...", ...]} with Content-Type: application/json'
    problems, status = [], 422
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        kind, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        where = f"texts[{loc[1]}]" if len(loc) == 2 and loc[0] == "texts" else ".".join(map(str, loc))
        if kind == "json_invalid":
            status = 400
            msg = f"the body is not valid JSON ({ctx.get('error', 'decode error')}): {shape}"
        elif not loc:
            msg = (f"the body is empty: {shape}" if kind == "missing"
                   else f"the body must be a JSON object, not {got}: {shape}")
        elif kind == "extra_forbidden":
            msg = f'unknown field "{where}": the body takes only "texts"'
        elif loc == ["texts"] and kind == "missing":
            msg = f'the body has no "texts" field: {shape}'
        elif loc == ["texts"] and kind == "too_short":
            msg = '"texts" is empty: send at least one text'
        elif loc == ["texts"] and kind == "too_long":
            n = ctx.get("actual_length")
            msg = (f"too many texts{f' ({n})' if n is not None else ''}: at most {max_texts} per request; "
                   "split them over several requests")
        elif loc == ["texts"]:
            msg = f'"texts" must be an array of strings, not {got}'
        elif kind == "string_type":
            msg = f"{where} must be a string, not {got}"
        elif kind in ("string_too_short", "string_pattern_mismatch"):
            msg = f"{where} is empty or blank: every text needs some content"
        elif kind == "string_too_long":
            n = len(value) if isinstance(value, str) else "too many"
            msg = (f"{where} has {n} characters, more than the limit of {max_chars}: long texts are refused, "
                   "not truncated; shorten it")
        elif kind == "string_unicode":
            msg = f"{where} is not valid Unicode (it holds a lone surrogate escape such as \\ud800)"
        else:
            msg = f"{where}: {err.get('msg')}"
        problems.append({"loc": loc, "msg": msg})
    if not problems:
        problems.append({"loc": [], "msg": f"invalid request: {shape}"})
    detail = problems[0]["msg"]
    if len(problems) > 1:
        detail += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return status, detail, problems


def _info(predictor, limits: dict, batching: dict) -> dict:
    """info.py's description of the checkpoint, plus what this server runs: encoder, weights, limits."""
    from .info import describe_checkpoint, finite

    enc = predictor.encoder
    return finite({
        **describe_checkpoint(str(predictor.checkpoint)), "weights_served": predictor.weights,
        "encoder": {"model": enc.model_ref, "trained_with": predictor.config["encoder"].get("model"),
                    "revision": enc.revision, "fingerprint": enc.model_fingerprint, "device": str(enc.device),
                    "precision": enc.precision, "max_length": enc.max_length, "prefix": enc.prefix,
                    "instruction": enc.instruction, "family": enc.family, "hidden_size": enc.hidden_size},
        "limits": limits, "batching": batching, "version": __version__,
    })


# -- running it -----------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is a one-line error and port 0 picks a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host or --port") from e
    sock.set_inheritable(True)
    return sock


def serve(checkpoint: str, *, host: str = HOST, port: int = PORT, model: str | None = None, device: str = "auto",
          weights: str = "best", batch_tokens: int | None = None, threads: int | None = None,
          allow_pickle: bool = False, access_log: bool = False, log=None, **app_options) -> None:
    """Load the checkpoint and serve it until interrupted (Ctrl-C or SIGTERM)."""
    require_server()
    import uvicorn

    from .predict import Predictor

    sock = bind(host, port)  # before loading the model: a taken port fails fast
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, not {threads}")
        import torch
        torch.set_num_threads(threads)
    predictor = Predictor(checkpoint, model=model, device=device, weights=weights, batch_tokens=batch_tokens,
                          allow_pickle=allow_pickle)
    app = create_app(predictor, **app_options)
    bound_host, bound_port = sock.getsockname()[:2]
    if log:
        log(f"serving {checkpoint} on http://{bound_host}:{bound_port} "
            f"(POST /predict, GET /health, GET /info, docs at /docs); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on"))
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        raise UserError(f"the server on {host}:{port} did not start; see the log above")

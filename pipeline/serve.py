"""`bertcache serve`: a checkpoint's encoder + head behind HTTP (FastAPI + uvicorn), with micro-batching.

Concurrent requests are gathered for up to `max_wait_ms` into one `Predictor.predict_proba` call, which
sorts the texts by length and cuts them into token-budget batches (`Encoder.encode`, the one place
batching lives). That call runs on a single worker thread: the event loop keeps accepting requests, and
torch is never entered from two threads at once. Each request gets its own slice of the results back.

Limits answer with JSON `{"detail": "...", "errors": [...]}`: 413 for a body over `max_body_bytes`
(checked before parsing), 400 for malformed JSON, 422 for a well-formed body that breaks a rule (wrong
types, empty list, empty or blank text, too many texts, a text over `max_chars` characters: long texts
are refused, never cut short; a text within the limit is truncated to the encoder's max_length tokens,
as in `bertcache predict`, or encoded whole in windows for a head extracted with --long-texts chunk).

Every task is served: a prediction holds `text` and, per task, `label` / `label_id` / `probabilities`
(classification), `labels` / `probabilities` (multilabel: the labels over their thresholds), or `score`
(regression). A head trained on sentence pairs takes `{"pairs": [["text", "text_pair"], ...]}` instead
of `texts`, and each prediction also holds `text_pair`.

Next to bertcache's own `{"texts": [...]}`, `/predict` takes text-embeddings-inference (TEI) bodies
(`{"inputs": ..., "raw_scores", "truncate"}`) and answers in TEI's shape; `/embed` (TEI) and
`/v1/embeddings` (OpenAI) return the pooled vectors the head reads. All go through the same limits and
the same micro-batches. `/` is a demo page (`ui=False` turns it off). With `api_key`, every endpoint
but /health (and the static demo page) needs `Authorization: Bearer <key>`.

No `from __future__ import annotations` here: FastAPI reads the endpoint's annotations, and the request
model is built per app (its limits come from the arguments).
"""
import asyncio
import base64
import hmac
import ipaddress
import os
import socket
import time
from contextlib import asynccontextmanager
from typing import Literal, Optional, Union

from ._version import __version__
from .batching import MAX_BATCH_TEXTS, MAX_BATCH_TOKENS, MAX_WAIT_MS, MicroBatcher
from .defaults import check_ranges
from .errors import VISIBLE_RE, UserError

# Defaults, visible in one place.
HOST = "127.0.0.1"
PORT = 8000
MAX_TEXTS = 64             # texts per request
MAX_CHARS = 2000           # characters per text; longer texts are refused (422), not truncated
MAX_BODY_BYTES = 1 << 20   # 64 texts x 2000 characters fit even written as \uXXXX escapes
INSTALL_HINT = "pip install 'bertcache[serve]'"
# A refused body (413, 401) is read and dropped, up to this much / this long, before the answer is sent:
# closing with unread bytes makes the kernel reset the connection, and the client sees "connection reset"
# instead of the answer (nginx's "lingering close"). Nothing of it is kept.
LINGER_BYTES = 64 << 20
LINGER_SECONDS = 10.0
API_KEY_ENV = "BERTCACHE_API_KEY"
MAX_PROBLEMS = 100  # problems listed in a 422's `errors` (its `detail` counts them all): 1 MB of unknown fields is 100k
OPEN_PATHS = ("/health", "/")  # no key needed to GET: liveness, and the static demo page (its calls need the key)
DEMO_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "demo.html")


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
               max_texts: int = MAX_TEXTS, max_chars: int = MAX_CHARS, max_body_bytes: int = MAX_BODY_BYTES,
               ui: bool = True, cors_origins: tuple = (), api_key: str | None = None):
    """A FastAPI app serving a `pipeline.predict.Predictor` (or an `onnx_runner.OnnxPredictor`):
    POST /predict, /embed, /v1/embeddings, GET /health, /info, and the demo page at / (`ui`).

    Args:
        cors_origins: origins a browser page may call from (e.g. "https://example.org", or "*").
        api_key: when set, every endpoint but /health and / needs `Authorization: Bearer <api_key>`.
    """
    require_server()
    from typing import Annotated

    import numpy as np
    from fastapi import FastAPI, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, create_model

    check_ranges(max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes,
                 max_batch_texts=max_batch_texts, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms)
    # The torch path keeps prefix, max_length, batch_tokens and tokenize on its encoder; the ONNX runner on itself.
    encoder = getattr(predictor, "encoder", None) or predictor
    device_type = encoder.device.type if hasattr(encoder, "device") else "cpu"
    if max_wait_ms is None:
        max_wait_ms = MAX_WAIT_MS["cpu" if device_type == "cpu" else "gpu"]
    prefix_chars = len(encoder.prefix or "")

    def estimate_tokens(item) -> int:
        # Roughly at most one token per character (BERT and XLM-R vocabularies), plus [CLS] and [SEP].
        chars = len(item) if isinstance(item, str) else sum(len(t) for t in item)
        return min(prefix_chars + chars + 2, encoder.max_length)

    batcher = MicroBatcher(predictor.run, estimate_tokens, batching=batching, max_wait_ms=max_wait_ms,
                           max_batch_texts=max_batch_texts, max_batch_tokens=max_batch_tokens)
    # Keys named as the options that set them (--max-texts, --max-chars, --max-body-bytes, --batch-tokens);
    # the prose is `note`: `long_texts` is truncate / chunk everywhere else (top-level here too).
    limits = {"max_texts": max_texts, "max_chars": max_chars, "max_body_bytes": max_body_bytes,
              "note": f"a text over {max_chars} characters is refused with 422; a shorter text is " + (
                  f"encoded whole, in windows of {encoder.max_length} tokens averaged" if encoder.long_texts == "chunk"
                  else f"truncated to {encoder.max_length} tokens by the encoder") + ", as in `bertcache predict`"}
    info = _info(predictor, limits, {"enabled": batching, "max_wait_ms": max_wait_ms,
                                     "max_batch_texts": max_batch_texts, "max_batch_tokens": max_batch_tokens,
                                     "batch_tokens": encoder.batch_tokens})

    # The constraints also make pydantic refuse lone surrogates ("\ud800"), which the tokenizer cannot take.
    Text = Annotated[str, StringConstraints(min_length=1, max_length=max_chars, pattern=VISIBLE_RE)]
    pair_mode = getattr(predictor, "pair_mode", None)
    task = getattr(predictor, "task", "classification")
    field = "pairs" if pair_mode else "texts"
    Item = Annotated[list[Text], Field(min_length=2, max_length=2)] if pair_mode else Text
    PredictRequest = create_model(
        "PredictRequest", __config__=ConfigDict(extra="forbid", strict=True),
        **{field: (Annotated[list[Item], Field(min_length=1, max_length=max_texts,
                                               description=f"1 to {max_texts} " + ("pairs of " if pair_mode
                                                                                   else "") + "non-blank texts of at "
                                               f"most {max_chars} characters")], ...)})

    # TEI's /predict input: a text, [text], a pair [a, b], or a batch [[text] or [a, b], ...].
    Sequence = Annotated[list[Text], Field(min_length=1, max_length=2)]
    TEIPredictRequest = create_model(
        "TEIPredictRequest", __config__=ConfigDict(extra="forbid", strict=True),
        inputs=(Union[Text, Sequence, Annotated[list[Sequence], Field(min_length=1, max_length=max_texts)]],
                Field(description="TEI's input: a text, [text], a pair [a, b] (for a head trained on pairs), or "
                                  f"a batch of up to {max_texts} [text] / [a, b]")),
        raw_scores=(bool, Field(False, description="Logits instead of probabilities")),
        truncate=(Optional[bool], Field(None, description="Accepted; texts are always truncated to max_length "
                                                          "tokens")),
        truncation_direction=(Optional[Literal["left", "right", "Left", "Right"]], None),
        parameters=(Optional[dict], Field(None, description="Accepted and ignored, as TEI ignores it "
                                                            "(huggingface_hub's InferenceClient sends it)")))

    def request_shape(body):
        return "tei" if isinstance(body, dict) and "inputs" in body else "bertcache"

    PredictBody = Annotated[Union[Annotated[PredictRequest, Tag("bertcache")],
                                  Annotated[TEIPredictRequest, Tag("tei")]], Discriminator(request_shape)]
    Inputs = Union[Text, Annotated[list[Text], Field(min_length=1, max_length=max_texts)]]
    EmbedRequest = create_model(
        "EmbedRequest", __config__=ConfigDict(extra="forbid", strict=True),
        inputs=(Inputs, Field(description=f"A text or up to {max_texts} texts")),
        normalize=(bool, Field(True, description="Scale each vector to unit length (TEI's default)")),
        truncate=(Optional[bool], Field(None, description="Accepted; texts are always truncated to max_length "
                                                          "tokens")),
        truncation_direction=(Optional[Literal["left", "right", "Left", "Right"]], None),
        prompt_name=(Optional[str], None))
    OpenAIRequest = create_model(
        "OpenAIEmbeddingsRequest", __config__=ConfigDict(extra="forbid", strict=True),
        input=(Inputs, Field(description=f"A text or up to {max_texts} texts")),
        model=(Optional[str], None), user=(Optional[str], None),
        encoding_format=(Optional[Literal["float", "base64"]], None), dimensions=(Optional[int], None))

    class TEIPrediction(BaseModel):
        score: float
        label: str

    class OpenAIEmbedding(BaseModel):
        object: str
        embedding: Union[list[float], str]
        index: int

    class OpenAIUsage(BaseModel):
        prompt_tokens: int
        total_tokens: int

    class OpenAIResponse(BaseModel):
        object: str
        data: list[OpenAIEmbedding]
        model: str
        usage: OpenAIUsage

    class Prediction(BaseModel):
        text: str
        text_pair: str | None = None
        label: str | None = None
        label_id: int | None = None
        labels: list[str] | None = None
        probabilities: dict[str, float] | None = None
        score: float | None = None

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
    # Added innermost first: CORS (preflights answered without a key), then the key, then the body size.
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(_BearerKey, key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def problem(detail: str, loc: list, status: int = 422) -> JSONResponse:  # the documented error body
        return JSONResponse({"detail": detail, "errors": [{"loc": loc, "msg": detail}]}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        status, detail, problems = describe_validation_errors(exc.errors(), max_texts, max_chars, field,
                                                              request.url.path)
        return JSONResponse({"detail": detail, "errors": problems}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # bytes that are not UTF-8 JSON, say
            detail = ("the body could not be read as JSON (not UTF-8, or nested too deeply): send a JSON object "
                      "with Content-Type: application/json")
            return problem(detail, [], 400)
        return await http_exception_handler(request, exc)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):  # what the request asked cannot be done by this head
        return problem(str(exc), ["body"])

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)

    error_responses = {code: {"model": ErrorResponse, "description": text} for code, text in
                       ((400, "The body is not valid JSON"),
                        (413, f"The body is larger than {max_body_bytes} bytes"),
                        (422, "Wrong types, no texts, a blank text, too many texts or a text too long"))}


    @app.post("/predict", response_model=Union[PredictResponse, list[TEIPrediction], list[list[TEIPrediction]]],
              responses=error_responses, response_model_exclude_none=True)
    async def predict(body: PredictBody):  # type: ignore[valid-type]
        """Per text (or pair, `{"pairs": [[a, b], ...]}` for a head trained on pairs), in the order sent
        (`{"texts": [...]}`): label, label id and class probabilities; multilabel the labels over their
        thresholds and every probability; regression the score. For a TEI body (`{"inputs": ...}`), TEI's
        answer: per text, every label with its score, best first (classification and multilabel heads)."""
        if isinstance(body, PredictRequest):
            items = [tuple(p) for p in body.pairs] if pair_mode else list(body.texts)
            out = await batcher.predict_proba(items)
            return {"predictions": predictor.results(items, out.get("outputs", out.get("probabilities")))}
        if task == "regression":
            return problem("TEI's /predict body is for heads with labels; this head (regression"
                                 f'{", pairs" if pair_mode else ""}) takes bertcache\'s {{"{field}": [...]}}',
                                 ["inputs"])
        inputs, single = body.inputs, True
        if isinstance(inputs, str):
            inputs = [[inputs]]
        elif inputs and isinstance(inputs[0], str):
            inputs = [inputs]
        else:
            single = False
        wrong = [i for i, seq in enumerate(inputs) if (len(seq) == 2) != bool(pair_mode)]
        if wrong:
            where = ["inputs"] if single else ["inputs", wrong[0]]
            return problem(
                f"{place(where)}: this head reads pairs of texts: send each as [a, b], e.g. "
                '{"inputs": [["first a", "first b"], ["second a", "second b"]]}' if pair_mode else
                f"{place(where)} is a pair of texts [a, b] (TEI's reading of a two-string list), and "
                'this head reads single texts: send one text per entry, e.g. {"inputs": [["first"], ["second"]]}',
                where)
        texts = [tuple(seq) for seq in inputs] if pair_mode else [seq[0] for seq in inputs]
        out = await batcher.predict_proba(texts)
        scores = out["logits" if body.raw_scores else "probabilities"]
        ranked = [sorted(({"score": float(v), "label": name} for name, v in zip(predictor.label_names, row)),
                         key=lambda p: -p["score"]) for row in scores]
        return ranked[0] if single else ranked

    # TEI answers POST / as its model's task (/predict for a classifier): huggingface_hub's InferenceClient given
    # the server's address posts there. GET / stays the demo page.
    app.add_api_route("/", predict, methods=["POST"], include_in_schema=False, response_model_exclude_none=True,
                      response_model=Union[PredictResponse, list[TEIPrediction], list[list[TEIPrediction]]])

    async def vectors(texts: list, normalize: bool):
        if pair_mode:  # a pair head's batches hold pairs: one text's vector is the encoder's, apart from them
            features = await batcher.run_alone(predictor.embed, texts)
        else:
            features = (await batcher.predict_proba(texts))["features"]
        if normalize:
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            features = features / np.where(norms > 0, norms, 1)
        return features

    @app.post("/embed", response_model=list[list[float]], responses=error_responses)
    async def embed(body: EmbedRequest):  # type: ignore[valid-type]
        """TEI's /embed: one vector per text, the pooled features the head reads (before its standardization);
        unit length unless `normalize` is false."""
        texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
        return (await vectors(texts, body.normalize)).tolist()

    @app.post("/v1/embeddings", response_model=OpenAIResponse, responses=error_responses)
    async def openai_embeddings(body: OpenAIRequest):  # type: ignore[valid-type]
        """OpenAI's embeddings API: the same vectors as /embed (unit length), as floats or base64 float32."""
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        features = await vectors(texts, True)
        width = features.shape[1]
        if body.dimensions is not None and body.dimensions != width:
            return problem(f"dimensions is {body.dimensions}, but this model's vectors have {width}: leave "
                                 "it out", ["dimensions"])
        tokens = await batcher.call(lambda: sum(len(ids) for ids in encoder.tokenize(texts)))
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                               else v.tolist())} for i, v in enumerate(features)]
        return {"object": "list", "data": data, "model": body.model or os.path.basename(os.path.normpath(
                    str(predictor.checkpoint))),  # the checkpoint's name, not where it lies on the server
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    if ui:
        with open(DEMO_PAGE, encoding="utf-8") as f:
            page = f.read()

        @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
        async def demo():
            """The demo page: a text box (two for a pair head), the answer as the task gives it (label and bars,
            labels over their thresholds, score), recent inputs, the model and its test metrics."""
            return page

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what uptime probes send
    async def health():
        """Liveness, and how many requests, texts and encoder calls have been served."""
        return {"status": "ok", "batching": batching, **batcher.stats}

    @app.api_route("/info", methods=["GET", "HEAD"])
    async def get_info():
        """The encoder, head, labels, training metrics and request limits of this server."""
        return info

    return app


class _TooLarge(BaseException):
    """Raised inside the body's receive() when a body without Content-Length runs over the limit. A
    BaseException: FastAPI turns any Exception met while reading a body into a 400, and this must reach
    _BodyLimit, which answers 413 after draining the rest."""


async def refuse(scope, receive, send, status: int, detail: str, headers: dict | None = None) -> None:
    """Answer `status` with {"detail": ...} after reading and dropping what is left of the body, within
    LINGER_BYTES / LINGER_SECONDS (never keeping it), so that the client reads the answer rather than a reset.
    A body past those bounds is left unread and the connection closed."""
    from fastapi.responses import JSONResponse

    dropped, deadline, more = 0, time.monotonic() + LINGER_SECONDS, scope.get("_bertcache_more_body", True)
    while more and dropped <= LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            break
        if message["type"] != "http.request":  # the client went away
            return
        dropped += len(message.get("body", b""))
        more = message.get("more_body", False)
    headers = {**(headers or {}), **({"connection": "close"} if more else {})}
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: refuse a body over `max_bytes` with 413 before anything parses it.

    A declared Content-Length is checked up front; a body without one (chunked) is counted as it
    arrives. Either way the rest of the body is read and dropped before the 413 goes out (`refuse`).
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes: send fewer or shorter texts"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await refuse(scope, receive, send, 400, "the Content-Length header is not a number")
            if too_big:
                return await refuse(scope, receive, send, 413, self._message())
        seen, more = 0, True

        async def counted_receive():
            nonlocal seen, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _TooLarge:
            await refuse({**scope, "_bertcache_more_body": more}, receive, send, 413, self._message())


class _BearerKey:
    """ASGI middleware: every request but a GET / HEAD of OPEN_PATHS needs `Authorization: Bearer <key>`
    (compared in constant time); otherwise 401 before anything reads the body, so nothing reaches the encoder."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope.get("path") in OPEN_PATHS and scope.get("method") in ("GET", "HEAD")):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        detail = ("this server needs an API key: send the header Authorization: Bearer <key>" if not given
                  else "the API key is wrong (Authorization: Bearer <key>)")
        await refuse(scope, receive, send, 401, detail, {"www-authenticate": "Bearer"})


class LoopbackHost:
    """ASGI middleware for a server on loopback without a key: a request whose Host header names another
    machine is refused (400). Without it, any web page the user opens could reach the server by DNS
    rebinding (its own name, resolved again to 127.0.0.1: the browser then counts the server as that page's
    origin, and reads /predict and /info). Browsers always send Host; localhost, *.localhost and loopback
    addresses pass."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"host")
            if given is not None and not is_loopback_name(given.decode("latin-1")):
                return await refuse(scope, receive, send, 400, (
                    f"this server listens on loopback only, and Host {given.decode('latin-1')[:100]!r} is not this "
                    f"machine: use http://127.0.0.1 or http://localhost (a proxy that forwards Host: serve with "
                    f"--api-key)"))
        return await self.app(scope, receive, send)


def is_loopback_name(host: str) -> bool:
    """Whether a Host header (with or without its port) names this machine: localhost, *.localhost, 127.x, [::1]."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null", bytes: "not JSON"}


# The body field(s) each endpoint takes, for messages: /predict's own list (texts, or pairs) or TEI's inputs.
ENDPOINT_FIELDS = {"/embed": ("inputs", 'TEI\'s "inputs"'), "/v1/embeddings": ("input", 'OpenAI\'s "input"')}


def describe_validation_errors(errors, max_texts: int, max_chars: int, field: str = "texts",
                               path: str = "/predict") -> tuple[int, str, list[dict]]:
    """(status, one-line summary, [{loc, msg}]) for FastAPI's validation errors of a request body to `path`:
    /predict's list is `field` (`texts`, or `pairs` for a head trained on sentence pairs) or TEI's `inputs`;
    /embed takes `inputs`, /v1/embeddings `input`."""
    if path in ENDPOINT_FIELDS:
        field, takes = ENDPOINT_FIELDS[path]
    else:
        takes = f'"{field}" (bertcache) or TEI\'s "inputs"'
    example = '[["...", "..."], ...]' if field == "pairs" else '["...", ...]'
    shape = f'send a JSON object {{"{field}": {example}}} with Content-Type: application/json'
    problems, status, seen = [], 422, set()
    # A field that may be a string or a list (TEI's inputs, OpenAI's input) fails once per union branch: keep
    # the branches that got past the type check, when one did (a blank text, too many texts), over "not a string".
    errors = list(errors)
    if any(not str(e.get("type", "")).endswith("_type") for e in errors):
        errors = [e for e in errors if not str(e.get("type", "")).endswith("_type")] or errors
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body" and not _union_tag(p)]
        if loc and loc[0] in ("bertcache", "tei"):  # which body shape /predict read it as
            loc = loc[1:]
        if loc and loc[0] in ("inputs", "input") and loc[0] != field:
            field = loc[0]  # /predict read as TEI's shape
        kind, ctx, value = err.get("type", ""), err.get("ctx") or {}, err.get("input")
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        where = place(loc)
        if kind == "json_invalid":
            status = 400
            msg = f"the body is not valid JSON ({ctx.get('error', 'decode error')}): {shape}"
        elif not loc and isinstance(value, bytes):  # not sent as JSON: form data, text/plain, no Content-Type
            status = 400
            msg = f"the body was not sent as JSON: {shape}"
        elif not loc:
            msg = (f"the body is empty: {shape}" if kind == "missing"
                   else f"the body must be a JSON object, not {got}: {shape}")
        elif kind == "extra_forbidden":
            msg = f'unknown field "{where}": the body takes {takes}'
        elif loc == [field] and kind == "missing":
            msg = f'the body has no "{field}" field: {shape}'
        elif loc == [field] and kind == "too_short":
            msg = f'"{field}" is empty: send at least one ' + ("pair" if field == "pairs" else "text")
        elif (loc == ["inputs"] and kind == "too_long" and ctx.get("max_length") != max_texts
              and isinstance(value, list) and all(isinstance(v, str) for v in value)):
            # /predict's TEI inputs as a list of strings: one text or a pair, never a batch (TEI reads it so)
            msg = (f'inputs holds {ctx.get("actual_length", "more than 2")} strings: TEI reads a list of strings '
                   'as one text ["..."] or a pair ["...", "..."]; send a batch as [["..."], ["..."], ...]')
        elif loc == [field] and kind == "too_long":
            n = ctx.get("actual_length")
            msg = (f"too many texts{f' ({n})' if n is not None else ''}: at most {max_texts} per request; "
                   "split them over several requests")
        elif loc == [field] and kind.endswith("_type"):
            msg = f'"{field}" must be an array of ' + ("pairs" if field == "pairs" else "strings") + f', not {got}'
        elif field in ("pairs", "inputs") and len(loc) == 2 and kind in ("too_short", "too_long"):
            n = ctx.get("actual_length", "another number of")
            msg = (f'{where} must be a pair of two texts ["...", "..."], not {n}' if field == "pairs" else
                   f'{where} holds {n} texts: an entry of TEI\'s "inputs" is one text ["..."] or a pair ["...", "..."]')
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
        if (tuple(loc), msg) not in seen:  # two union branches can fail alike ("inputs": []); a set: a body of
            seen.add((tuple(loc), msg))   # 100k unknown fields is 100k errors, and a list's `in` took minutes
            problems.append({"loc": loc, "msg": msg})
    if not problems:
        problems.append({"loc": [], "msg": f"invalid request: {shape}"})
    detail = problems[0]["msg"]
    if len(problems) > 1:
        detail += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return status, detail, problems[:MAX_PROBLEMS]


def place(loc) -> str:
    """A place in a request body, one way everywhere: ["pairs", 0, 1] -> "pairs[0][1]"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _union_tag(part) -> bool:
    """Whether a pydantic error location part names a union branch (`constrained-str`, `list[...]`)."""
    return isinstance(part, str) and (part in ("str", "constrained-str") or part.startswith("list["))


def _info(predictor, limits: dict, batching: dict) -> dict:
    """info.py's description of the checkpoint (or the ONNX export's), plus what this server runs: encoder,
    weights, limits."""
    from .info import describe_checkpoint, finite

    if hasattr(predictor, "describe"):  # the ONNX runner
        return finite({**predictor.describe(), "weights_served": predictor.meta.get("weights"),
                       "encoder": {"model": predictor.meta["encoder"].get("model"), "backend": "onnx",
                                   "device": "cpu", "precision": "fp32", "max_length": predictor.max_length,
                                   "prefix": predictor.prefix},
                       "limits": limits, "batching": batching, "version": __version__})
    enc = predictor.encoder
    return finite({
        **describe_checkpoint(str(predictor.checkpoint)), "weights_served": predictor.weights,
        "encoder": {"model": enc.model_ref, "backend": "torch", "trained_with": predictor.config["encoder"].get("model"),
                    "revision": enc.revision, "model_fingerprint": enc.model_fingerprint, "device": str(enc.device),
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
          allow_pickle: bool = False, access_log: bool = False, backend: str = "torch", log=None,
          **app_options) -> None:
    """Load the checkpoint (or, with backend "onnx", a `bertcache export` folder) and serve it until
    interrupted (Ctrl-C or SIGTERM)."""
    require_server()
    import uvicorn

    from .onnx_runner import load_predictor

    # the limits (defaults.BOUNDS, as every numeric option's), all before the model loads
    check_ranges(threads=threads, **{k: v for k, v in app_options.items() if k.startswith("max_")})
    sock = bind(host, port)  # before loading the model: a taken port fails fast
    if threads is not None:
        if backend == "torch":
            import torch
            torch.set_num_threads(threads)
    if log and not app_options.get("api_key") and not is_loopback(host):
        log(f"warning: listening on {host} (beyond this machine) without an API key: anyone who can reach it "
            f"can use the model; pass --api-key or set {API_KEY_ENV}")
    if log:  # seconds of imports, tokenizer and weights before the server listens
        log(f"loading {checkpoint} ...")
    predictor = load_predictor(checkpoint, backend, model=model, device=device, weights=weights,
                               batch_tokens=batch_tokens, allow_pickle=allow_pickle, threads=threads)
    app = create_app(predictor, **app_options)
    if is_loopback(host) and not app_options.get("api_key"):
        app = LoopbackHost(app)
    bound_host, bound_port = sock.getsockname()[:2]
    if log:
        ui = "demo page at /, " if app_options.get("ui", True) else ""
        log(f"serving {checkpoint} on http://{bound_host}:{bound_port} "
            f"(POST /predict, /embed, /v1/embeddings, GET /health, /info; {ui}docs at /docs); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on"))
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        raise UserError(f"the server on {host}:{port} did not start; see the log above")


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

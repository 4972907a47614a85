"""The ASGI app: OpenAI- and text-embeddings-inference-compatible routes over a batcher.

Built on Starlette rather than FastAPI: the routes validate their own bodies (to answer
in OpenAI's and TEI's exact error shapes, which pydantic's 422s are not), so FastAPI's
model layer would add per-request cost and a dependency without doing any of the work.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from normcy.serve.batcher import Batcher, Tokens
from normcy.serve.config import ServeConfig
from normcy.serve.metrics import Metrics

__all__ = ["create_app", "ServeConfig", "ACCESS_LOGGER"]

#: Logger of the one-line-per-request access log (extra fields in ``record.access``).
ACCESS_LOGGER = "normcy.serve.access"
_log = logging.getLogger("normcy.serve")
_access = logging.getLogger(ACCESS_LOGGER)

#: Tokenize on the event loop up to this many characters per request; larger requests
#: are tokenized in a worker thread so the loop keeps serving.
_INLINE_TOKENIZE_CHARS = 4096


# ----------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as JSON in the route's dialect.

    Parameters
    ----------
    status : int
        HTTP status.
    message : str
    tei_type : str
        TEI's ``error_type`` (``validation``, ``tokenizer``, ``empty``, ``overloaded``,
        ``unhealthy``, ``backend``, ``unauthorized``).
    param : str, optional
        The offending request field (OpenAI's ``param``).
    code : str, optional
        OpenAI's ``code``.
    headers : dict, optional
    """

    def __init__(self, status: int, message: str, tei_type: str = "validation",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.tei_type = tei_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> Dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error",
                503: "service_unavailable", 500: "server_error",
                424: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def tei_body(self) -> Dict[str, Any]:
        return {"error": self.message, "error_type": self.tei_type}


def _bad(message: str, param: Optional[str] = None, status: int = 400,
         tei_type: str = "validation", code: Optional[str] = None) -> APIError:
    return APIError(status, message, tei_type, param, code)


class _JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# ----------------------------------------------------------------------------- inputs
def _parse_inputs(value: Any, param: str) -> Tuple[str, List[Any]]:
    """Classify a request's inputs: ``("text", [str, ...])`` or ``("ids", [[int, ...], ...])``.

    Accepts a string, a list of strings, a list of token ids, or a list of token-id lists.
    """
    if isinstance(value, str):
        return "text", [value]
    if not isinstance(value, list):
        raise _bad("'%s' must be a string, a list of strings, a list of token ids or a list "
                   "of token-id lists, got %s" % (param, _json_type(value)), param, 422)
    if not value:
        raise _bad("'%s' must not be an empty list" % param, param, 400, "empty")
    first = value[0]
    if isinstance(first, str):
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise _bad("'%s[%d]' must be a string like the other inputs, got %s"
                           % (param, i, _json_type(v)), param, 422)
        return "text", value
    if _is_int(first):
        for i, v in enumerate(value):
            if not _is_int(v):
                raise _bad("'%s[%d]' must be a token id (integer) like the other items, got %s"
                           % (param, i, _json_type(v)), param, 422)
        return "ids", [value]
    if isinstance(first, list):
        for i, seq in enumerate(value):
            if not isinstance(seq, list) or not all(_is_int(t) for t in seq):
                raise _bad("'%s[%d]' must be a list of token ids (integers)" % (param, i),
                           param, 422)
        return "ids", value
    raise _bad("'%s' must be a string, a list of strings, a list of token ids or a list of "
               "token-id lists; '%s[0]' is %s" % (param, param, _json_type(first)), param, 422)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _opt_bool(body: Dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad("'%s' must be a boolean, got %s" % (name, _json_type(v)), name, 422)
    return v


# ---------------------------------------------------------------------------- service
class _Service:
    """State shared by the routes of one app."""

    def __init__(self, encoder, loader: Optional[Callable[[], Any]], config: ServeConfig,
                 metrics: Metrics, on_load_error: Optional[Callable[[BaseException], None]]):
        self.encoder = encoder
        self.loader = loader
        self.config = config
        self.metrics = metrics
        self.on_load_error = on_load_error
        self.batcher: Optional[Batcher] = None
        self.state = "loading"
        self.load_error: Optional[BaseException] = None
        self.in_flight = 0
        self._left_tokenizer = None
        self._full_tokenizer = None
        self._load_task = None

    # -- lifecycle
    async def startup(self) -> None:
        if self.encoder is not None:
            self._ready()
        else:
            self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.encoder = await run_in_threadpool(self.loader)
            self._ready()
        except Exception as exc:  # noqa: BLE001 - reported, the app stays unhealthy
            self.state = "failed"
            self.load_error = exc
            _log.error("cannot load the model: %s: %s", type(exc).__name__, exc)
            if self.on_load_error is not None:
                self.on_load_error(exc)
            return
        _log.info("model loaded in %.1f s: %r", time.perf_counter() - t0, self.encoder)

    def _ready(self) -> None:
        enc = self.encoder
        if self.config.max_batch_tokens < enc.max_seq_length:
            raise ValueError("max_batch_tokens (%d) must be at least the model's max_seq_length "
                             "(%d)" % (self.config.max_batch_tokens, enc.max_seq_length))
        if self.config.model_id is None:
            self.config.model_id = _model_name(getattr(enc, "path", None))
        self.batcher = Batcher(enc, self.config.max_batch_tokens, self.metrics,
                               max_batch_wait=self.config.max_batch_wait_ms / 1e3)
        self.batcher.start()
        self.vocab_size = int(enc.tokenizer.get_vocab_size(with_added_tokens=True))
        self.dim = int(enc.get_sentence_embedding_dimension())
        self.state = "ready"

    async def shutdown(self) -> None:
        self.state = "stopping"
        if self._load_task is not None and not self._load_task.done():
            await self._load_task
        if self.batcher is not None:
            await self.batcher.close()

    def require_ready(self) -> None:
        if self.state == "loading":
            self.metrics.rejected.labels("not_ready").inc()
            raise APIError(503, "the model is loading; retry shortly", "unhealthy",
                           headers={"Retry-After": "1"})
        if self.state == "failed":
            self.metrics.rejected.labels("not_ready").inc()
            raise APIError(503, "the model failed to load: %s" % self.load_error, "unhealthy")

    # -- tokenization
    def _tokenizer_copy(self, truncation: Optional[str]):
        """A copy of the model's tokenizer without padding, truncating from the `truncation`
        side at the model's length (None: not at all)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.encoder.tokenizer.to_str())
        tok.no_padding()
        if truncation is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length=self.encoder.max_seq_length, stride=0,
                                  strategy="longest_first", direction=truncation)
        return tok

    def untruncated_tokenizer(self):
        """The model's tokenizer without truncation or padding (TEI's /tokenize gives every
        token of the text)."""
        if self._full_tokenizer is None:
            self._full_tokenizer = self._tokenizer_copy(None)
        return self._full_tokenizer

    def _tokenizer(self, direction: str):
        if direction == "right":
            return self.encoder.tokenizer
        if self._left_tokenizer is None:
            self._left_tokenizer = self._tokenizer_copy("left")
        return self._left_tokenizer

    def prompt(self) -> Optional[str]:
        """The model's default prompt, prepended to every text input (None: none)."""
        enc = self.encoder
        return enc.prompts.get(enc.default_prompt_name) if enc.default_prompt_name else None

    def pool_prompt_length(self, kind: str) -> int:
        """The leading positions of each input left out of the pooling: the default prompt's
        when the model's pooling excludes prompts (include_prompt false) and the inputs are
        texts (token-id inputs get no prompt)."""
        prompt = self.prompt()
        if kind != "text" or not prompt or self.encoder.include_prompt:
            return 0
        return self.encoder.prompt_length(prompt)

    async def encodings(self, kind: str, items: List[Any], *, truncate: bool, param: str,
                        direction: str = "right") -> Tuple[List[Any], float]:
        """Tokenize (text) or check (token ids) the inputs; returns (encodings, seconds)."""
        cfg = self.config
        enc = self.encoder
        limit = enc.max_seq_length
        if len(items) > cfg.max_client_batch_size:
            raise _bad("%d inputs in one request: more than the limit of %d "
                       "(--max-client-batch-size)" % (len(items), cfg.max_client_batch_size),
                       param, 413)
        t0 = time.perf_counter()
        if kind == "ids":
            out = []
            for i, ids in enumerate(items):
                if not ids:
                    raise _bad("'%s[%d]' is an empty list of token ids" % (param, i), param,
                               400, "empty")
                try:
                    arr = np.asarray(ids, dtype=np.int64)
                    bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
                except OverflowError:
                    bad = [next(k for k, t in enumerate(ids) if not -2**63 <= t < 2**63)]
                if len(bad):
                    raise _bad("'%s[%d]' holds token id %d, outside the model's vocabulary "
                               "[0, %d)" % (param, i, ids[int(bad[0])], self.vocab_size),
                               param, 422, "tokenizer")
                if len(ids) > limit:
                    if not truncate:
                        raise _too_long(param, i, "%d tokens" % len(ids), limit)
                    ids = ids[:limit] if direction == "right" else ids[-limit:]
                out.append(Tokens(ids, [0] * len(ids)))
            return out, time.perf_counter() - t0
        chars = 0
        for i, s in enumerate(items):
            if not s:
                raise _bad("'%s[%d]' is an empty string; send at least one character"
                           % (param, i), param, 400, "empty")
            if len(s) > cfg.max_input_chars:
                raise _bad("'%s[%d]' has %d characters: more than the limit of %d "
                           "(--max-input-chars)" % (param, i, len(s), cfg.max_input_chars),
                           param, 413)
            chars += len(s)
        prompt = self.prompt()
        texts = [prompt + s for s in items] if prompt else items
        tok = self._tokenizer(direction)
        try:
            if chars <= _INLINE_TOKENIZE_CHARS:
                encs = tok.encode_batch(texts)
            else:
                encs = await run_in_threadpool(tok.encode_batch, texts)
        except Exception as exc:  # noqa: BLE001 - e.g. lone surrogates
            raise _bad("cannot tokenize '%s': %s" % (param, exc), param, 422, "tokenizer")
        if not truncate:
            for i, e in enumerate(encs):
                if e.overflowing:
                    raise _too_long(param, i, "more tokens", limit)
        return encs, time.perf_counter() - t0


def _model_name(path: Optional[str]) -> str:
    """Name to report for a model directory (the packaged model: all-MiniLM-L6-v2)."""
    if not path:
        return "normcy"
    try:
        from normcy.sentence import default_model_path

        if os.path.samefile(path, default_model_path()):
            return "all-MiniLM-L6-v2"
    except (OSError, ImportError):
        pass
    return os.path.basename(os.path.normpath(path))


def _too_long(param: str, i: int, what: str, limit: int) -> APIError:
    return _bad("'%s[%d]' has %s than the model's limit of %d tokens (max_seq_length); "
                "shorten it or send \"truncate\": true to cut it as sentence-transformers does"
                % (param, i, what, limit), param, 413, code="context_length_exceeded")


# ------------------------------------------------------------------------ the routes
_WORK_ROUTES = {"/v1/embeddings", "/embed", "/tokenize"}
_OPEN_ROUTES = {"/health", "/metrics"}


def create_app(encoder=None, *, model: Optional[str] = None, num_threads: Optional[int] = None,
               loader: Optional[Callable[[], Any]] = None, config: Optional[ServeConfig] = None,
               on_load_error: Optional[Callable[[BaseException], None]] = None,
               **limits) -> Starlette:
    """Build the embedding service as an ASGI app (to run with uvicorn or mount).

    Parameters
    ----------
    encoder : normcy.SentenceEncoder, optional
        The model to serve. When omitted, ``SentenceEncoder.from_pretrained(model,
        num_threads=num_threads)`` runs in a thread at startup, and ``/health`` answers 503
        until it is loaded.
    model : str, optional
        Model directory to load when no ``encoder`` is given (default: the packaged
        all-MiniLM-L6-v2).
    num_threads : int, optional
        ``num_threads`` for the loader.
    loader : callable, optional
        Called without arguments in a thread at startup to make the encoder, instead of
        ``from_pretrained(model, ...)`` (for an encoder that is built differently).
    config : ServeConfig, optional
        Limits and options; keyword arguments (``max_batch_tokens=...``, ``api_key=...``,
        any :class:`ServeConfig` field) override its fields.
    on_load_error : callable, optional
        Called with the exception if loading the model fails (``normcy serve`` stops).

    Returns
    -------
    starlette.applications.Starlette
        Routes ``POST /v1/embeddings``, ``POST /embed``, ``POST /tokenize``,
        ``GET /v1/models``, ``GET /health``, ``GET /info``, ``GET /metrics``. The model is
        used only by the app's single compute thread; the batcher starts with the app's
        lifespan, so run it with lifespan events (uvicorn does by default).

    Examples
    --------
    >>> from normcy import SentenceEncoder
    >>> from normcy.serve import create_app
    >>> app = create_app(SentenceEncoder.from_pretrained(), max_batch_tokens=8192)  # doctest: +SKIP
    >>> # uvicorn.run(app, host="127.0.0.1", port=8080), or mount it in your own app
    """
    cfg = ServeConfig(**asdict(config)) if config is not None else ServeConfig()
    for k, v in limits.items():
        if not hasattr(cfg, k):
            raise TypeError("create_app() got an unexpected keyword argument %r" % k)
        setattr(cfg, k, v)
    cfg.validate()
    if encoder is not None and loader is not None:
        raise TypeError("give either an encoder or a loader, not both")
    if encoder is not None and cfg.max_batch_tokens < encoder.max_seq_length:
        raise ValueError("max_batch_tokens (%d) must be at least the model's max_seq_length "
                         "(%d)" % (cfg.max_batch_tokens, encoder.max_seq_length))
    if encoder is None and loader is None:
        def loader():
            from normcy.sentence import SentenceEncoder

            return SentenceEncoder.from_pretrained(model, num_threads=num_threads)
    metrics = Metrics()
    svc = _Service(encoder, loader, cfg, metrics, on_load_error)
    from normcy._version import __version__

    def endpoint(route: str, handler, openai_style: bool):
        protected = route not in _OPEN_ROUTES and cfg.api_key is not None
        limited = route in _WORK_ROUTES
        expected = cfg.api_key.encode("utf-8") if cfg.api_key else b""

        async def wrapped(request: Request) -> Response:
            t0 = time.perf_counter()
            ctx: Dict[str, Any] = {}
            counted = False
            try:
                if protected:
                    # the header's own bytes (Starlette decodes headers as latin-1); the
                    # scheme is case-insensitive (RFC 9110)
                    got = request.headers.get("authorization", "").encode("latin-1")
                    scheme, _, token = got.strip().partition(b" ")
                    if scheme.lower() != b"bearer" \
                            or not hmac.compare_digest(token.strip(), expected):
                        metrics.rejected.labels("unauthorized").inc()
                        raise APIError(401, "missing or invalid API key: send 'Authorization: "
                                       "Bearer <key>'", "unauthorized",
                                       code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"})
                if limited:
                    if svc.in_flight >= cfg.max_concurrent_requests:
                        metrics.rejected.labels("overloaded").inc()
                        raise APIError(429, "overloaded: %d requests in flight (the limit, "
                                       "--max-concurrent-requests); retry after %d s"
                                       % (svc.in_flight, cfg.retry_after), "overloaded",
                                       code="rate_limit_exceeded",
                                       headers={"Retry-After": str(cfg.retry_after)})
                    svc.in_flight += 1
                    metrics.in_flight.inc()
                    counted = True
                resp = await handler(request, ctx)
            except APIError as err:
                # OpenAI answers every malformed request with 400 (TEI: 422 for wrong types)
                status = 400 if openai_style and err.status == 422 else err.status
                resp = _JSONResponse(err.openai_body() if openai_style else err.tei_body(),
                                     status_code=status, headers=err.headers)
                ctx["error"] = err.message
            except ClientDisconnect:
                resp = Response(status_code=499)
                ctx["error"] = "client disconnected"
            except Exception as exc:  # noqa: BLE001 - a JSON 500, and the server goes on
                _log.exception("%s failed", route)
                err = APIError(424 if not openai_style else 500,
                               "internal error: %s: %s" % (type(exc).__name__, exc), "backend")
                resp = _JSONResponse(err.openai_body() if openai_style else err.tei_body(),
                                     status_code=err.status)
                ctx["error"] = err.message
            finally:
                if counted:
                    svc.in_flight -= 1
                    metrics.in_flight.dec()
            dt = time.perf_counter() - t0
            status = str(resp.status_code)
            metrics.requests.labels(route, status).inc()
            metrics.request_duration.labels(route).observe(dt)
            if "inputs" in ctx:
                _timing_headers(resp, ctx, dt)
            if _access.isEnabledFor(logging.INFO):
                _log_access(request, route, resp.status_code, dt, ctx)
            return resp

        return wrapped

    async def read_json(request: Request, param_hint: str) -> Dict[str, Any]:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > cfg.max_body_bytes:
            raise _bad("request body of %s bytes: more than the limit of %d (--max-body-bytes)"
                       % (cl, cfg.max_body_bytes), None, 413)
        async def receive_all() -> bytes:
            chunks = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise _bad("request body larger than the limit of %d bytes "
                               "(--max-body-bytes)" % cfg.max_body_bytes, None, 413)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(receive_all(), cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise _bad("request body not received within %g s (--body-timeout)"
                       % cfg.body_timeout_s, None, 408) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad("request body is not valid UTF-8 (byte %d)" % exc.start, None, 400)
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise _bad("request body is not valid JSON: %s" % exc, None, 400)
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object, got %s" % _json_type(body), None,
                       422)
        if param_hint not in body:
            raise _bad("'%s' is required" % param_hint, param_hint, 422)
        return body

    async def run_embedding(ctx, kind, items, *, truncate, param, normalize, dims,
                            direction="right"):
        svc.require_ready()
        encs, tok_s = await svc.encodings(kind, items, truncate=truncate, param=param,
                                          direction=direction)
        ntok = sum(len(e.ids) for e in encs)
        ctx.update(inputs=len(encs), tokens=ntok, tokenization_s=tok_s,
                   chars=sum(len(s) for s in items) if kind == "text" else 0)
        metrics.tokenization_duration.observe(tok_s)
        plen = svc.pool_prompt_length(kind)
        if plen and direction != "right" and any(e.overflowing for e in encs):
            # truncated from the left, an input loses the prompt that the pooling leaves out
            raise _bad("the model's pooling leaves its prompt out (include_prompt false); an "
                       "input truncated from the left would lose that prompt: send it shorter "
                       "or truncate from the right", param, 422)
        res = await svc.batcher.embed(encs, normalize=normalize, truncate_dim=dims,
                                      prompt_length=plen)
        ctx.update(queue_s=res.queue_s, inference_s=res.inference_s)
        metrics.queue_duration.observe(res.queue_s)
        metrics.inference_duration.observe(res.inference_s)
        metrics.tokens.inc(ntok)
        metrics.inputs.inc(len(encs))
        return res.embeddings, ntok

    # -- POST /v1/embeddings (OpenAI)
    async def openai_embeddings(request: Request, ctx) -> Response:
        body = await read_json(request, "input")
        kind, items = _parse_inputs(body["input"], "input")
        fmt = body.get("encoding_format")
        if fmt is None:
            fmt = "float"
        if fmt not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64', got %r" % (fmt,),
                       "encoding_format")
        for name in ("model", "user"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise _bad("'%s' must be a string" % name, name)
        dims = body.get("dimensions")
        svc.require_ready()
        if dims is not None:
            if not _is_int(dims) or not 1 <= dims <= svc.dim:
                raise _bad("'dimensions' must be an integer from 1 to %d (the model's "
                           "dimension), got %r" % (svc.dim, dims), "dimensions")
            if dims == svc.dim:
                dims = None
        truncate = _opt_bool(body, "truncate", True)
        emb, ntok = await run_embedding(ctx, kind, items, truncate=truncate, param="input",
                                        normalize=True, dims=dims)
        if fmt == "base64":
            vecs = [base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
                    for row in emb]
        else:
            vecs = list(emb)
        return _JSONResponse({
            "object": "list",
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(vecs)],
            "model": body.get("model") or cfg.model_id,
            "usage": {"prompt_tokens": ntok, "total_tokens": ntok},
        })

    # -- POST /embed (TEI)
    async def tei_embed(request: Request, ctx) -> Response:
        body = await read_json(request, "inputs")
        kind, items = _parse_inputs(body["inputs"], "inputs")
        normalize = _opt_bool(body, "normalize", True)
        truncate = _opt_bool(body, "truncate", True)
        direction = body.get("truncation_direction")
        if direction is None:
            direction = "right"
        if not isinstance(direction, str) or direction.lower() not in ("right", "left"):
            raise _bad("'truncation_direction' must be 'right' or 'left', got %r"
                       % (direction,), "truncation_direction", 422)
        if body.get("prompt_name") is not None:
            raise _bad("'prompt_name' is not supported: the model's default prompt, if any, "
                       "is applied", "prompt_name", 422)
        emb, _ = await run_embedding(ctx, kind, items, truncate=truncate, param="inputs",
                                     normalize=normalize, dims=None,
                                     direction=direction.lower())
        return _JSONResponse(emb)

    # -- POST /tokenize (TEI)
    async def tokenize(request: Request, ctx) -> Response:
        body = await read_json(request, "inputs")
        kind, items = _parse_inputs(body["inputs"], "inputs")
        if kind != "text":
            raise _bad("'inputs' must be a string or a list of strings", "inputs", 422)
        add_special = _opt_bool(body, "add_special_tokens", True)
        svc.require_ready()
        if len(items) > cfg.max_client_batch_size:
            raise _bad("%d inputs in one request: more than the limit of %d "
                       "(--max-client-batch-size)" % (len(items), cfg.max_client_batch_size),
                       "inputs", 413)
        for i, s in enumerate(items):
            if not s:
                raise _bad("'inputs[%d]' is an empty string; send at least one character" % i,
                           "inputs", 400, "empty")
            if len(s) > cfg.max_input_chars:
                raise _bad("'inputs[%d]' has %d characters: more than the limit of %d "
                           "(--max-input-chars)" % (i, len(s), cfg.max_input_chars),
                           "inputs", 413)
        t0 = time.perf_counter()
        try:
            encs = await run_in_threadpool(svc.untruncated_tokenizer().encode_batch, items,
                                           add_special_tokens=add_special)
        except Exception as exc:  # noqa: BLE001
            raise _bad("cannot tokenize 'inputs': %s" % exc, "inputs", 422, "tokenizer")
        out = []
        for s, e in zip(items, encs):
            toks = []
            for tid, text, special, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask,
                                                   e.offsets):
                toks.append({"id": tid, "text": text, "special": bool(special),
                             "start": None if special else a, "stop": None if special else b})
            out.append(toks)
        ctx.update(inputs=len(items), tokens=sum(len(e.ids) for e in encs),
                   chars=sum(len(s) for s in items), tokenization_s=time.perf_counter() - t0)
        return _JSONResponse(out)

    # -- GET routes
    async def health(request: Request, ctx) -> Response:
        if svc.state == "ready":
            return _JSONResponse({"status": "ok"})
        msg = {"loading": "the model is loading", "stopping": "shutting down",
               "failed": "the model failed to load"}[svc.state]
        return _JSONResponse({"status": svc.state, "error": msg, "error_type": "unhealthy"},
                             status_code=503)

    async def info(request: Request, ctx) -> Response:
        svc.require_ready()
        enc = svc.encoder
        return _JSONResponse({
            "model_id": cfg.model_id,
            "model_path": getattr(enc, "path", None),
            "model_dtype": "float32",
            "model_type": {"embedding": {"pooling": "+".join(enc.pooling_modes)}},
            "dimension": svc.dim,
            "max_input_length": enc.max_seq_length,
            "max_batch_tokens": cfg.max_batch_tokens,
            "max_client_batch_size": cfg.max_client_batch_size,
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_input_chars": cfg.max_input_chars,
            "max_body_bytes": cfg.max_body_bytes,
            "max_batch_wait_ms": cfg.max_batch_wait_ms,
            "auth": cfg.api_key is not None,
            "version": __version__,
            "backend": "normcy",
        })

    async def models(request: Request, ctx) -> Response:
        svc.require_ready()
        return _JSONResponse({"object": "list", "data": [
            {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "normcy"}]})

    async def metrics_route(request: Request, ctx) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v1/embeddings", endpoint("/v1/embeddings", openai_embeddings, True),
              methods=["POST"]),
        Route("/embeddings", endpoint("/v1/embeddings", openai_embeddings, True),
              methods=["POST"]),
        Route("/embed", endpoint("/embed", tei_embed, False), methods=["POST"]),
        Route("/tokenize", endpoint("/tokenize", tokenize, False), methods=["POST"]),
        Route("/v1/models", endpoint("/v1/models", models, True), methods=["GET"]),
        Route("/health", endpoint("/health", health, False), methods=["GET"]),
        Route("/info", endpoint("/info", info, False), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", metrics_route, False), methods=["GET"]),
    ]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await svc.startup()
        try:
            yield
        finally:
            await svc.shutdown()

    async def no_route(request: Request, exc) -> Response:
        # 404 / 405 (OPTIONS included) in the JSON shape of the route's dialect
        status = getattr(exc, "status_code", 404)
        path = request.url.path
        msg = ("no route %s" % path if status == 404
               else "method %s not allowed on %s" % (request.method, path))
        err = APIError(status, msg, "validation")
        openai_style = path.startswith("/v1/") or path == "/embeddings"
        return _JSONResponse(err.openai_body() if openai_style else err.tei_body(),
                             status_code=status, headers=getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: no_route, 405: no_route})
    app.state.normcy = svc
    return app


def _ms(s: float) -> str:
    return "%.3f" % (s * 1e3)


def _timing_headers(resp: Response, ctx: Dict[str, Any], total_s: float) -> None:
    """TEI's timing headers (milliseconds)."""
    h = resp.headers
    tok = ctx.get("tokenization_s", 0.0)
    q = ctx.get("queue_s", 0.0)
    inf = ctx.get("inference_s", 0.0)
    h["x-compute-type"] = "cpu"
    h["x-compute-characters"] = str(ctx.get("chars", 0))
    h["x-compute-tokens"] = str(ctx.get("tokens", 0))
    h["x-compute-time"] = _ms(tok + q + inf)
    h["x-tokenization-time"] = _ms(tok)
    h["x-queue-time"] = _ms(q)
    h["x-inference-time"] = _ms(inf)
    h["x-total-time"] = _ms(total_s)


def _log_access(request: Request, route: str, status: int, dt: float,
                ctx: Dict[str, Any]) -> None:
    client = request.client
    fields = {
        "client": "%s:%s" % (client.host, client.port) if client else None,
        "method": request.method,
        "path": request.url.path,
        "status": status,
        "duration_ms": round(dt * 1e3, 3),
    }
    for k in ("inputs", "tokens"):
        if k in ctx:
            fields[k] = ctx[k]
    for k in ("tokenization_s", "queue_s", "inference_s"):
        if k in ctx:
            fields[k[:-2] + "_ms"] = round(ctx[k] * 1e3, 3)
    if "error" in ctx:
        fields["error"] = ctx["error"]
    msg = '%s "%s %s" %d %s' % (fields["client"], fields["method"], fields["path"], status,
                                " ".join("%s=%s" % (k, fields[k]) for k in fields
                                         if k not in ("client", "method", "path", "status",
                                                      "error")))
    if "error" in fields:
        msg += " error=%r" % fields["error"]
    _access.info(msg, extra={"access": fields})

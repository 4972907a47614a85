"""``normcy serve``: the command line of the embedding service (runs the app on uvicorn).

Only argparse wiring is imported by ``normcy --help``; Starlette and uvicorn are imported
when the command runs.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.config
import os
import signal
import time

from normcy._embed_cmd import positive_int

__all__ = ["add_parser", "run", "JSONFormatter"]


def _port(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError("--port must be an integer, got %r" % s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError("--port must be in 0..65535, got %d" % v)
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``normcy`` command line's subparsers.

    Parameters
    ----------
    sub : argparse._SubParsersAction

    Returns
    -------
    argparse.ArgumentParser
    """
    from normcy.serve.config import ServeConfig

    d = ServeConfig()
    s = sub.add_parser(
        "serve", help="serve embeddings over HTTP (OpenAI- and TEI-compatible)",
        description="Serve sentence embeddings over HTTP: POST /v1/embeddings (OpenAI), "
                    "POST /embed and /tokenize (text-embeddings-inference), GET /v1/models, "
                    "/health, /info, /metrics (Prometheus). Concurrent requests are batched under a "
                    "token budget. Needs the serve extra: pip install '.[serve]' in the "
                    "checkout, or its packages by name.",
        epilog="example: normcy serve --port 8080, then curl 127.0.0.1:8080/embed "
               "-H 'Content-Type: application/json' -d '{\"inputs\": \"Hello\"}'")
    s.add_argument("-m", "--model", metavar="DIR", default=None,
                   help="sentence-transformers model directory (default: the packaged "
                        "all-MiniLM-L6-v2)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0: any)")
    s.add_argument("-t", "--threads", type=positive_int("--threads"), default=None, metavar="N",
                   help="threads for the model (default: normcy.get_num_threads())")
    for flag, what in (("--max-batch-tokens", "padded tokens per model batch"),
                       ("--max-client-batch-size", "most inputs per request"),
                       ("--max-concurrent-requests", "requests in flight before answering 429"),
                       ("--max-input-chars", "longest input string in characters"),
                       ("--max-body-bytes", "largest request body")):
        default = getattr(d, flag[2:].replace("-", "_"))
        s.add_argument(flag, type=positive_int(flag), default=default, metavar="N",
                       help="%s (default %d)" % (what, default))
    s.add_argument("--max-batch-wait-ms", type=float, default=d.max_batch_wait_ms,
                   metavar="MS", help="after a busy batch, wait up to this long (and at most "
                   "a tenth of that batch's time) for more requests to join the next one "
                   "(default %g; 0: never wait)" % d.max_batch_wait_ms)
    s.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="S",
                   help="seconds a request body may take to arrive before a 408 (default "
                        "%g): a stalled upload must not hold a request slot for ever"
                        % d.body_timeout_s)
    s.add_argument("--api-key", default=os.environ.get("NORMCY_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $NORMCY_API_KEY; "
                        "/health and /metrics stay open)")
    s.add_argument("--model-id", default=None, metavar="NAME",
                   help="model name in responses (default: the model directory's name)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text or as one JSON object each (default text)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info", help="default info (one access line per request)")
    s.add_argument("--no-access-log", action="store_true", help="no per-request log lines")
    s.set_defaults(func=run)
    return s


class JSONFormatter(logging.Formatter):
    """One JSON object per log record; access records carry their fields at top level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + ".%03dZ" % record.msecs,
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _log_config(fmt: str, level: str, access: bool) -> dict:
    formatter = ({"()": JSONFormatter} if fmt == "json" else
                 {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"})
    lvl = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "normcy.serve": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "normcy.serve.access": {"handlers": ["stderr"], "propagate": False,
                                    "level": "INFO" if access else "WARNING"},
        },
    }


class _BindErrors(logging.Filter):
    """Keeps the OSError that uvicorn logs when it cannot bind its address (it logs the
    exception object itself, then exits), so that the command can say why in one line."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, OSError):
            self.errors.append(record.msg)
        return True

    def reason(self) -> str:
        if not self.errors:
            return ""
        exc = self.errors[-1]
        if exc.errno is not None:
            what = os.strerror(exc.errno)
            if exc.errno == errno.EADDRINUSE:
                what += " (another server is listening on that port; choose another --port)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                what += " (not an address of this machine; check --host)"
            return what
        return str(exc)


def _check_max_batch_tokens(args) -> None:
    """Refuse (status 2, before the server starts) a --max-batch-tokens below the model's
    max_seq_length, which could not batch one input of the model's longest length.

    A model whose configuration cannot be read here is left to the loader, which reports
    it when the server starts.
    """
    from normcy.cli import CLIError
    from normcy.sentence import model_max_seq_length

    try:
        limit = model_max_seq_length(args.model)
    except (OSError, ValueError, TypeError):
        return
    if args.max_batch_tokens < limit:
        raise CLIError("--max-batch-tokens %d is less than the model's max_seq_length (%d): a "
                       "batch must hold at least one input of the longest length; use "
                       "--max-batch-tokens %d or more" % (args.max_batch_tokens, limit, limit))


def run(args, stdin, stdout, stderr) -> int:
    """Run ``normcy serve`` until SIGTERM/SIGINT; exit 0 after a graceful shutdown.

    Parameters
    ----------
    args : argparse.Namespace
    stdin, stdout, stderr : file-like

    Returns
    -------
    int
        0 after a graceful shutdown, 1 if the model could not be loaded or the server could
        not start (e.g. its port is taken).

    Raises
    ------
    normcy.cli.CLIError
        Status 2 for unusable options (a missing model directory, a --max-batch-tokens
        below the model's max_seq_length), checked before the server starts; status 1 when
        the server cannot start.
    """
    from normcy.cli import CLIError
    from normcy.serve import missing_dependencies

    missing = missing_dependencies()
    if missing:
        raise CLIError("missing dependencies %s: install the serve extra (pip install "
                       "'.[serve]' in the checkout) or these packages by name"
                       % ", ".join(missing))
    if args.model is not None and not os.path.isdir(args.model):
        raise CLIError("model directory %r does not exist" % args.model
                       if not os.path.exists(args.model)
                       else "model %r is not a directory" % args.model)
    if args.model is None:
        from normcy.sentence import default_model_path

        try:
            default_model_path()
        except FileNotFoundError as exc:
            raise CLIError(str(exc))

    _check_max_batch_tokens(args)

    import uvicorn

    import normcy
    from normcy.serve.app import create_app

    if args.threads is not None:
        normcy.set_num_threads(args.threads)
    logging.config.dictConfig(_log_config(args.log_format, args.log_level,
                                          not args.no_access_log))
    failed = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            svc = app.state.normcy
            if svc.state != "failed":
                svc.state = "stopping"      # /health answers 503 from now on
            super().handle_exit(sig, frame)

    def on_load_error(exc):
        failed.append(exc)
        server.should_exit = True

    try:
        app = create_app(model=args.model, num_threads=args.threads,
                         on_load_error=on_load_error,
                         max_batch_tokens=args.max_batch_tokens,
                         max_client_batch_size=args.max_client_batch_size,
                         max_concurrent_requests=args.max_concurrent_requests,
                         max_input_chars=args.max_input_chars,
                         max_body_bytes=args.max_body_bytes, api_key=args.api_key,
                         max_batch_wait_ms=args.max_batch_wait_ms,
                         body_timeout_s=args.body_timeout, model_id=args.model_id)
    except ValueError as exc:
        raise CLIError(str(exc))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            access_log=False, lifespan="on", server_header=False,
                            # idle keep-alive connections get more than uvicorn's 5 s
                            timeout_keep_alive=30)
    server = Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which would end the
    # process with the signal's status; these handlers (restored by uvicorn after serving)
    # absorb that re-raise, so a graceful shutdown exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    bind_errors = _BindErrors()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(bind_errors)
    try:
        server.run()
    except SystemExit:
        # uvicorn ends a failed start (an address in use, a host that is not this machine's,
        # a failed lifespan startup) with sys.exit(3): report it as normcy's status 1
        where = "[%s]:%d" % (args.host, args.port) if ":" in args.host \
            else "%s:%d" % (args.host, args.port)
        why = bind_errors.reason()
        raise CLIError("cannot listen on %s: %s" % (where, why) if why
                       else "the server could not start on %s (see the log above)" % where,
                       status=1)
    finally:
        uvicorn_log.removeFilter(bind_errors)
        for sig, h in previous.items():
            signal.signal(sig, h)
    if failed:
        return 1
    return 0 if server.started else 1

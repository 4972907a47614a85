"""Sentence embeddings over a Dask DataFrame.

Example
-------
>>> import dask.dataframe as dd
>>> from normcy.integrations.dask import embed
>>> ddf = dd.read_parquet("corpus.parquet")                  # doctest: +SKIP
>>> out = embed(ddf, text_column="text")                     # doctest: +SKIP
>>> out.to_parquet("embeddings/", schema=None)               # doctest: +SKIP

``schema=None``: each partition's own Parquet schema.  Dask's default (``"infer"``) builds the
schema from placeholder values of object columns, which an array-valued column such as the
embeddings cannot have (``ArrowInvalid: Could not convert <object object ...>``).
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["embed"]


def _embed_partition(df, encoder, text_column, output_column, batch_size, normalize):
    import numpy as np

    texts = df[text_column].tolist()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError("column %r, row %r: expected a string, got %s"
                            % (text_column, df.index[i], type(t).__name__))
    emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=normalize)
    out = df.copy()
    out[output_column] = list(np.asarray(emb, dtype=np.float32)) if len(texts) else []
    return out


def embed(ddf, model: Any = None, text_column: str = "text", output_column: str = "embedding",
          batch_size: int = 32, num_threads: Optional[int] = None,
          normalize_embeddings: bool = True, max_seq_length: Optional[int] = None):
    """Add an embedding column to a Dask DataFrame (lazily, with ``map_partitions``).

    The encoder is shipped to the workers by reference (its model directory and options)
    and loaded once per worker process, however many partitions it embeds.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    model : str, os.PathLike or SentenceEncoder, optional
        Model directory (default: the packaged all-MiniLM-L6-v2), or an encoder made by
        ``SentenceEncoder.from_pretrained``.
    text_column : str, default "text"
    output_column : str, default "embedding"
        New column: one float32 vector (a 1-D NumPy array) per row; other columns are kept.
    batch_size : int, default 32
    num_threads : int, optional
        Kernel threads of the encoder (default 1: one per Dask worker thread, so that a
        worker's threads do not oversubscribe its cores); only with a model directory.
    normalize_embeddings : bool, default True
        L2-normalize the output: ``SentenceEncoder.encode``'s argument, with
        sentence-transformers' meaning. ``False`` skips only this extra normalization: a
        model whose pipeline ends with a ``Normalize`` module (all-MiniLM-L6-v2 does) still
        returns unit vectors. For the raw pooled vectors (what ``normcy embed
        --no-normalize`` and TEI's ``"normalize": false`` give), pass an encoder whose
        module is off, with ``normalize_embeddings=False``::

            enc = SentenceEncoder.from_pretrained(model_dir)
            enc.normalize_module = False        # travels with the encoder to the workers
            out = embed(ddf, enc, normalize_embeddings=False)
    max_seq_length : int, optional
        Only with a model directory (an encoder object has its own).

    Returns
    -------
    dask.dataframe.DataFrame
        Write it to Parquet with ``to_parquet(path, schema=None)`` (see the module's
        docstring).
    """
    import pandas as pd

    from normcy._validate import as_int
    from normcy.sentence import SentenceEncoder

    batch_size = as_int(batch_size, "batch_size", minimum=1)

    if text_column not in ddf.columns:
        raise KeyError("no column %r in the DataFrame (columns: %s)"
                       % (text_column, list(ddf.columns)))
    if isinstance(model, SentenceEncoder):
        if num_threads is not None or max_seq_length is not None:
            raise TypeError("num_threads and max_seq_length apply to a model directory; an "
                            "encoder object has its own (set them when you load it)")
        enc = model
    else:
        # loaded here once to check the model; workers load their own copy from its path
        enc = SentenceEncoder.from_pretrained(
            model, num_threads=1 if num_threads is None else num_threads,
            max_seq_length=max_seq_length)
    meta = ddf._meta.copy()
    meta[output_column] = pd.Series([], dtype=object)
    return ddf.map_partitions(_embed_partition, enc, text_column, output_column,
                              batch_size, bool(normalize_embeddings), meta=meta)

"""Run normcy's :class:`~normcy.SentenceEncoder` on existing distributed engines.

- :mod:`normcy.integrations.ray`: :class:`~normcy.integrations.ray.Embedder`, a callable class
  for Ray Data's ``Dataset.map_batches`` (``pip install "normcy[ray]"``);
- :mod:`normcy.integrations.dask`: :func:`~normcy.integrations.dask.embed` over a Dask
  DataFrame (``pip install "normcy[dask]"``).

Both load the model once per worker process; the encoder travels by reference (its model
directory and options, see ``SentenceEncoder.__reduce__``), never as pickled weights.
"""

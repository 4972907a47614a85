"""Run normcy's :class:`~normcy.SentenceEncoder` on existing distributed engines.

- :mod:`normcy.integrations.ray`: :class:`~normcy.integrations.ray.Embedder`, a callable class
  for Ray Data's ``Dataset.map_batches`` (``pip install ".[ray]"`` in the checkout);
- :mod:`normcy.integrations.dask`: :func:`~normcy.integrations.dask.embed` over a Dask
  DataFrame (``pip install ".[dask]"`` in the checkout).

(normcy is installed from its source: there is no ``normcy[ray]`` on PyPI to refer to.)

Both load the model once per worker process; the encoder travels by reference (its model
directory and options, see ``SentenceEncoder.__reduce__``), never as pickled weights.
"""

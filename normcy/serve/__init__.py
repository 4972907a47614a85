"""``normcy serve``: an embedding service for OpenAI and text-embeddings-inference clients.

The app (:func:`create_app`) needs the ``serve`` extra (``pip install ".[serve]"`` in the
checkout: Starlette, uvicorn, prometheus_client, orjson); it is imported on first use, so that
``import normcy.serve`` and the ``normcy`` command line work without it.

Example
-------
>>> from normcy.serve import create_app                       # doctest: +SKIP
>>> app = create_app()              # loads the packaged all-MiniLM-L6-v2 at startup
>>> # uvicorn.run(app, host="127.0.0.1", port=8080)
"""
from __future__ import annotations

__all__ = ["create_app", "ServeConfig", "Batcher", "missing_dependencies"]

#: Import names of the ``serve`` extra's packages.
_EXTRA = ("starlette", "uvicorn", "prometheus_client", "orjson", "tokenizers")


def missing_dependencies():
    """The ``serve`` extra's packages that cannot be imported.

    Returns
    -------
    list of str
        Import names; empty when ``normcy serve`` can run.
    """
    import importlib.util

    return [m for m in _EXTRA if importlib.util.find_spec(m) is None]


def __getattr__(name):
    if name == "create_app":
        from normcy.serve.app import create_app

        return create_app
    if name == "ServeConfig":
        from normcy.serve.config import ServeConfig

        return ServeConfig
    if name == "Batcher":
        from normcy.serve.batcher import Batcher

        return Batcher
    raise AttributeError("module 'normcy.serve' has no attribute %r" % name)

"""Prometheus metrics of the embedding service (``GET /metrics``).

Every app gets its own :class:`prometheus_client.CollectorRegistry`, so that several apps
(tests, or a user's service mounting more than one) do not share counters.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

#: Latency buckets in seconds (1 ms .. 60 s).
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25,
                 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """The service's metrics, registered in a registry of their own.

    Parameters
    ----------
    registry : prometheus_client.CollectorRegistry, optional
        Where to register (default: a new registry).

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
    requests : Counter
        ``normcy_requests_total{route,status}``: finished requests.
    request_duration : Histogram
        ``normcy_request_duration_seconds{route}``: time from the request's start to its
        response.
    tokenization_duration, queue_duration, inference_duration : Histogram
        Per embedding request: tokenization, wait for the first batch, and compute
        (seconds).
    batch_inference_duration : Histogram
        Compute time of one batch.
    queue_depth : Gauge
        Sequences waiting for a batch.
    in_flight : Gauge
        Requests being handled (the quantity ``--max-concurrent-requests`` bounds).
    batch_sequences, batch_tokens : Histogram
        Size of each batch run, in sequences and in tokens (padding excluded).
    tokens, inputs : Counter
        Tokens and inputs embedded.
    rejected : Counter
        ``normcy_rejected_total{reason}``: requests refused before any work (overloaded,
        unauthorized, not ready).
    """

    def __init__(self, registry: CollectorRegistry = None):
        r = CollectorRegistry(auto_describe=True) if registry is None else registry
        self.registry = r
        self.requests = Counter("normcy_requests", "Finished HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram(
            "normcy_request_duration_seconds", "Request duration (receipt to response)",
            ["route"], buckets=_TIME_BUCKETS, registry=r)
        self.tokenization_duration = Histogram(
            "normcy_tokenization_duration_seconds", "Tokenization time per request",
            buckets=_TIME_BUCKETS, registry=r)
        self.queue_duration = Histogram(
            "normcy_queue_duration_seconds", "Wait from enqueueing to the first batch, per "
            "request", buckets=_TIME_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "normcy_inference_duration_seconds", "From the first batch's start to the last "
            "batch's end, per request", buckets=_TIME_BUCKETS, registry=r)
        self.batch_inference_duration = Histogram(
            "normcy_batch_inference_duration_seconds", "Compute time of one batch",
            buckets=_TIME_BUCKETS, registry=r)
        self.queue_depth = Gauge("normcy_queue_depth", "Sequences waiting for a batch",
                                 registry=r)
        self.in_flight = Gauge("normcy_requests_in_flight", "Requests being handled",
                               registry=r)
        self.batch_sequences = Histogram("normcy_batch_size_sequences",
                                         "Sequences per batch", buckets=_SEQ_BUCKETS,
                                         registry=r)
        self.batch_tokens = Histogram("normcy_batch_size_tokens",
                                      "Tokens per batch (padding excluded)",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.tokens = Counter("normcy_tokens", "Tokens embedded", registry=r)
        self.inputs = Counter("normcy_inputs", "Inputs (sequences) embedded", registry=r)
        self.rejected = Counter("normcy_rejected", "Requests refused before any work",
                                ["reason"], registry=r)

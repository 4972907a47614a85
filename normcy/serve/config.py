"""Limits and options of the embedding service (no third-party imports)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    """Limits and options of the service (the ``normcy serve`` flags).

    Attributes
    ----------
    max_batch_tokens : int, default 16384
        Budget of one model batch in padded tokens; at least the model's
        ``max_seq_length``.
    max_client_batch_size : int, default 2048
        Most inputs in one request.
    max_concurrent_requests : int, default 512
        Most embedding/tokenize requests in flight; more are answered 429 with
        ``Retry-After``.
    max_input_chars : int, default 100000
        Longest input string accepted (before tokenization; longer inputs get 413).
    max_body_bytes : int, default 16 MiB
        Largest request body accepted (413 beyond).
    api_key : str, optional
        When set, every route but ``/health`` and ``/metrics`` needs
        ``Authorization: Bearer <api_key>``.
    model_id : str, optional
        Name reported in responses and ``/info`` (default: the model directory's name).
    retry_after : int, default 1
        Seconds in the ``Retry-After`` header of a 429.
    max_batch_wait_ms : float, default 5.0
        Longest wait for more inputs before a batch that follows a busy one (see
        :class:`normcy.serve.batcher.Batcher`); 0 disables it.
    body_timeout_s : float, default 30.0
        Longest time a request's body may take to arrive (408 beyond): a client that
        stalls mid-upload would otherwise hold one of the ``max_concurrent_requests``
        slots, and a graceful shutdown would wait for it, for ever.
    """

    max_batch_tokens: int = 16384
    max_client_batch_size: int = 2048
    max_concurrent_requests: int = 512
    max_input_chars: int = 100_000
    max_body_bytes: int = 16 << 20
    api_key: Optional[str] = None
    model_id: Optional[str] = None
    retry_after: int = 1
    max_batch_wait_ms: float = 5.0
    body_timeout_s: float = 30.0

    def validate(self) -> None:
        """Raise ValueError for a limit that is not a positive integer."""
        for name in ("max_batch_tokens", "max_client_batch_size", "max_concurrent_requests",
                     "max_input_chars", "max_body_bytes", "retry_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError("%s must be a positive integer, got %r" % (name, v))
        w = self.max_batch_wait_ms
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1000:
            raise ValueError("max_batch_wait_ms must be a number from 0 to 1000, got %r" % (w,))
        t = self.body_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
            raise ValueError("body_timeout_s must be a number of seconds in (0, 3600], got %r"
                             % (t,))
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")

"""Dynamic batching: the inputs of concurrent requests run together, off the event loop.

Requests hand over tokenized inputs (:meth:`Batcher.embed`); a scheduler task on the event
loop gathers everything waiting into a *round* (when the previous round has just ended,
after a moment's wait for requests on their way: ``max_batch_wait``), sorts the round's
sequences by length (longest first, as ``SentenceEncoder.encode`` does), cuts it into
batches whose padded size (sequences x longest sequence) stays within ``max_batch_tokens``,
and runs the batches one after the other on a single compute thread. Requests that arrive meanwhile
wait for the next round, so every accepted sequence runs within two rounds (no
starvation) and the event loop keeps serving HTTP while the model computes.

The embeddings come from :meth:`normcy.SentenceEncoder.encode_tokens`, ``encode``'s own
path after tokenization, on the encodings the server made already (nothing is tokenized
twice, and token-id inputs take the same path as text). Without normalization a batch runs
through a shallow copy of the encoder with its ``Normalize`` module off; the copy shares the
model, its workspaces and its lock with the original.
"""
from __future__ import annotations

import asyncio
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Batcher", "Tokens", "EmbedResult"]


class Tokens(NamedTuple):
    """One input as the model sees it (what a ``tokenizers.Encoding`` provides)."""

    ids: Sequence[int]
    type_ids: Sequence[int]


class EmbedResult(NamedTuple):
    """Rows for one request, with its timings in seconds."""

    embeddings: np.ndarray
    queue_s: float
    inference_s: float


class _Job:
    __slots__ = ("encodings", "key", "future", "out", "remaining", "t_enqueued", "t_start",
                 "t_end")

    def __init__(self, encodings, key, future, dim):
        self.encodings = encodings
        self.key = key
        self.future = future
        self.out = np.empty((len(encodings), dim), dtype=np.float32)
        self.remaining = len(encodings)
        self.t_enqueued = time.perf_counter()
        self.t_start = None
        self.t_end = None


class Batcher:
    """Merge the inputs of concurrent requests into token-budgeted batches.

    Parameters
    ----------
    encoder : normcy.SentenceEncoder
        The model; used only through :meth:`~normcy.SentenceEncoder.encode_tokens`.
    max_batch_tokens : int
        Budget of one batch in padded tokens (sequences x longest sequence). A sequence
        longer than the budget still runs, alone.
    metrics : normcy.serve.metrics.Metrics, optional
        Where to record queue depth and batch sizes.
    max_batch_wait : float, default 0.005
        When a round ends with requests already waiting, the next round starts after
        giving the clients just answered a moment to send their next requests: it waits
        while new inputs keep arriving (in 0.5 ms steps, at least 1 ms), at most this many
        seconds and at most a tenth of the last round's compute time, and never beyond the
        token budget of one batch. A request arriving at an idle batcher never waits.
        0 disables it.

    Notes
    -----
    Create it and call :meth:`embed` from the same running event loop; :meth:`close` stops
    the scheduler after the work already accepted is done.
    """

    def __init__(self, encoder, max_batch_tokens: int, metrics=None,
                 max_batch_wait: float = 0.005):
        if int(max_batch_tokens) < 1:
            raise ValueError("max_batch_tokens must be >= 1, got %r" % (max_batch_tokens,))
        if not max_batch_wait >= 0:
            raise ValueError("max_batch_wait must be >= 0, got %r" % (max_batch_wait,))
        self.encoder = encoder
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_wait = float(max_batch_wait)
        self.metrics = metrics
        dim = encoder.get_sentence_embedding_dimension()
        if dim is None:
            raise ValueError("the encoder's embedding dimension is unknown (a SentenceEncoder "
                             "made without hidden_size=): the service needs it")
        self.dim = int(dim)
        self._pending: List[Tuple[_Job, int, int]] = []   # (job, row, length)
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="normcy-compute")
        self.batches_run = 0

    # ----------------------------------------------------------------- public
    def start(self) -> None:
        """Start the scheduler task on the running event loop (idempotent)."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule())

    async def embed(self, encodings: Sequence[Any], *, normalize: bool = True,
                    truncate_dim: Optional[int] = None, prompt_length: int = 0) -> EmbedResult:
        """Embed tokenized inputs; returns when all of their rows are computed.

        Parameters
        ----------
        encodings : sequence
            Objects with ``ids`` and ``type_ids`` (``tokenizers.Encoding`` or
            :class:`Tokens`), already truncated to the model's limit.
        normalize : bool, default True
            ``normalize_embeddings`` of ``encode``; False also skips the model's own
            ``Normalize`` module (the raw pooled vector, as TEI's ``normalize: false``).
        truncate_dim : int, optional
            ``encode``'s ``truncate_dim`` (truncate, then normalize when ``normalize``).
        prompt_length : int, default 0
            The leading positions of each input that a prompt takes, left out of the pooling
            when the model's ``include_prompt`` is False
            (:meth:`~normcy.SentenceEncoder.encode_tokens`).

        Returns
        -------
        EmbedResult
        """
        if self._closing:
            raise RuntimeError("the batcher is shut down")
        self.start()
        fut = asyncio.get_running_loop().create_future()
        n = len(encodings)
        if n == 0:
            return EmbedResult(np.empty((0, truncate_dim or self.dim), dtype=np.float32),
                               0.0, 0.0)
        job = _Job(encodings, (bool(normalize), truncate_dim, int(prompt_length)), fut,
                   truncate_dim or self.dim)
        for i, e in enumerate(encodings):
            self._pending.append((job, i, len(e.ids)))
        if self.metrics is not None:
            self.metrics.queue_depth.inc(n)
        self._wakeup.set()
        await fut
        return EmbedResult(job.out, job.t_start - job.t_enqueued, job.t_end - job.t_start)

    async def close(self) -> None:
        """Finish the accepted work, then stop the scheduler and the compute thread."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
            self._task = None
        self._pool.shutdown(wait=True)

    # ---------------------------------------------------------------- private
    def plan(self, items: List[Tuple[_Job, int, int]]) -> List[List[Tuple[_Job, int, int]]]:
        """Cut one round into batches: same options together, longest first, under budget.

        Parameters
        ----------
        items : list of (job, row, length)

        Returns
        -------
        list of lists of (job, row, length)
        """
        groups: Dict[Any, List[Tuple[_Job, int, int]]] = {}
        for it in items:
            groups.setdefault(it[0].key, []).append(it)
        batches = []
        for group in groups.values():
            group.sort(key=lambda it: -it[2])          # stable: arrival order within a length
            cur: List[Tuple[_Job, int, int]] = []
            longest = 0
            for it in group:
                if cur and (len(cur) + 1) * longest > self.max_batch_tokens:
                    batches.append(cur)
                    cur = []
                if not cur:
                    longest = max(it[2], 1)
                cur.append(it)
            if cur:
                batches.append(cur)
        return batches

    def _compute(self, batch, key) -> np.ndarray:
        normalize, truncate_dim, prompt_length = key
        enc = self.encoder
        if not normalize and enc.normalize_module:
            enc = copy.copy(enc)
            enc.normalize_module = False
        n = len(batch)
        return enc.encode_tokens([job.encodings[row] for job, row, _ in batch],
                                 prompt_length=prompt_length, batch_size=n,
                                 normalize_embeddings=normalize, truncate_dim=truncate_dim)

    async def _gather(self, last_round_s: float) -> None:
        """Let inputs on their way join the waiting ones (see ``max_batch_wait``)."""
        cap = min(self.max_batch_wait, 0.1 * last_round_s)
        t0 = time.perf_counter()
        n = len(self._pending)
        while not self._closing:
            longest = max(it[2] for it in self._pending)
            left = cap - (time.perf_counter() - t0)
            if left <= 0 or len(self._pending) * longest >= self.max_batch_tokens:
                return
            await asyncio.sleep(min(0.0005, left))
            if len(self._pending) == n and time.perf_counter() - t0 >= 0.001:
                return
            n = len(self._pending)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.metrics
        last_round_s = 0.0
        while True:
            if not self._pending:
                last_round_s = 0.0
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            if last_round_s > 0 and self.max_batch_wait > 0:
                await self._gather(last_round_s)
            round_items, self._pending = self._pending, []
            t_round = time.perf_counter()
            for batch in self.plan(round_items):
                key = batch[0][0].key
                t0 = time.perf_counter()
                for job, _, _ in batch:
                    if job.t_start is None:
                        job.t_start = t0
                if m is not None:
                    m.queue_depth.dec(len(batch))
                try:
                    emb = await loop.run_in_executor(self._pool, self._compute, batch, key)
                except Exception as exc:  # noqa: BLE001 - handed to every request concerned
                    for job, _, _ in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                t1 = time.perf_counter()
                self.batches_run += 1
                if m is not None:
                    m.batch_inference_duration.observe(t1 - t0)
                    m.batch_sequences.observe(len(batch))
                    m.batch_tokens.observe(sum(it[2] for it in batch))
                for j, (job, row, _) in enumerate(batch):
                    job.out[row] = emb[j]
                    job.remaining -= 1
                    if job.remaining == 0:
                        job.t_end = t1
                        if not job.future.done():
                            job.future.set_result(None)
            last_round_s = time.perf_counter() - t_round

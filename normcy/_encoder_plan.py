"""Workspaces and attention planning for the encoder (package-internal).

- :class:`Workspace`: named, grow-only float32 buffers, lent to one call at a time by a
  :class:`WorkspacePool`, so that a model object may be called from many threads;
- :class:`AttentionPlan`: how the rows of a (tokens, d_model) matrix form sequences and which
  masks apply; :func:`padded_plan` builds it for a padded (batch, seq) input and validates
  the masks; :func:`packed_plan` packs the real tokens of a padded batch (no masks needed:
  :class:`normcy.BertModel`, and the layers' ``skip_padding``).

Used by :mod:`normcy.transformer` and :mod:`normcy.bert`; the layers themselves live in
:mod:`normcy.transformer`.
"""
import numpy as np

from normcy._validate import base_array, refuse_masked

__all__ = ["Workspace", "WorkspacePool", "AttentionPlan", "padded_plan", "packed_plan",
           "key_padding_2d", "dead_rows"]

_F32 = np.float32


def _capacity(n):
    """Buffer size for n floats: the next of 2^k, 1.5 * 2^k (at least 1024).

    Grow-only buffers sized exactly to the largest request so far are reallocated every
    time a batch is a little larger than all before it (a corpus's longest batch creeps up
    with its size); with these steps a buffer is reallocated O(log) times, and since only
    touched pages count in the resident set, the headroom costs address space, not memory.
    """
    c = 1024
    while c < n:
        if c + c // 2 >= n:
            return c + c // 2
        c *= 2
    return c


class Workspace:
    """Named, grow-only float32 buffers handed out as reshaped views (one call at a time)."""

    __slots__ = ("_bufs", "gen")

    def __init__(self, gen=0):
        self._bufs = {}
        self.gen = gen

    def get(self, name, shape):
        n = 1
        for s in shape:
            n *= s
        buf = self._bufs.get(name)
        if buf is None or buf.size < n:
            buf = np.empty(_capacity(n), dtype=_F32)
            self._bufs[name] = buf
        return buf[:n].reshape(shape)

    def nbytes(self):
        return sum(b.nbytes for b in self._bufs.values())


class WorkspacePool:
    """Workspaces lent to calls: a call takes one (the most recently returned, or a new one)
    and gives it back when done, so a model called from many threads holds as many
    workspaces as calls ever ran at the same time, not one per thread that ever called it
    (a 40-thread web server pool calling one model in turn would otherwise keep 40 sets of
    the largest batch's buffers).  Taking and returning are single list operations, atomic
    under the GIL: no lock (nothing to be left held in a forked child).  A copy or an
    unpickled pool starts empty: the buffers are a cache, not state."""

    __slots__ = ("_free", "_gen")

    def __init__(self):
        self._free = []
        self._gen = 0

    def acquire(self):
        try:
            return self._free.pop()
        except IndexError:
            return Workspace(self._gen)

    def release(self, ws):
        if ws.gen == self._gen:          # not made before a clear()
            self._free.append(ws)

    def clear(self):
        """Drop the cached buffers (those of calls running now are dropped when they end)."""
        self._gen += 1
        self._free = []

    def idle(self):
        """The workspaces not lent out now (for tests and diagnostics)."""
        return list(self._free)

    def __reduce__(self):
        return (WorkspacePool, ())


class AttentionPlan:
    """How the tokens of a (rows, d_model) matrix form sequences for attention.

    ``groups`` is a list of (row_offset, n_seq, seq_len): ``n_seq`` consecutive sequences of
    ``seq_len`` tokens each starting at ``row_offset``.  ``kpm`` / ``mask`` apply to a single
    group covering every row (the padded (batch, seq) layout).  ``dead`` lists the rows
    whose every key is masked: softmax gives them zero weights, so their attention output is
    zero (PyTorch's scaled_dot_product_attention does the same); the layer removes the value
    bias it folded into the output bias from those rows.
    """

    __slots__ = ("groups", "kpm", "mask", "is_causal", "dead")

    def __init__(self, groups, kpm=None, mask=None, is_causal=False, dead=None):
        self.groups = groups
        self.kpm = kpm
        self.mask = mask
        self.is_causal = is_causal
        # rows whose every key is masked (their attention output is zero), or None
        self.dead = dead


def key_padding_2d(key_padding_mask, b, s, unbatched):
    """A key padding mask as a (b, s) ndarray (an unbatched call's (s,) one gets a batch
    axis); TypeError / ValueError naming it otherwise.  Its dtype is the caller's to check."""
    k = key_padding_mask
    refuse_masked(k, "key_padding_mask")
    if not isinstance(k, np.ndarray):
        raise TypeError("key_padding_mask must be a numpy.ndarray of bool, got %s"
                        % type(k).__name__)
    k = base_array(k)       # a subclass (np.matrix, ...) is used as its buffer
    shape = k.shape
    if unbatched and k.ndim == 1:
        k = k[None]
    if k.shape != (b, s):
        raise ValueError("key_padding_mask must have shape %s (batch, seq), got %s"
                         % ((s,) if unbatched else (b, s), tuple(shape)))
    return k


def padded_plan(b, s, key_padding_mask, attn_mask, is_causal, unbatched):
    kpm = None
    mask = None
    if key_padding_mask is not None:
        k = key_padding_2d(key_padding_mask, b, s, unbatched)
        if k.dtype == np.bool_:
            kpm = k
        elif k.dtype.kind == "f":
            mask = k.astype(_F32)[:, None, None, :]
        else:
            raise TypeError("key_padding_mask must have dtype bool (True = padding) or be an "
                            "additive float mask, got dtype %s" % k.dtype)
    if attn_mask is not None:
        m = attn_mask
        refuse_masked(m, "attn_mask")
        if not isinstance(m, np.ndarray):
            raise TypeError("attn_mask must be a numpy.ndarray, got %s" % type(m).__name__)
        m = base_array(m)
        if m.shape != (s, s):
            raise ValueError("attn_mask must have shape (seq, seq) = %s, got %s"
                             % ((s, s), tuple(m.shape)))
        if m.dtype == np.bool_:
            m = np.where(m, np.float32(-np.inf), np.float32(0.0))
        elif m.dtype.kind == "f":
            m = m.astype(_F32)
        else:
            raise TypeError("attn_mask must be a float (additive) or bool mask, got dtype %s"
                            % m.dtype)
        mask = m if mask is None else mask + m
    is_causal = bool(is_causal)
    dead = dead_rows(b, s, kpm, mask, is_causal)
    return AttentionPlan([(0, b, s)], kpm=kpm, mask=mask, is_causal=is_causal, dead=dead)


def dead_rows(b, s, kpm, mask, is_causal):
    """Flat (batch*seq) indices of the queries whose every key is masked, or None."""
    if kpm is None and mask is None:
        return None            # a causal mask alone always leaves the diagonal
    if mask is None:
        if is_causal:
            dead = np.logical_and.accumulate(kpm, axis=1)
        else:
            dead = np.broadcast_to(kpm.all(axis=1)[:, None], (b, s))
    else:
        m = np.isneginf(mask)
        if m.ndim == 4:
            m = m[:, 0]                                    # (b, 1 or s, s)
        blocked = np.broadcast_to(m, (b, s, s)).copy()
        if kpm is not None:
            blocked |= kpm[:, None, :]
        if is_causal:
            blocked |= np.triu(np.ones((s, s), dtype=bool), 1)
        dead = blocked.all(axis=-1)
    idx = np.flatnonzero(dead)
    return idx if idx.size else None


def packed_plan(real, is_causal=False):
    """Pack the real tokens of a padded (batch, seq) batch.

    ``real`` is a (B, S) bool array, True for a real token (any pattern: right or left
    padding, holes).  The real tokens of each sequence keep their order and attend only to
    each other, which is what a key padding mask asks of them (a causal mask too: the
    packed order is the original order); padded positions are not computed.  Sequences are
    taken shortest first (stable), so that sequences of one length form one group.

    Returns ``(b_idx, col, plan)``: packed row r is token (b_idx[r], col[r]); ``plan`` is
    the :class:`AttentionPlan` of the packed rows.  ``b_idx`` is None when every token is
    real (then row r is (r // S, r % S)).
    """
    B, S = real.shape
    if real.all():
        lengths = np.full(B, S, dtype=np.int64)
        order = np.arange(B)
        b_idx = col = None
    else:
        lengths = real.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        flat = np.flatnonzero(real[order])
        b_idx = order[flat // S]
        col = flat % S
    groups = []
    off = 0
    sl = lengths[order]
    i = 0
    while i < B:
        L = int(sl[i])
        j = i
        while j < B and sl[j] == L:
            j += 1
        if L:
            groups.append((off, j - i, L))
            off += (j - i) * L
        i = j
    return b_idx, col, AttentionPlan(groups, is_causal=bool(is_causal))

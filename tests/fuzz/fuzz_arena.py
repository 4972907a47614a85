"""Guarded array allocation for the fuzzer.

Every array a fuzz call receives is a view into a larger, randomly filled base buffer.  After
the call the arena checks, byte for byte, that nothing outside the elements the call may
write (its outputs) changed -- and, if the call raised, that nothing changed at all.  This
catches out-of-bounds and stray writes without a sanitizer build (which catches the reads).
"""
import numpy as np

F32 = np.float32

# Layouts of a view over its base buffer.  The same function applied to an index array tells
# which base elements the view covers.
LAYOUTS = ("c", "c", "c", "offset", "cols2", "rows2", "neg", "transpose", "pad")


def _base_shape(shape, layout):
    shape = tuple(shape)
    nd = len(shape)
    if layout == "cols2" and nd:
        return shape[:-1] + (2 * shape[-1],)
    if layout == "rows2" and nd >= 2:
        return shape[:-2] + (2 * shape[-2], shape[-1])
    if layout == "pad" and nd:
        return shape[:-1] + (shape[-1] + 3,)
    if layout == "transpose" and nd >= 2:
        return shape[::-1]
    return shape


def _apply(base, shape, layout):
    nd = len(shape)
    if layout == "cols2" and nd:
        return base[..., ::2]
    if layout == "rows2" and nd >= 2:
        return base[..., ::2, :]
    if layout == "pad" and nd:
        return base[..., :shape[-1]]
    if layout == "transpose" and nd >= 2:
        return base.T
    if layout == "neg" and nd:
        return base[..., ::-1]
    return base


class Arena:
    GUARD = 5   # elements of guard before and after every view's extent

    def __init__(self, rng):
        self.rng = rng
        self.bufs = []          # [flat base buffer, snapshot bytes, writable mask or None]

    def array(self, shape, dtype=F32, layout="c", scale=1.0, writable=False, values=None):
        """A view of `shape` and `dtype` laid out as `layout` inside a guarded buffer."""
        dtype = np.dtype(dtype)
        bshape = _base_shape(shape, layout)
        n = int(np.prod(bshape, dtype=np.int64))
        off = 1 if layout == "offset" else 0
        total = n + off + 2 * self.GUARD
        if dtype.kind == "f":
            flat = (self.rng.standard_normal(total) * scale).astype(dtype)
        elif dtype.kind == "c":
            flat = (self.rng.standard_normal(total) + 1j).astype(dtype)
        elif dtype.kind == "b":
            flat = self.rng.random(total) < 0.3
        elif dtype.kind in "iu":
            flat = self.rng.integers(0, 5, total).astype(dtype)
        else:
            flat = np.array([str(v) for v in range(total)], dtype=dtype)
        start = self.GUARD + off
        base = flat[start:start + n].reshape(bshape)
        view = _apply(base, shape, layout)
        assert view.shape == tuple(shape), (view.shape, shape, layout)
        if values is not None:
            view[...] = values
        mask = None
        if writable:
            idx = np.arange(total)[start:start + n].reshape(bshape)
            mask = np.zeros(total, bool)
            mask[_apply(idx, shape, layout).ravel()] = True
        self.bufs.append([flat, None, mask])
        return view

    def unaligned_f32(self, shape, writable=False):
        """A float32 view that is not 4-byte aligned."""
        n = int(np.prod(shape, dtype=np.int64))
        raw = self.rng.integers(0, 256, 4 * n + 8 + 2 * self.GUARD * 4).astype(np.uint8)
        start = 4 * self.GUARD + 1
        raw[start:start + 4 * n] = np.frombuffer(
            self.rng.standard_normal(n).astype(F32).tobytes(), np.uint8)
        view = raw[start:start + 4 * n].view(F32).reshape(shape)
        mask = None
        if writable:
            mask = np.zeros(raw.size, bool)
            mask[start:start + 4 * n] = True
        self.bufs.append([raw, None, mask])
        return view

    def snapshot(self):
        for entry in self.bufs:
            entry[1] = entry[0].tobytes()

    def changed(self, allow_writes):
        """Descriptions of forbidden changes ([] if none)."""
        bad = []
        for k, entry in enumerate(self.bufs):
            flat, snap, mask = entry[0], entry[1], entry[2]
            now = np.frombuffer(flat.tobytes(), np.uint8)
            was = np.frombuffer(snap, np.uint8)
            diff = now != was
            if not diff.any():
                continue
            elem = diff.reshape(-1, flat.itemsize).any(axis=1)
            forbidden = elem & ~mask if (allow_writes and mask is not None) else elem
            if forbidden.any():
                where = np.flatnonzero(forbidden)
                bad.append("buffer %d (%d elements, dtype %s): %d forbidden changes at %s"
                           % (k, flat.size, flat.dtype, where.size, where[:8].tolist()))
        return bad

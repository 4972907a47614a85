"""What a misaligned array costs normcy's row kernels on this CPU.

NumPy returns 16-byte-aligned buffers (large ones start 16 bytes past a page), so with
64-byte AVX-512 vectors every unpeeled vector access splits a cache line, and with 32-byte
AVX2 vectors every other one does.  This script times each kernel on arrays whose data
start on a 64-byte boundary and on the same arrays shifted by 16 bytes, interleaved in one
process (medians of repeated blocks), and prints the ratio.  It exists because a Xeon
(AVX-512) ran layer_norm / rms_norm 1.4-1.8x slower after a change that dropped the
aligned-store peel of one loop, while an AMD EPYC (AVX2) did not notice.

    python bench/align_check.py [--threads 1,16] [--reps 15]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import normcy  # noqa: E402


def buffer(shape, offset_bytes):
    """A float32 array of `shape` whose data start `offset_bytes` past a 64-byte boundary."""
    n = int(np.prod(shape))
    raw = np.empty(n + 32, np.float32)
    skip = (-raw.ctypes.data % 64) // 4 + offset_bytes // 4
    return raw[skip:skip + n].reshape(shape)


def cases(shape, offset, nt):
    rng = np.random.default_rng(0)
    x = buffer(shape, offset)
    x[...] = rng.standard_normal(shape)
    r = buffer(shape, offset)
    r[...] = rng.standard_normal(shape)
    y = buffer(shape, offset)
    h = shape[-1]
    w = rng.standard_normal(h).astype(np.float32)
    b = rng.standard_normal(h).astype(np.float32)
    zeros, ones = np.zeros(h, np.float32), np.ones(h, np.float32)
    return {
        "layer_norm": lambda: normcy.layer_norm(x, w, b, out=y, num_threads=nt),
        "rms_norm": lambda: normcy.rms_norm(x, w, out=y, num_threads=nt),
        "add_layer_norm": lambda: normcy.add_layer_norm(x, r, w, b, out=y, num_threads=nt),
        "batch_norm NHWC": lambda: normcy.batch_norm(x, zeros, ones, w, b, axis=-1, out=y,
                                                     num_threads=nt),
        "gelu": lambda: normcy.gelu(x, out=y, num_threads=nt),
        "softmax": lambda: normcy.softmax(x, out=y, num_threads=nt),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,%d" % (os.cpu_count() or 1))
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args()
    from normcy import _norms   # the compiled module's package-level isa_info(), as bench/run.py
    info = _norms.isa_info()
    print("kernel variant: %s (%s)" % (info["name"], info["detail"]))
    print("| kernel | shape | T | 64-byte aligned µs | +16 bytes µs | misaligned / aligned |")
    print("|---|---|---|---|---|---|")
    for shape in ((32, 384), (4096, 768)):
        for nt in [int(t) for t in a.threads.split(",")]:
            runs = {off: cases(shape, off, nt) for off in (0, 16)}
            inner = max(1, int(2e5 // int(np.prod(shape))))
            times = {}
            for _ in range(a.reps):
                for off, fs in runs.items():
                    for k, f in fs.items():
                        f()
                        t0 = time.perf_counter_ns()
                        for _ in range(inner):
                            f()
                        times.setdefault((k, off), []).append(
                            (time.perf_counter_ns() - t0) / inner / 1e3)
            for k in runs[0]:
                m0, m16 = np.median(times[(k, 0)]), np.median(times[(k, 16)])
                print("| %s | %dx%d | %d | %.2f | %.2f | %.2f |"
                      % (k, shape[0], shape[1], nt, m0, m16, m16 / m0))


if __name__ == "__main__":
    main()

"""In-process A/B of normcy's element-wise kernels between builds.

    python bench/ab_builds.py [--kernel gelu|softmax|gemm|layers|norms] [--reps 30]
                              [--shapes MxNxK,... | BxL,...] [--threads 1,2]
                              NAME=DIR [NAME=DIR ...]

Each DIR is a checkout built in place (``python setup.py build_ext --inplace``); its
``normcy/_ops`` extension (``normcy/_gemm`` for --kernel gemm and layers, ``normcy/_norms`` for
norms) is loaded into this one
process beside the others (under another module name), and the builds are called in
alternating order, so that they share the machine's slow and fast phases (process-by-process
comparisons on a shared VM swing by 10% and more between identical builds).  Prints, per
case, each build's median time per element (GEMM: per call) and the median of its
per-repeat ratios to the first build (> 1: faster), and whether the builds' outputs are
bit-identical.  Cases: 64 x 1536 in cache at 1 thread, 4096 x 1536 at 2 threads (GELU);
12 x 128 x 128 at 1 and 2 threads (softmax); for the GEMM, ``PackedLinear(W, b)`` calls
with ``out=`` on the --shapes (default 4096x384x384,4096x1536x384,4096x384x1536,1x384x1536)
at each of --threads; for the layers, a stack of six MiniLM-sized encoder layers (d_model
384, 12 heads, feed-forward 1536, exact GELU, post-LN; random weights) run as one compiled
call (``EncoderLayerKernel`` and ``run_layers`` of each build's
``_gemm``) on batch x sequence-length --shapes (default 1x16,1x128,8x128,32x128); for the
norms, each build's ``layer_norm``, ``rms_norm`` and ``add_layer_norm`` (``out=``) on NxH
--shapes (default 16384x1024,8192x2048,4096x4096,2048x8192: 64 MB, streamed), GB/s per call
(8 bytes per element, 12 with the add).

Limitation: only the named extension is loaded per build.  What it imports from normcy's
other compiled modules (``_gemm`` takes its row norms from ``normcy._norms`` and its thread
policy from ``normcy._parallel``) comes from the one normcy on the path, for every build:
an A/B of a change to the norm kernels through --kernel gemm or layers compares nothing.
Run such changes as separate processes (``bench/run.py`` per build) instead.
"""
import argparse
import glob
import importlib.machinery
import importlib.util
import time

import numpy as np

import normcy  # noqa: F401  (the extensions import normcy's Python modules)


def load(tag, d, ext="_ops"):
    paths = glob.glob(d + "/normcy/%s.cpython*.so" % ext) + glob.glob(d + "/normcy/%s*.pyd" % ext)
    if not paths:
        raise SystemExit("%s: no built normcy/%s extension (build it in place first)" % (d, ext))
    name = "ab_%s.%s" % (tag, ext)
    loader = importlib.machinery.ExtensionFileLoader(name, paths[0])
    spec = importlib.util.spec_from_file_location(name, paths[0], loader=loader)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=["gelu", "softmax", "gemm", "layers", "norms"],
                    default="gelu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("builds", nargs="+", metavar="NAME=DIR")
    a = ap.parse_args()
    mods = {}
    for b in a.builds:
        tag, _, d = b.partition("=")
        if not d:
            raise SystemExit("expected NAME=DIR, got %r" % b)
        mods[tag] = load(tag, d, "_gemm" if a.kernel in ("gemm", "layers")
                         else "_norms" if a.kernel == "norms" else "_ops")
    rng = np.random.default_rng(0)
    if a.kernel == "gemm":
        a.shapes = a.shapes or "4096x384x384,4096x1536x384,4096x384x1536,1x384x1536"
        gemm_ab(mods, a, rng)
        return
    if a.kernel == "layers":
        a.shapes = a.shapes or "1x16,1x128,8x128,32x128"
        layers_ab(mods, a, rng)
        return
    if a.kernel == "norms":
        a.shapes = a.shapes or "16384x1024,8192x2048,4096x4096,2048x8192"
        norms_ab(mods, a, rng)
        return
    cases = ([((64, 1536), 30, 1), ((4096, 1536), 2, 2)] if a.kernel == "gelu"
             else [((12, 128, 128), 30, 1), ((12, 128, 128), 30, 2)])
    for shape, inner, T in cases:
        x = (rng.standard_normal(shape) * 2).astype(np.float32)
        y = np.empty_like(x)
        calls = {t: (lambda f=getattr(m, a.kernel): f(x, out=y, num_threads=T))
                 for t, m in mods.items()}
        res = alternate(calls, a.reps, inner, x.size)
        report("%s %s, %d thread%s" % (a.kernel, "x".join(map(str, shape)), T, "s"[:T > 1]),
               res, "%.3f ns/el")


def alternate(calls, reps, inner, per):
    """Time each build's call (calls: {name: f}), the builds alternating in reversed order
    every other repeat so that they share the machine's phases: per repeat, one untimed
    call then `inner` timed ones; {name: [ns per call / per, ...]}."""
    res = {t: [] for t in calls}
    for rep in range(reps):
        order = list(calls.items())
        if rep % 2:
            order = order[::-1]
        for t, f in order:
            f()
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                f()
            res[t].append((time.perf_counter_ns() - t0) / inner / per)
    return res


def report(label, res, fmt, same=None):
    """One line: each build's median, and the median of its per-repeat ratios to the first
    build (> 1: faster); with same, whether the outputs were bit-identical."""
    base = np.array(next(iter(res.values())))
    print(label + ": "
          + "  ".join(("%s " + fmt + " (x%.3f)") % (t, np.median(v), np.median(base / np.array(v)))
                      for t, v in res.items())
          + ("" if same is None else "  (same bits)" if same else "  (BITS DIFFER)"))


def gemm_ab(mods, a, rng):
    """The GEMM case of main: each build's PackedLinear on the same x, W, b, alternated."""
    for spec in a.shapes.split(","):
        M, N, K = (int(v) for v in spec.lower().split("x"))
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32)
        bias = rng.standard_normal(N, dtype=np.float32)
        lins = {t: m.PackedLinear(w, bias) for t, m in mods.items()}
        outs = {t: lin(x) for t, lin in lins.items()}
        first = next(iter(outs.values()))
        same = all(np.array_equal(first, o) for o in outs.values())
        y = np.empty((M, N), np.float32)
        inner = max(3, int(2e8 / (2 * M * N * K)))
        for T in (int(v) for v in a.threads.split(",")):
            calls = {t: (lambda lin=lin: lin(x, out=y, num_threads=T))
                     for t, lin in lins.items()}
            warm_up(lambda: [f() for f in calls.values()])
            res = alternate(calls, a.reps, inner, 1e3)
            report("gemm %dx%dx%d, %d thread%s" % (M, N, K, T, "s"[:T > 1]), res, "%.1f us",
                   same)


def norms_ab(mods, a, rng):
    """The norms case of main: each build's layer_norm, rms_norm and add_layer_norm on the
    same arrays, alternated; reported in GB/s (ns per call are not comparable across
    shapes), the x column the ratio of per-repeat times as elsewhere."""
    for spec in a.shapes.split(","):
        N, H = (int(v) for v in spec.lower().split("x"))
        x = rng.standard_normal((N, H), dtype=np.float32)
        r = rng.standard_normal((N, H), dtype=np.float32)
        w = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        b = (0.1 * rng.standard_normal(H)).astype(np.float32)
        ys = {t: np.empty_like(x) for t in mods}
        ops = {"layer_norm": (lambda m, y, T: m.layer_norm(x, w, b, out=y, num_threads=T), 8),
               "rms_norm": (lambda m, y, T: m.rms_norm(x, w, out=y, num_threads=T), 8),
               "add_layer_norm": (lambda m, y, T: m.add_layer_norm(x, r, w, b, out=y,
                                                                   num_threads=T), 12)}
        for name, (op, per_el) in ops.items():
            outs = [op(m, ys[t], 1).copy() for t, m in mods.items()]
            same = all(np.array_equal(outs[0], o) for o in outs)
            for T in (int(v) for v in a.threads.split(",")):
                calls = {t: (lambda m=m, y=ys[t]: op(m, y, T)) for t, m in mods.items()}
                warm_up(lambda: [f() for f in calls.values()])
                res = alternate(calls, a.reps, 3, 1.0)
                gbs = {t: [per_el * x.size / v for v in vs] for t, vs in res.items()}
                base = np.array(next(iter(res.values())))
                print("%s %dx%d, %d thread%s: " % (name, N, H, T, "s"[:T > 1])
                      + "  ".join("%s %.1f GB/s (x%.3f)" % (t, np.median(g),
                                                           np.median(base / np.array(res[t])))
                                  for t, g in gbs.items())
                      + ("  (same bits)" if same else "  (BITS DIFFER)"), flush=True)


def warm_up(f, seconds=0.3):
    """~0.3 s of calls before timing: on the AMD EPYC Zen 5 VM, two-thread calls right
    after one-thread work ran as if on one core (64x384x384: 157 us per call for a whole
    10-repeat run, against 39 us with this warm-up): its host puts a lightly loaded VM's
    two vCPUs on one physical core, and spreads them again only after a stretch of load
    (a pure OpenMP C loop shows the same)."""
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        f()


def layers_ab(mods, a, rng):
    """The layers case of main: each build's six-layer stack on the same x, alternated."""
    d, f, h, nl = 384, 1536, 12, 6

    def lin(n, k):
        return (rng.standard_normal((n, k), dtype=np.float32) / float(np.sqrt(k)),
                rng.standard_normal(n, dtype=np.float32) * 0.1)

    layers = []
    for _ in range(nl):
        ws = [lin(3 * d, d), lin(d, d), lin(f, d), lin(d, f)]
        norms = [(1 + 0.1 * rng.standard_normal(d, dtype=np.float32),
                  0.1 * rng.standard_normal(d, dtype=np.float32)) for _ in range(2)]
        layers.append((ws, norms))
    stacks = {}
    for t, m in mods.items():
        ks = []
        for ws, norms in layers:
            pl = [m.PackedLinear(w, None if i == 0 else b) for i, (w, b) in enumerate(ws)]
            ks.append(m.EncoderLayerKernel(pl[0], ws[0][1][:d], pl[1], pl[2], pl[3],
                                           norms[0], norms[1], 1e-12, "layer", "gelu",
                                           False, h))
        stacks[t] = (m, ks)
    for spec in a.shapes.split(","):
        B, L = (int(v) for v in spec.lower().split("x"))
        M = B * L
        x = rng.standard_normal((M, d), dtype=np.float32)
        bufs = dict(qkv=np.empty((M, 3 * d), np.float32), ctx=np.empty((M, d), np.float32),
                    mid=np.empty((M, d), np.float32), hid=np.empty((M, f), np.float32))
        outs = [np.empty((M, d), np.float32) for _ in range(2)]
        chain = [outs[i % 2] for i in range(nl)]
        groups = [(0, B, L)]

        def run(t, T):
            m, ks = stacks[t]
            return m.run_layers(ks, x, chain, bufs["qkv"], bufs["ctx"], bufs["mid"],
                                bufs["hid"], groups, T)

        first = None
        same = True
        for t in stacks:
            r = run(t, 1).copy()
            same = same and (first is None or np.array_equal(first, r))
            first = r if first is None else first
        inner = max(1, int(2e8 / (2 * M * nl * d * (4 * d + 2 * f))))
        for T in (int(v) for v in a.threads.split(",")):
            calls = {t: (lambda t=t: run(t, T)) for t in stacks}
            warm_up(lambda: [f() for f in calls.values()])
            res = alternate(calls, a.reps, inner, 1e3)
            report("layers %dx%d (6 x d384), %d thread%s" % (B, L, T, "s"[:T > 1]), res,
                   "%.1f us", same)


if __name__ == "__main__":
    main()

"""In-process A/B of normcy's element-wise kernels between builds.

    python bench/ab_builds.py [--kernel gelu|softmax] [--reps 30] NAME=DIR [NAME=DIR ...]

Each DIR is a checkout built in place (``python setup.py build_ext --inplace``); its
``normcy/_ops`` extension is loaded into this one process beside the others (under
another module name), and the builds are called in alternating order, so that they share
the machine's slow and fast phases (process-by-process comparisons on a shared VM swing by
10% and more between identical builds).  Prints, per case, each build's median time per
element and the median of its per-repeat ratios to the first build (> 1: faster).
Cases: 64 x 1536 in cache at 1 thread, 4096 x 1536 at 2 threads (GELU); 12 x 128 x 128 at
1 and 2 threads (softmax).
"""
import argparse
import glob
import importlib.machinery
import importlib.util
import time

import numpy as np

import normcy  # noqa: F401  (the extensions import normcy's Python modules)


def load(tag, d):
    paths = glob.glob(d + "/normcy/_ops.cpython*.so") + glob.glob(d + "/normcy/_ops*.pyd")
    if not paths:
        raise SystemExit("%s: no built normcy/_ops extension (build it in place first)" % d)
    name = "ab_%s._ops" % tag
    loader = importlib.machinery.ExtensionFileLoader(name, paths[0])
    spec = importlib.util.spec_from_file_location(name, paths[0], loader=loader)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=["gelu", "softmax"], default="gelu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("builds", nargs="+", metavar="NAME=DIR")
    a = ap.parse_args()
    mods = {}
    for b in a.builds:
        tag, _, d = b.partition("=")
        if not d:
            raise SystemExit("expected NAME=DIR, got %r" % b)
        mods[tag] = load(tag, d)
    rng = np.random.default_rng(0)
    cases = ([((64, 1536), 30, 1), ((4096, 1536), 2, 2)] if a.kernel == "gelu"
             else [((12, 128, 128), 30, 1), ((12, 128, 128), 30, 2)])
    for shape, inner, T in cases:
        x = (rng.standard_normal(shape) * 2).astype(np.float32)
        y = np.empty_like(x)
        res = {t: [] for t in mods}
        for rep in range(a.reps):
            order = list(mods.items())
            if rep % 2:
                order = order[::-1]
            for t, m in order:
                f = getattr(m, a.kernel)
                f(x, out=y, num_threads=T)
                t0 = time.perf_counter_ns()
                for _ in range(inner):
                    f(x, out=y, num_threads=T)
                res[t].append((time.perf_counter_ns() - t0) / inner / x.size)
        base = np.array(res[next(iter(mods))])
        print("%s %s, %d thread%s: " % (a.kernel, "x".join(map(str, shape)), T, "s"[:T > 1])
              + "  ".join("%s %.3f ns/el (x%.3f)" % (t, np.median(v), np.median(base / np.array(v)))
                          for t, v in res.items()))


if __name__ == "__main__":
    main()

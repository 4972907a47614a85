"""Make the constants of the exact GELU in nc_ops_kern.h (nco_gelu_c1_step / c2_step).

Development tool, not part of the package at run time (needs NumPy and SciPy):

    python normcy/src/fit_gelu.py

erfc(z) = t Q(t) exp(-z^2), t = 1 / (1 + z/2), z = |x| / sqrt(2): Q(t) = erfcx(z) / t is
fitted by a degree-8 polynomial in t over |x| <= 13.2, minimax in relative terms (Lawson's
iteratively reweighted least squares on Chebyshev nodes), and its float32 coefficients are
rounded one at a time from the highest degree down, the lower ones refitted after each
rounding.  The kernel evaluates Q by Horner in th = t / 2, so it takes c_k 2^k (exact).
2^r on [-1/2, 1/2] is fitted the same way by a degree-6 polynomial.  NCO_GELU_T is the
largest float32 |x| for which the kernel's exponent RN(RN(x * c) * x), c = RN(-log2(e)/2),
is at least -125.
"""
import numpy as np
from scipy.special import erfcx

F32 = np.float32
LOG2E = 1.4426950408889634


def lawson(V, f, fixed, iters=100):
    """Relative minimax fit of f by V @ c with the coefficients in `fixed` held."""
    free = [j for j in range(V.shape[1]) if j not in fixed]
    g = f - sum(V[:, j] * v for j, v in fixed.items())
    w = np.ones(len(f))
    inv = 1 / np.abs(f)
    for _ in range(iters):
        sw = inv * np.sqrt(w)
        c, *_ = np.linalg.lstsq(V[:, free] * sw[:, None], g * sw, rcond=None)
        e = np.abs((V[:, free] @ c - g) * inv)
        w = w * e
        w /= w.sum()
    full = np.zeros(V.shape[1])
    full[free] = c
    for j, v in fixed.items():
        full[j] = v
    return full


def fit_rounded(x, f, deg):
    V = np.vander(x, deg + 1, increasing=True)
    fixed = {}
    c = lawson(V, f, fixed)
    for j in range(deg, -1, -1):
        fixed[j] = float(F32(c[j]))
        if len(fixed) <= deg:
            c = lawson(V, f, fixed)
    c = np.array([fixed[j] for j in range(deg + 1)])
    return c, float(np.max(np.abs(V @ c / f - 1)))


def cheb(lo, hi, n=8000):
    k = np.arange(n)
    return (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / n)


def main():
    a, xmax = 0.5, 13.2
    tt = cheb(1 / (1 + a * xmax / np.sqrt(2)), 1.0)
    z = (1 / tt - 1) / a
    q, eq = fit_rounded(tt, erfcx(z) / tt, 8)
    cth = q * 2.0 ** np.arange(9)                  # coefficients in th = t / 2 (exact)
    print("Q(t): relative error %.2g with float32 coefficients" % eq)
    print("c[9] (in th, highest first) =", ", ".join("%.9ef" % v for v in cth[::-1]))
    r = cheb(-0.5, 0.5)
    e, ee = fit_rounded(r, 2.0 ** r, 6)
    print("2^r: relative error %.2g with float32 coefficients" % ee)
    print("e[7] (highest first) =", ", ".join("%.9ef" % v for v in e[::-1]))
    c = F32(-LOG2E / 2)
    xs = np.arange(F32(13.0).view(np.int32), F32(13.5).view(np.int32), dtype=np.int32).view(F32)
    p = ((xs * c).astype(np.float64) * xs).astype(F32)
    print("exponent constant %sf, NCO_GELU_T = %sf" % (repr(float(c)), repr(float(xs[p >= -125].max()))))


if __name__ == "__main__":
    main()

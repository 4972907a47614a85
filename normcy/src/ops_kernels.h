/*
 * normcy element-wise / row kernels for the Transformer block: masked + scaled softmax,
 * exact (erf) GELU, tanh-approximation GELU, ReLU, fused bias + activation (+ residual).
 *
 * float32, explicit SIMD through GCC/Clang vector extensions (16 lanes), no intrinsics and
 * no -ffast-math.  Portable builds compile every row kernel three times (x86-64-v4 =
 * AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) with GCC's target_clones; the dynamic
 * loader picks the widest variant once (an ifunc).  Tails shorter than one vector go
 * through the same vector code on a padded copy, so every element of a row is computed by
 * the same instruction sequence (results do not depend on position or thread count).
 *
 * Numerics (measured against float64 references over dense grids, see tests/test_ops.py)
 * ------------------------------------------------------------------------------------
 * nc_ops_exp   : Cody-Waite range reduction + Cephes degree-6 polynomial, scaling by
 *                2^n in two normal factors; max relative error 1.4 ulp (8.3e-8 measured)
 *                for x in [-86.5, 88.72]; x < -86.5 -> +0 (true value < 2.7e-38: no
 *                subnormal is ever formed, they cost ~100-cycle microcode assists);
 *                x > 88.72 -> +inf; NaN -> NaN.
 * GELU (erf)   : x * Phi(x) with Phi(x) = 1 - erfc(z)/2 (x >= 0) or erfc(z)/2 (x < 0),
 *                z = |x|/sqrt(2), erfc from the Chebyshev-fitted formula
 *                erfc(z) = t exp(-z^2 + P(t)), t = 1/(1 + z/2) (fractional error of the
 *                formula < 1.2e-7 for every z >= 0).  No cancellation for negative x:
 *                relative error <= 4e-7 * max(5, x^2/2) (measured: 1.4e-7 for x > 0,
 *                5e-7 on [-2, 0], 1.7e-6 at x = -4, 7e-6 at x = -10 where |GELU| = 8e-23);
 *                the growth is the float32 rounding of the exponent -z^2.
 * GELU (tanh)  : 0.5 x (1 + tanh(u)) rewritten exactly as x / (1 + exp(-2u)),
 *                u = sqrt(2/pi) (x + 0.044715 x^3); no cancellation: relative error
 *                <= 4e-7 * max(5, 2|u|) (1.2e-7 for x > 0, 1.2e-6 at x = -4).
 * softmax      : max-subtracted, float32 lane sums (16 partial sums then a fixed-order
 *                reduction), multiply by the reciprocal of the sum: relative error
 *                <= 1e-6 + 1e-9 n, plus the inherent 6e-8 |logit| of rounding the scaled
 *                logits to float32.
 *                Positions masked out (bool mask, causal, or additive -inf) give exactly 0;
 *                a row with every position masked gives all zeros (never NaN).  A NaN in
 *                an unmasked position makes its row NaN; nothing leaks into other rows.
 */
#ifndef NC_OPS_KERNELS_H
#define NC_OPS_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* the vector helpers are always inlined: no ABI is crossed (silence GCC's note, which
 * it emits at the end of the translation unit, hence no push/pop) */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef ptrdiff_t nco_int;

typedef float nco_vf __attribute__((vector_size(64)));
typedef int32_t nco_vi __attribute__((vector_size(64)));
typedef uint8_t nco_vb __attribute__((vector_size(16)));

#define NCO_W 16

#include "nc_dispatch.h"
#define NCO_TC NC_TC
#define NCO_HAVE_CLONES NC_HAVE_CLONES

#define NCO_INLINE static inline __attribute__((always_inline))

#define nc_ops_isa nc_isa

/* ------------------------------------------------------------------ vector helpers */
NCO_INLINE nco_vf nco_ld(const float *p) { nco_vf v; memcpy(&v, p, sizeof v); return v; }
NCO_INLINE void nco_st(float *p, nco_vf v) { memcpy(p, &v, sizeof v); }
NCO_INLINE nco_vf nco_splat(float a) { return (nco_vf){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
NCO_INLINE nco_vi nco_splati(int32_t a) { return (nco_vi){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
/* m lanes are all-ones (-1) or zero */
NCO_INLINE nco_vf nco_sel(nco_vi m, nco_vf a, nco_vf b)
{
    return (nco_vf)(((nco_vi)a & m) | ((nco_vi)b & ~m));
}
NCO_INLINE nco_vf nco_abs(nco_vf a) { return (nco_vf)((nco_vi)a & nco_splati(0x7fffffff)); }
NCO_INLINE nco_vf nco_max(nco_vf a, nco_vf b) { return nco_sel(a > b, a, b); }
/* horizontal reductions as a fixed shuffle tree (same order on every ISA) */
NCO_INLINE nco_vf nco_swap8(nco_vf a)
{
    return __builtin_shuffle(a, (nco_vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
}
NCO_INLINE nco_vf nco_swap4(nco_vf a)
{
    return __builtin_shuffle(a, (nco_vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
}
NCO_INLINE nco_vf nco_swap2(nco_vf a)
{
    return __builtin_shuffle(a, (nco_vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
}
NCO_INLINE nco_vf nco_swap1(nco_vf a)
{
    return __builtin_shuffle(a, (nco_vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
}
NCO_INLINE float nco_hmax(nco_vf a)
{
    a = nco_max(a, nco_swap8(a));
    a = nco_max(a, nco_swap4(a));
    a = nco_max(a, nco_swap2(a));
    a = nco_max(a, nco_swap1(a));
    return a[0];
}
NCO_INLINE float nco_hsum(nco_vf a)
{
    a = a + nco_swap8(a);
    a = a + nco_swap4(a);
    a = a + nco_swap2(a);
    a = a + nco_swap1(a);
    return a[0];
}
/* 16 bytes -> 16 int32 lanes, all-ones where the byte is non-zero (two widening steps:
 * GCC lowers a direct u8 -> i32 conversion to scalar code) */
typedef uint16_t nco_vh __attribute__((vector_size(32)));
NCO_INLINE nco_vi nco_bytes_nonzero(const uint8_t *p)
{
    nco_vb b;
    memcpy(&b, p, sizeof b);
    nco_vh h = __builtin_convertvector(b, nco_vh);
    return __builtin_convertvector(h, nco_vi) != nco_splati(0);
}

/* exp(x), see the header comment for accuracy.  No operation ever sees or makes a subnormal
 * (those take microcode assists costing ~100 cycles each on x86): arguments below
 * NCO_EXP_LO give +0 (the true value is < 2.7e-38 there). */
#define NCO_EXP_LO (-86.5f)
/* exp(xc) for xc already clamped to [NCO_EXP_LO, 88.72], before the final scaling:
 * Cody-Waite reduction by ln 2 and a degree-6 polynomial; returns y in [0.7, 1.42] and sets
 * *ni = n with exp(xc) = y 2^n, n in [-125, 128].  Shared by nco_exp and nco_exp_nonpos,
 * which differ only in how they apply 2^n (both exactly: every product is normal), so the
 * two give the same bits wherever both are defined. */
NCO_INLINE nco_vf nco_exp_reduced(nco_vf xc, nco_vi *ni)
{
    /* n = round(x / ln 2) with the 1.5*2^23 trick (exact for |t| < 2^22) */
    const nco_vf magic = nco_splat(12582912.0f);
    nco_vf t = xc * nco_splat(1.44269504088896341f);
    nco_vf n = (t + magic) - magic;
    nco_vf r = xc - n * nco_splat(0.693359375f);
    r = r - n * nco_splat(-2.12194440e-4f);
    nco_vf p = nco_splat(1.9875691500E-4f);
    p = p * r + nco_splat(1.3981999507E-3f);
    p = p * r + nco_splat(8.3334519073E-3f);
    p = p * r + nco_splat(4.1665795894E-2f);
    p = p * r + nco_splat(1.6666665459E-1f);
    p = p * r + nco_splat(5.0000001201E-1f);
    *ni = __builtin_convertvector(n, nco_vi);
    return p * (r * r) + r + nco_splat(1.0f);
}

NCO_INLINE nco_vf nco_exp(nco_vf x)
{
    const nco_vf lo = nco_splat(NCO_EXP_LO), hi = nco_splat(88.7228394f);
    nco_vi under = x < lo, over = x > hi;
    nco_vi ni;
    nco_vf y = nco_exp_reduced(nco_sel(under, lo, nco_sel(over, hi, x)), &ni);
    /* 2^n as two normal factors (2^128 alone would be inf) */
    nco_vi n1 = ni >> 1;
    nco_vi n2 = ni - n1;
    y = (y * (nco_vf)((n1 + 127) << 23)) * (nco_vf)((n2 + 127) << 23);
    y = nco_sel(under, nco_splat(0.0f), y);
    y = nco_sel(over, nco_splat(INFINITY), y);
    /* NaN in -> NaN out (the clamps above compare false for NaN, keep it explicit) */
    return nco_sel(x != x, x, y);
}

/* exp(x) for x <= 1 (or -inf / NaN), as in softmax after the max subtraction and in the
 * erfc of GELU: the same results as nco_exp on that domain, minus the overflow handling.
 * n <= 1 here, so 2^n is one normal factor (n >= -125).  NaN propagates through the
 * arithmetic (y = NaN * 2^garbage = NaN). */
NCO_INLINE nco_vf nco_exp_nonpos(nco_vf x)
{
    const nco_vf lo = nco_splat(NCO_EXP_LO);
    nco_vi under = x < lo;
    nco_vi ni;
    nco_vf y = nco_exp_reduced(nco_sel(under, lo, x), &ni);
    y = y * (nco_vf)((ni + 127) << 23);
    return nco_sel(under, nco_splat(0.0f), y);
}

/* Phi(x) * x, exact-erf GELU */
NCO_INLINE nco_vf nco_gelu_erf(nco_vf x)
{
    nco_vf z = nco_abs(x) * nco_splat(0.70710678118654752f);
    nco_vf t = nco_splat(1.0f) / (nco_splat(1.0f) + nco_splat(0.5f) * z);
    nco_vf p = nco_splat(0.17087277f);
    p = p * t + nco_splat(-0.82215223f);
    p = p * t + nco_splat(1.48851587f);
    p = p * t + nco_splat(-1.13520398f);
    p = p * t + nco_splat(0.27886807f);
    p = p * t + nco_splat(-0.18628806f);
    p = p * t + nco_splat(0.09678418f);
    p = p * t + nco_splat(0.37409196f);
    p = p * t + nco_splat(1.00002368f);
    p = p * t + nco_splat(-1.26551223f);
    /* the exponent is <= 3e-8 (P(1) - 0), NaN only for NaN x: nco_exp_nonpos applies */
    nco_vf half_erfc = nco_splat(0.5f) * t * nco_exp_nonpos(p - z * z);
    nco_vi neg = x < nco_splat(0.0f);
    nco_vf phi = nco_sel(neg, half_erfc, nco_splat(1.0f) - half_erfc);
    nco_vf y = x * phi;
    /* -inf * 0 would be NaN; the limit is -0 */
    return nco_sel(x == nco_splat(-INFINITY), nco_splat(-0.0f), y);
}

/* x / (1 + exp(-2u)) == 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3) */
NCO_INLINE nco_vf nco_gelu_tanh(nco_vf x)
{
    nco_vf x3 = x * x * x;
    nco_vf u2 = nco_splat(-1.5957691216057308f) * (x + nco_splat(0.044715f) * x3);
    nco_vf y = x / (nco_splat(1.0f) + nco_exp(u2));
    return nco_sel(x == nco_splat(-INFINITY), nco_splat(-0.0f), y);
}

NCO_INLINE nco_vf nco_relu(nco_vf x)
{
    /* NaN stays NaN (the compare is false) */
    return nco_sel(x < nco_splat(0.0f), nco_splat(0.0f), x);
}

enum { NCO_ACT_IDENTITY = 0, NCO_ACT_RELU = 1, NCO_ACT_GELU = 2, NCO_ACT_GELU_TANH = 3 };

NCO_INLINE nco_vf nco_apply_act(nco_vf v, int act)
{
    switch (act) {
    case NCO_ACT_RELU: return nco_relu(v);
    case NCO_ACT_GELU: return nco_gelu_erf(v);
    case NCO_ACT_GELU_TANH: return nco_gelu_tanh(v);
    default: return v;
    }
}

/* ------------------------------------------------------------------ row kernels */

/*
 * out[j] = act(x[j] (+ bias[j])) (+ res[j]) for j < n.  All pointers unit stride;
 * bias/res may be NULL; out may equal x or res.
 */
#define NCO_ACT_LOOP(ACT)                                                              \
    do {                                                                               \
        for (; j + NCO_W <= n; j += NCO_W) {                                           \
            nco_vf v = nco_ld(x + j);                                                  \
            if (bias) v = v + nco_ld(bias + j);                                        \
            v = ACT(v);                                                                \
            if (res) v = v + nco_ld(res + j);                                          \
            nco_st(out + j, v);                                                        \
        }                                                                              \
        if (j < n) {                                                                   \
            float tx[NCO_W] = {0}, tb[NCO_W] = {0}, tr[NCO_W] = {0};                   \
            nco_int m = n - j;                                                         \
            memcpy(tx, x + j, m * sizeof(float));                                      \
            if (bias) memcpy(tb, bias + j, m * sizeof(float));                         \
            if (res) memcpy(tr, res + j, m * sizeof(float));                           \
            nco_vf v = nco_ld(tx);                                                     \
            if (bias) v = v + nco_ld(tb);                                              \
            v = ACT(v);                                                                \
            if (res) v = v + nco_ld(tr);                                               \
            nco_st(tx, v);                                                             \
            memcpy(out + j, tx, m * sizeof(float));                                    \
        }                                                                              \
    } while (0)

#define NCO_ID(v) (v)

NCO_TC static void nc_ops_act_row(const float *x, const float *bias, const float *res,
                                  float *out, nco_int n, int act)
{
    nco_int j = 0;
    switch (act) {
    case NCO_ACT_RELU: NCO_ACT_LOOP(nco_relu); break;
    case NCO_ACT_GELU: NCO_ACT_LOOP(nco_gelu_erf); break;
    case NCO_ACT_GELU_TANH: NCO_ACT_LOOP(nco_gelu_tanh); break;
    default: NCO_ACT_LOOP(NCO_ID); break;
    }
}

/* plain exp over a row (exposed for tests of the polynomial) */
NCO_TC static void nc_ops_exp_row(const float *x, float *out, nco_int n)
{
    const float *bias = NULL, *res = NULL;
    nco_int j = 0;
    NCO_ACT_LOOP(nco_exp);
}

/*
 * Softmax of one row of length n (unit stride), in place allowed (out == x):
 *   v[j] = x[j] * scale (+ mask[j]);  v[j] = -inf where kpm[j] != 0 or j >= limit;
 *   out[j] = exp(v[j] - max v) / sum exp(v - max v);  all -inf -> zeros.
 * mask (float) and kpm (bytes) are unit stride or NULL.
 */
NCO_TC static void nc_ops_softmax_row(const float *x, float *out, nco_int n, float scale,
                                      const float *mask, const uint8_t *kpm, nco_int limit)
{
    const nco_vf ninf = nco_splat(-INFINITY);
    const nco_vf vscale = nco_splat(scale);
    nco_vf vmax = ninf;
    nco_int j = 0;
    if (limit > n) limit = n;
    if (limit < 0) limit = 0;
    const nco_vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

    /* pass 1: scaled + masked logits into out, running max */
    for (j = 0; j < n; j += NCO_W) {
        nco_int m = n - j < NCO_W ? n - j : NCO_W;
        nco_vf v, mv = nco_splat(0.0f);
        nco_vi dead;
        if (m == NCO_W) {
            v = nco_ld(x + j);
            if (mask) mv = nco_ld(mask + j);
            if (kpm) {
                dead = nco_bytes_nonzero(kpm + j);
            } else {
                dead = nco_splati(0);
            }
        } else {
            float tx[NCO_W] = {0}, tm[NCO_W] = {0};
            uint8_t tk[NCO_W] = {0};
            memcpy(tx, x + j, m * sizeof(float));
            if (mask) memcpy(tm, mask + j, m * sizeof(float));
            if (kpm) memcpy(tk, kpm + j, m);
            for (nco_int k = m; k < NCO_W; k++) tk[k] = 1;
            v = nco_ld(tx);
            mv = nco_ld(tm);
            dead = nco_bytes_nonzero(tk);
        }
        v = v * vscale;
        if (mask) v = v + mv;
        if (limit < n) dead |= (iota + nco_splati((int32_t)j)) >= nco_splati((int32_t)limit);
        v = nco_sel(dead, ninf, v);
        vmax = nco_max(v, vmax);
        if (m == NCO_W) {
            nco_st(out + j, v);
        } else {
            float tv[NCO_W];
            nco_st(tv, v);
            memcpy(out + j, tv, m * sizeof(float));
        }
    }
    float mx = nco_hmax(vmax);
    if (mx == -INFINITY) {
        /* every position masked (or -inf): zeros; a NaN logit still gives NaN */
        for (j = 0; j < n; j++) out[j] = (out[j] != out[j]) ? out[j] : 0.0f;
        return;
    }
    /* pass 2: exponentials and their sum */
    const nco_vf vmx = nco_splat(mx);
    nco_vf vsum = nco_splat(0.0f);
    for (j = 0; j + NCO_W <= n; j += NCO_W) {
        nco_vf e = nco_exp_nonpos(nco_ld(out + j) - vmx);
        vsum += e;
        nco_st(out + j, e);
    }
    if (j < n) {
        float tv[NCO_W];
        nco_int m = n - j;
        for (nco_int k = 0; k < NCO_W; k++) tv[k] = -INFINITY;
        memcpy(tv, out + j, m * sizeof(float));
        nco_vf e = nco_exp_nonpos(nco_ld(tv) - vmx);
        vsum += e;
        nco_st(tv, e);
        memcpy(out + j, tv, m * sizeof(float));
    }
    float inv = 1.0f / nco_hsum(vsum);
    /* pass 3: normalize */
    const nco_vf vinv = nco_splat(inv);
    for (j = 0; j + NCO_W <= n; j += NCO_W) nco_st(out + j, nco_ld(out + j) * vinv);
    for (; j < n; j++) out[j] = out[j] * inv;
}


#endif /* NC_OPS_KERNELS_H */

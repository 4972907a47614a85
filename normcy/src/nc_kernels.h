/*
 * normcy row kernels: contiguous float32 rows, explicit SIMD via GCC/Clang vector
 * extensions (no intrinsics, no -ffast-math).
 *
 * Portable builds compile every kernel several times (x86-64-v4 = AVX-512,
 * x86-64-v3 = AVX2+FMA, baseline SSE2) with GCC's target_clones; the dynamic loader
 * picks the widest variant the CPU supports once, at load time (an ifunc).
 * NC_NATIVE_BUILD (NORMCY_NATIVE=1) compiles one variant for the build host.
 *
 * Numerics
 * --------
 * Moments are computed chunk by chunk (NC_CHUNK floats, L1 resident):
 *   pass A: float32 lane sums of (s - K), K = the row's first value (a shift that makes
 *           the sum exact-ish even when |mean| >> std);
 *   pass B: double lane sums of d = s - mean_c and d*d (corrected two-pass:
 *           M2 = sum d^2 - (sum d)^2 / n);
 * chunks are merged with Chan et al.'s pairwise formula in double.  Never E[x^2]-E[x]^2.
 * The normalization subtracts the mean as a float32 hi/lo pair, so rows with
 * |mean| >> std keep full accuracy.
 * Every reduction has a fixed order that does not depend on threads: results are
 * bit-for-bit identical for any thread count.
 */
#ifndef NC_KERNELS_H
#define NC_KERNELS_H

#include <stddef.h>
#include <string.h>
#include <math.h>

typedef ptrdiff_t nc_int;

typedef float nc_v16f __attribute__((vector_size(64)));
typedef float nc_v8f __attribute__((vector_size(32)));
typedef double nc_v8d __attribute__((vector_size(64)));

#include "nc_dispatch.h"

#define NC_CHUNK 1024

/* Elements before p reaches a 64-byte boundary (p is float-aligned), at most len: loops peel
   these so the vector body's stores (and loads of same-aligned arrays) never split lines. */
#include <stdint.h>
#define NC_PEEL(p, len) ({ nc_int _h = (nc_int)(((64u - ((uintptr_t)(p) & 63u)) & 63u) / 4u); \
                           _h < (len) ? _h : (len); })

/* unaligned vector loads/stores (compile to vmovups) */
#define NC_LD16(p) ({ nc_v16f _v; memcpy(&_v, (p), sizeof(_v)); _v; })
#define NC_ST16(p, v) do { nc_v16f _v = (v); memcpy((p), &_v, sizeof(_v)); } while (0)
#define NC_LD8(p) ({ nc_v8f _v; memcpy(&_v, (p), sizeof(_v)); _v; })

/* Horizontal sums with a fixed tree order (deterministic, short dependency chains). */
typedef float nc_v4f __attribute__((vector_size(16)));
static inline double nc_hsum16(nc_v16f a)
{
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    nc_v8f b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7)
             + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    nc_v4f c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (double)((c[0] + c[2]) + (c[1] + c[3]));
#else
    float t[16];
    memcpy(t, &a, sizeof(t));
    for (int w = 8; w >= 1; w >>= 1)
        for (int k = 0; k < w; k++) t[k] += t[k + w];
    return (double)t[0];
#endif
}

static inline double nc_hsum8d(nc_v8d a)
{
    double t[8];
    for (int k = 0; k < 8; k++) t[k] = a[k];
    for (int w = 4; w >= 1; w >>= 1)
        for (int k = 0; k < w; k++) t[k] += t[k + w];
    return t[0];
}

/* Pass B in double lanes: exact enough for any finite float32 input. */
static inline void nc_passb_double(const float *src, nc_int len, double mc,
                                   double *s1_out, double *s2_out)
{
    nc_v8d s1a = {0}, s1b = {0}, s2a = {0}, s2b = {0};
    nc_v8d mv = mc - (nc_v8d){0};
    nc_int i;
    for (i = 0; i + 16 <= len; i += 16) {
        nc_v8d da = __builtin_convertvector(NC_LD8(src + i), nc_v8d) - mv;
        nc_v8d db = __builtin_convertvector(NC_LD8(src + i + 8), nc_v8d) - mv;
        s1a += da; s2a += da * da;
        s1b += db; s2b += db * db;
    }
    double s1 = nc_hsum8d(s1a + s1b);
    double s2 = nc_hsum8d(s2a + s2b);
    for (; i < len; i++) {
        double dd = (double)src[i] - mc;
        s1 += dd; s2 += dd * dd;
    }
    *s1_out = s1;
    *s2_out = s2;
}

/* one chunk of s = EXPR_S, stored into dc, with shifted sums v = s - K: a += v, q += v*v */
#define NC_ADD_STORE_MOM(EXPR_S)                                                     \
    do {                                                                             \
        for (; i + 64 <= len; i += 64) {                                        \
            nc_v16f v0, v1, v2, v3;                                                  \
            { nc_int o = i;      v0 = EXPR_S; NC_ST16(dc + o, v0); }                 \
            { nc_int o = i + 16; v1 = EXPR_S; NC_ST16(dc + o, v1); }                 \
            { nc_int o = i + 32; v2 = EXPR_S; NC_ST16(dc + o, v2); }                 \
            { nc_int o = i + 48; v3 = EXPR_S; NC_ST16(dc + o, v3); }                 \
            v0 -= kv; v1 -= kv; v2 -= kv; v3 -= kv;                                  \
            a0 += v0; a1 += v1; a2 += v2; a3 += v3;                                  \
            q0 += v0 * v0; q1 += v1 * v1; q2 += v2 * v2; q3 += v3 * v3;              \
        }                                                                            \
        for (; i + 16 <= len; i += 16) {                                             \
            nc_v16f v0; nc_int o = i; v0 = EXPR_S; NC_ST16(dc + o, v0);              \
            v0 -= kv; a0 += v0; q0 += v0 * v0;                                       \
        }                                                                            \
    } while (0)

/*
 * s = x (+ xb) (+ r), stored into d when r != NULL (d may be x or r itself: every
 * element is read before it is written).  Returns mean and M2 = sum (s-mean)^2.
 *
 * Per chunk of NC_CHUNK floats (L1 resident), one pass (fused with the add) sums
 * v = s - K and v*v in float lanes (at most NC_CHUNK/64 terms per lane), where the shift K
 * is the mean of the row's first 16 values.  M2 = sum v^2 - (sum v)^2 / n is used only
 * when it is well conditioned: (sum v)^2 / n <= sum v^2 / 2, i.e. the shift is within
 * about one standard deviation of the mean, so at most one bit is lost to cancellation
 * (this is never the unguarded E[x^2] - E[x]^2).  Otherwise (a shift far from the mean,
 * a possible float overflow or underflow, NaN/Inf) the chunk is redone with the classic
 * two-pass algorithm: the mean in double lanes, then corrected sums of (s - mean) in
 * float lanes, or in double lanes when those could overflow/underflow.
 * Chunks merge with Chan et al.'s formula in double.
 */
NC_TC static void nc_moments(const float *x, const float *xb, const float *r, float *d,
                             nc_int n, double *mean_out, double *m2_out)
{
    double cnt = 0.0, mean = 0.0, m2 = 0.0;
    float K;
    nc_int i;
    if (n <= 0) { *mean_out = 0.0; *m2_out = 0.0; return; }
    if (n >= 16) {
        /* a vector load and a tree sum: short dependency chain before the main loop */
        nc_v16f f = NC_LD16(x);
        if (r != NULL) f = xb != NULL ? (f + NC_LD16(xb)) + NC_LD16(r) : f + NC_LD16(r);
        K = (float)(nc_hsum16(f) * (1.0 / 16.0));
    } else {
        double ks = 0.0;
        for (i = 0; i < n; i++) {
            float sv = r != NULL ? (xb != NULL ? (x[i] + xb[i]) + r[i] : x[i] + r[i]) : x[i];
            ks += (double)sv;
        }
        K = (float)(ks / (double)n);
    }
    if (!(K - K == 0.0f)) K = 0.0f;    /* Inf/NaN among the first values */
    const nc_v16f kv = K - (nc_v16f){0};
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        const double inv_len = 1.0 / (double)len;
        const float *src;
        nc_v16f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        nc_v16f q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
        double sa = 0.0, sq = 0.0, mean_c, m2c;
        nc_int tail, head;
        if (r != NULL) {
            const float *xc = x + c0, *rc = r + c0;
            float *dc = d + c0;
            head = 0;   /* peeling costs more than split loads here (measured) */
            if (xb != NULL) {
                const float *bc = xb + c0;
                for (i = 0; i < head; i++) dc[i] = (xc[i] + bc[i]) + rc[i];
                NC_ADD_STORE_MOM((NC_LD16(xc + o) + NC_LD16(bc + o)) + NC_LD16(rc + o));
                tail = i;
                for (; i < len; i++) dc[i] = (xc[i] + bc[i]) + rc[i];
            } else {
                for (i = 0; i < head; i++) dc[i] = xc[i] + rc[i];
                NC_ADD_STORE_MOM(NC_LD16(xc + o) + NC_LD16(rc + o));
                tail = i;
                for (; i < len; i++) dc[i] = xc[i] + rc[i];
            }
            src = dc;
        } else {
            src = x + c0;
            head = 0;
            for (i = head; i + 64 <= len; i += 64) {
                nc_v16f v0 = NC_LD16(src + i) - kv, v1 = NC_LD16(src + i + 16) - kv;
                nc_v16f v2 = NC_LD16(src + i + 32) - kv, v3 = NC_LD16(src + i + 48) - kv;
                a0 += v0; a1 += v1; a2 += v2; a3 += v3;
                q0 += v0 * v0; q1 += v1 * v1; q2 += v2 * v2; q3 += v3 * v3;
            }
            for (; i + 16 <= len; i += 16) {
                nc_v16f v0 = NC_LD16(src + i) - kv;
                a0 += v0; q0 += v0 * v0;
            }
            tail = i;
        }
        sa = nc_hsum16((a0 + a1) + (a2 + a3));
        sq = nc_hsum16((q0 + q1) + (q2 + q3));
        for (i = 0; i < head; i++) {
            double t = (double)(src[i] - K);
            sa += t; sq += t * t;
        }
        for (i = tail; i < len; i++) {
            double t = (double)(src[i] - K);
            sa += t; sq += t * t;
        }
        if (sq < 1e36 && sq >= 1e-28 && sa * sa * inv_len <= 0.5 * sq) {
            mean_c = (double)K + sa * inv_len;
            m2c = sq - sa * sa * inv_len;
            if (m2c < 0.0) m2c = 0.0;
        } else {
            /* robust two-pass on the (stored) chunk: mean in double lanes ... */
            nc_v8d ma = {0}, mb = {0};
            const nc_v8d kd = (double)K - (nc_v8d){0};
            for (i = 0; i + 16 <= len; i += 16) {
                ma += __builtin_convertvector(NC_LD8(src + i), nc_v8d) - kd;
                mb += __builtin_convertvector(NC_LD8(src + i + 8), nc_v8d) - kd;
            }
            sa = nc_hsum8d(ma + mb);
            for (; i < len; i++) sa += (double)src[i] - (double)K;
            double mc = (double)K + sa * inv_len;
            /* ... then corrected sums of (s - mean) in float lanes */
            const float mcf = (float)mc;
            const nc_v16f mv = mcf - (nc_v16f){0};
            nc_v16f e0 = {0}, e1 = {0};
            q0 = (nc_v16f){0}; q1 = (nc_v16f){0};
            for (i = 0; i + 32 <= len; i += 32) {
                nc_v16f d0 = NC_LD16(src + i) - mv, d1 = NC_LD16(src + i + 16) - mv;
                e0 += d0; q0 += d0 * d0;
                e1 += d1; q1 += d1 * d1;
            }
            for (; i + 16 <= len; i += 16) {
                nc_v16f d0 = NC_LD16(src + i) - mv;
                e0 += d0; q0 += d0 * d0;
            }
            double s1 = nc_hsum16(e0 + e1);
            double s2 = nc_hsum16(q0 + q1);
            for (; i < len; i++) {
                double dd = (double)(src[i] - mcf);
                s1 += dd; s2 += dd * dd;
            }
            double mref = (double)mcf;
            if (!(s2 < 1e36) || s2 < 1e-28) {
                /* possible float overflow/underflow, NaN/Inf or a constant chunk:
                   exactly, in double lanes */
                mref = mc;
                nc_passb_double(src, len, mc, &s1, &s2);
            }
            m2c = s2 - s1 * s1 * inv_len;
            if (!(m2c > 0.0)) m2c = (m2c == m2c) ? 0.0 : m2c;   /* clamp, keep NaN */
            mean_c = mref + s1 * inv_len;
        }
        if (len == n) {        /* the whole row was one chunk */
            *mean_out = mean_c;
            *m2_out = m2c;
            return;
        }
        /* merge (Chan et al.) */
        double ntot = cnt + (double)len;
        double delta = mean_c - mean;
        mean += delta * ((double)len / ntot);
        m2 += m2c + delta * delta * (cnt * (double)len / ntot);
        cnt = ntot;
    }
    *mean_out = mean;
    *m2_out = m2;
}

/* y = ((s - mhi) - mlo) * scale * w + b, evaluated as t = (s - mhi)*scale - mlo*scale
   (one rounding with FMA) and y = t*w + b; y may be s itself.  mhi + mlo is the row
   mean as an unevaluated float pair, so |mean| >> std loses nothing. */
NC_TC static void nc_ln_apply(const float *s, float *y, const float *w, const float *b,
                              nc_int n, float mhi, float mlo, float scale)
{
    nc_int i = 0, head = NC_PEEL(y, n);
    const float c = -(mlo * scale);
    const nc_v16f hv = mhi - (nc_v16f){0}, cv = c - (nc_v16f){0}, sv = scale - (nc_v16f){0};
    if (w != NULL && b != NULL) {
        for (; i < head; i++) y[i] = ((s[i] - mhi) * scale + c) * w[i] + b[i];
        for (; i + 16 <= n; i += 16) {
            nc_v16f t = (NC_LD16(s + i) - hv) * sv + cv;
            NC_ST16(y + i, t * NC_LD16(w + i) + NC_LD16(b + i));
        }
        for (; i < n; i++) y[i] = ((s[i] - mhi) * scale + c) * w[i] + b[i];
    } else if (w != NULL) {
        for (; i < head; i++) y[i] = ((s[i] - mhi) * scale + c) * w[i];
        for (; i + 16 <= n; i += 16) {
            nc_v16f t = (NC_LD16(s + i) - hv) * sv + cv;
            NC_ST16(y + i, t * NC_LD16(w + i));
        }
        for (; i < n; i++) y[i] = ((s[i] - mhi) * scale + c) * w[i];
    } else if (b != NULL) {
        for (; i < head; i++) y[i] = ((s[i] - mhi) * scale + c) + b[i];
        for (; i + 16 <= n; i += 16) {
            nc_v16f t = (NC_LD16(s + i) - hv) * sv + cv;
            NC_ST16(y + i, t + NC_LD16(b + i));
        }
        for (; i < n; i++) y[i] = ((s[i] - mhi) * scale + c) + b[i];
    } else {
        for (; i < head; i++) y[i] = (s[i] - mhi) * scale + c;
        for (; i + 16 <= n; i += 16)
            NC_ST16(y + i, (NC_LD16(s + i) - hv) * sv + cv);
        for (; i < n; i++) y[i] = (s[i] - mhi) * scale + c;
    }
}

/* Scalar double-precision apply for rows whose scale is outside float32's comfortable
   range (|x| near FLT_MAX, or subnormal rows with eps = 0): y = (s - mean) * scale * w + b. */
static void nc_ln_apply_d(const float *s, float *y, const float *w, const float *b, nc_int n,
                          double mean, double scale)
{
    for (nc_int i = 0; i < n; i++) {
        double t = ((double)s[i] - mean) * scale;
        if (w) t *= (double)w[i];
        if (b) t += (double)b[i];
        y[i] = (float)t;
    }
}

static void nc_scale_apply_d(const float *s, float *y, const float *w, nc_int n, double scale)
{
    for (nc_int i = 0; i < n; i++) {
        double t = (double)s[i] * scale;
        if (w) t *= (double)w[i];
        y[i] = (float)t;
    }
}

/* sum of s^2 over a row, s = x (+ xb) (+ r) stored into d when r != NULL.
   float lanes per chunk (<= NC_CHUNK/64 terms per lane), redone in double lanes when
   that could have overflowed or underflowed. */
#define NC_ADD_STORE_SQ(EXPR_S)                                                      \
    do {                                                                             \
        for (i = 0; i + 64 <= len; i += 64) {                                        \
            nc_v16f v0, v1, v2, v3;                                                  \
            { nc_int o = i;      v0 = EXPR_S; NC_ST16(dc + o, v0); }                 \
            { nc_int o = i + 16; v1 = EXPR_S; NC_ST16(dc + o, v1); }                 \
            { nc_int o = i + 32; v2 = EXPR_S; NC_ST16(dc + o, v2); }                 \
            { nc_int o = i + 48; v3 = EXPR_S; NC_ST16(dc + o, v3); }                 \
            q0 += v0 * v0; q1 += v1 * v1; q2 += v2 * v2; q3 += v3 * v3;              \
        }                                                                            \
        for (; i + 16 <= len; i += 16) {                                             \
            nc_v16f v0; nc_int o = i; v0 = EXPR_S; NC_ST16(dc + o, v0);              \
            q0 += v0 * v0;                                                           \
        }                                                                            \
    } while (0)

NC_TC static double nc_sumsq(const float *x, const float *xb, const float *r, float *d, nc_int n)
{
    double total = 0.0;
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        const float *src;
        nc_int i;
        nc_v16f q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
        double q;
        nc_int tail;
        if (r != NULL) {
            const float *xc = x + c0, *rc = r + c0;
            float *dc = d + c0;
            if (xb != NULL) {
                const float *bc = xb + c0;
                NC_ADD_STORE_SQ((NC_LD16(xc + o) + NC_LD16(bc + o)) + NC_LD16(rc + o));
                tail = i;
                for (; i < len; i++) dc[i] = (xc[i] + bc[i]) + rc[i];
            } else {
                NC_ADD_STORE_SQ(NC_LD16(xc + o) + NC_LD16(rc + o));
                tail = i;
                for (; i < len; i++) dc[i] = xc[i] + rc[i];
            }
            src = dc;
        } else {
            src = x + c0;
            for (i = 0; i + 64 <= len; i += 64) {
                nc_v16f v0 = NC_LD16(src + i), v1 = NC_LD16(src + i + 16);
                nc_v16f v2 = NC_LD16(src + i + 32), v3 = NC_LD16(src + i + 48);
                q0 += v0 * v0; q1 += v1 * v1; q2 += v2 * v2; q3 += v3 * v3;
            }
            for (; i + 16 <= len; i += 16) { nc_v16f v0 = NC_LD16(src + i); q0 += v0 * v0; }
            tail = i;
        }
        q = nc_hsum16((q0 + q1) + (q2 + q3));
        for (i = tail; i < len; i++) q += (double)src[i] * (double)src[i];
        if (!(q < 1e36) || q < 1e-28) {
            nc_v8d qa = {0}, qb = {0};
            for (i = 0; i + 16 <= len; i += 16) {
                nc_v8d da = __builtin_convertvector(NC_LD8(src + i), nc_v8d);
                nc_v8d db = __builtin_convertvector(NC_LD8(src + i + 8), nc_v8d);
                qa += da * da;
                qb += db * db;
            }
            q = nc_hsum8d(qa + qb);
            for (; i < len; i++) q += (double)src[i] * (double)src[i];
        }
        total += q;
    }
    return total;
}

/* y = (s * scale) * w ; y may be s itself. */
NC_TC static void nc_scale_apply(const float *s, float *y, const float *w, nc_int n, float scale)
{
    nc_int i = 0, head = NC_PEEL(y, n);
    nc_v16f sv = scale - (nc_v16f){0};
    if (w != NULL) {
        for (; i < head; i++) y[i] = (s[i] * scale) * w[i];
        for (; i + 16 <= n; i += 16) NC_ST16(y + i, (NC_LD16(s + i) * sv) * NC_LD16(w + i));
        for (; i < n; i++) y[i] = (s[i] * scale) * w[i];
    } else {
        for (; i < head; i++) y[i] = s[i] * scale;
        for (; i + 16 <= n; i += 16) NC_ST16(y + i, NC_LD16(s + i) * sv);
        for (; i < n; i++) y[i] = s[i] * scale;
    }
}

/* y = x * a + b with scalar a, b (one BatchNorm channel plane). */
NC_TC static void nc_affine_scalar(const float *x, float *y, nc_int n, float a, float b)
{
    nc_int i = 0, head = NC_PEEL(y, n);
    nc_v16f av = a - (nc_v16f){0}, bv = b - (nc_v16f){0};
    for (; i < head; i++) y[i] = x[i] * a + b;
    for (; i + 16 <= n; i += 16) NC_ST16(y + i, NC_LD16(x + i) * av + bv);
    for (; i < n; i++) y[i] = x[i] * a + b;
}

/* y[j] = x[j] * a[j] + b[j] (one channels-last BatchNorm row). */
NC_TC static void nc_affine_vec(const float *x, float *y, const float *a, const float *b, nc_int n)
{
    nc_int i = 0, head = NC_PEEL(y, n);
    for (; i < head; i++) y[i] = x[i] * a[i] + b[i];
    for (; i + 16 <= n; i += 16)
        NC_ST16(y + i, NC_LD16(x + i) * NC_LD16(a + i) + NC_LD16(b + i));
    for (; i < n; i++) y[i] = x[i] * a[i] + b[i];
}

/* ------------------------------------------------------------------------------
 * Streaming (non-temporal) copy, for outputs far larger than the caches: the row is
 * computed into an L1-resident scratch and streamed out, so the destination lines are
 * never read for ownership.  Callers fence (nc_stream_fence) before anyone reads.
 * ------------------------------------------------------------------------------ */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <stdint.h>
#define NC_HAVE_STREAM 1

__attribute__((target("avx512f")))
static void nc_stream_copy_avx512(float *dst, const float *src, nc_int n)
{
    nc_int i = 0;
    while (i < n && ((uintptr_t)(dst + i) & 63)) { dst[i] = src[i]; i++; }
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = src[i];
}

__attribute__((target("avx")))
static void nc_stream_copy_avx(float *dst, const float *src, nc_int n)
{
    nc_int i = 0;
    while (i < n && ((uintptr_t)(dst + i) & 31)) { dst[i] = src[i]; i++; }
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = src[i];
}

static void nc_stream_copy_sse(float *dst, const float *src, nc_int n)
{
    nc_int i = 0;
    while (i < n && ((uintptr_t)(dst + i) & 15)) { dst[i] = src[i]; i++; }
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = src[i];
}

static int nc_stream_level = -1;

static void nc_stream_init(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) nc_stream_level = 2;
    else if (__builtin_cpu_supports("avx")) nc_stream_level = 1;
    else nc_stream_level = 0;
}

static inline void nc_stream_copy(float *dst, const float *src, nc_int n)
{
    if (nc_stream_level == 2) nc_stream_copy_avx512(dst, src, n);
    else if (nc_stream_level == 1) nc_stream_copy_avx(dst, src, n);
    else nc_stream_copy_sse(dst, src, n);
}

static inline void nc_stream_fence(void) { _mm_sfence(); }
#else
#define NC_HAVE_STREAM 0
static void nc_stream_init(void) {}
static inline void nc_stream_copy(float *dst, const float *src, nc_int n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}
static inline void nc_stream_fence(void) {}
#endif

#endif /* NC_KERNELS_H */

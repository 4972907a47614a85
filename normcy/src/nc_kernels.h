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

#if !defined(NC_NATIVE_BUILD) && defined(__x86_64__) && defined(__GNUC__) && \
    !defined(__clang__) && defined(__GLIBC__) && (__GNUC__ >= 12)
#define NC_TC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NC_HAVE_CLONES 1
#else
#define NC_TC
#define NC_HAVE_CLONES 0
#endif

#define NC_CHUNK 2048

/* unaligned vector loads/stores (compile to vmovups) */
#define NC_LD16(p) ({ nc_v16f _v; memcpy(&_v, (p), sizeof(_v)); _v; })
#define NC_ST16(p, v) do { nc_v16f _v = (v); memcpy((p), &_v, sizeof(_v)); } while (0)
#define NC_LD8(p) ({ nc_v8f _v; memcpy(&_v, (p), sizeof(_v)); _v; })

/* Which kernel variant runs on this CPU (mirrors the target_clones priority). */
static const char *nc_isa(void)
{
#if NC_HAVE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2+FMA)";
    return "x86-64 baseline (SSE2)";
#elif defined(NC_NATIVE_BUILD)
    return "native (-march=native, single variant)";
#else
    return "portable (single variant, no runtime dispatch)";
#endif
}

static inline double nc_hsum16(nc_v16f a)
{
    double s = 0.0;
    for (int k = 0; k < 16; k++) s += (double)a[k];
    return s;
}

static inline double nc_hsum8d(nc_v8d a)
{
    double s = 0.0;
    for (int k = 0; k < 8; k++) s += a[k];
    return s;
}

/*
 * s = x (+ xb) (+ r), stored into d when r != NULL (d may be x or r itself: every
 * element is read before it is written).  Returns mean and M2 = sum (s-mean)^2.
 */
NC_TC static void nc_moments(const float *x, const float *xb, const float *r, float *d,
                             nc_int n, double *mean_out, double *m2_out)
{
    double cnt = 0.0, mean = 0.0, m2 = 0.0;
    float K;
    if (n <= 0) { *mean_out = 0.0; *m2_out = 0.0; return; }
    if (r != NULL) {
        K = xb ? (x[0] + xb[0]) + r[0] : x[0] + r[0];
    } else {
        K = x[0];
    }
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        const float *src;
        nc_int i;
        if (r != NULL) {
            const float *xc = x + c0, *rc = r + c0;
            float *dc = d + c0;
            if (xb != NULL) {
                const float *bc = xb + c0;
                for (i = 0; i + 16 <= len; i += 16)
                    NC_ST16(dc + i, (NC_LD16(xc + i) + NC_LD16(bc + i)) + NC_LD16(rc + i));
                for (; i < len; i++) dc[i] = (xc[i] + bc[i]) + rc[i];
            } else {
                for (i = 0; i + 16 <= len; i += 16)
                    NC_ST16(dc + i, NC_LD16(xc + i) + NC_LD16(rc + i));
                for (; i < len; i++) dc[i] = xc[i] + rc[i];
            }
            src = dc;
        } else {
            src = x + c0;
        }
        /* pass A: shifted sum in float lanes */
        nc_v16f a0 = {0}, a1 = {0};
        nc_v16f kv = K - (nc_v16f){0};
        for (i = 0; i + 32 <= len; i += 32) {
            a0 += NC_LD16(src + i) - kv;
            a1 += NC_LD16(src + i + 16) - kv;
        }
        for (; i + 16 <= len; i += 16) a0 += NC_LD16(src + i) - kv;
        double sa = nc_hsum16(a0) + nc_hsum16(a1);
        for (; i < len; i++) sa += (double)(src[i] - K);
        double mc = (double)K + sa / (double)len;
        /* pass B: corrected two-pass in double lanes */
        nc_v8d s1a = {0}, s1b = {0}, s2a = {0}, s2b = {0};
        nc_v8d mv = mc - (nc_v8d){0};
        for (i = 0; i + 16 <= len; i += 16) {
            nc_v8d da = __builtin_convertvector(NC_LD8(src + i), nc_v8d) - mv;
            nc_v8d db = __builtin_convertvector(NC_LD8(src + i + 8), nc_v8d) - mv;
            s1a += da; s2a += da * da;
            s1b += db; s2b += db * db;
        }
        double s1 = nc_hsum8d(s1a) + nc_hsum8d(s1b);
        double s2 = nc_hsum8d(s2a) + nc_hsum8d(s2b);
        for (; i < len; i++) {
            double dd = (double)src[i] - mc;
            s1 += dd; s2 += dd * dd;
        }
        double m2c = s2 - s1 * s1 / (double)len;
        if (!(m2c > 0.0)) m2c = (m2c == m2c) ? 0.0 : m2c;   /* clamp, keep NaN */
        double mean_c = mc + s1 / (double)len;
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

/* y = ((s - mhi) - mlo) * scale * w + b ; y may be s itself. */
NC_TC static void nc_ln_apply(const float *s, float *y, const float *w, const float *b,
                              nc_int n, float mhi, float mlo, float scale)
{
    nc_int i = 0;
    nc_v16f hv = mhi - (nc_v16f){0}, lv = mlo - (nc_v16f){0}, sv = scale - (nc_v16f){0};
    if (w != NULL && b != NULL) {
        for (; i + 16 <= n; i += 16) {
            nc_v16f t = ((NC_LD16(s + i) - hv) - lv) * sv;
            NC_ST16(y + i, t * NC_LD16(w + i) + NC_LD16(b + i));
        }
        for (; i < n; i++) y[i] = ((s[i] - mhi) - mlo) * scale * w[i] + b[i];
    } else if (w != NULL) {
        for (; i + 16 <= n; i += 16) {
            nc_v16f t = ((NC_LD16(s + i) - hv) - lv) * sv;
            NC_ST16(y + i, t * NC_LD16(w + i));
        }
        for (; i < n; i++) y[i] = ((s[i] - mhi) - mlo) * scale * w[i];
    } else if (b != NULL) {
        for (; i + 16 <= n; i += 16) {
            nc_v16f t = ((NC_LD16(s + i) - hv) - lv) * sv;
            NC_ST16(y + i, t + NC_LD16(b + i));
        }
        for (; i < n; i++) y[i] = ((s[i] - mhi) - mlo) * scale + b[i];
    } else {
        for (; i + 16 <= n; i += 16)
            NC_ST16(y + i, ((NC_LD16(s + i) - hv) - lv) * sv);
        for (; i < n; i++) y[i] = ((s[i] - mhi) - mlo) * scale;
    }
}

/* sum of s^2 (in double), s = x (+ xb) (+ r) stored into d when r != NULL. */
NC_TC static double nc_sumsq(const float *x, const float *xb, const float *r, float *d, nc_int n)
{
    double total = 0.0;
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        const float *src;
        nc_int i;
        if (r != NULL) {
            const float *xc = x + c0, *rc = r + c0;
            float *dc = d + c0;
            if (xb != NULL) {
                const float *bc = xb + c0;
                for (i = 0; i + 16 <= len; i += 16)
                    NC_ST16(dc + i, (NC_LD16(xc + i) + NC_LD16(bc + i)) + NC_LD16(rc + i));
                for (; i < len; i++) dc[i] = (xc[i] + bc[i]) + rc[i];
            } else {
                for (i = 0; i + 16 <= len; i += 16)
                    NC_ST16(dc + i, NC_LD16(xc + i) + NC_LD16(rc + i));
                for (; i < len; i++) dc[i] = xc[i] + rc[i];
            }
            src = dc;
        } else {
            src = x + c0;
        }
        nc_v8d qa = {0}, qb = {0};
        for (i = 0; i + 16 <= len; i += 16) {
            nc_v8d da = __builtin_convertvector(NC_LD8(src + i), nc_v8d);
            nc_v8d db = __builtin_convertvector(NC_LD8(src + i + 8), nc_v8d);
            qa += da * da;
            qb += db * db;
        }
        double q = nc_hsum8d(qa) + nc_hsum8d(qb);
        for (; i < len; i++) q += (double)src[i] * (double)src[i];
        total += q;
    }
    return total;
}

/* y = (s * scale) * w ; y may be s itself. */
NC_TC static void nc_scale_apply(const float *s, float *y, const float *w, nc_int n, float scale)
{
    nc_int i = 0;
    nc_v16f sv = scale - (nc_v16f){0};
    if (w != NULL) {
        for (; i + 16 <= n; i += 16) NC_ST16(y + i, (NC_LD16(s + i) * sv) * NC_LD16(w + i));
        for (; i < n; i++) y[i] = (s[i] * scale) * w[i];
    } else {
        for (; i + 16 <= n; i += 16) NC_ST16(y + i, NC_LD16(s + i) * sv);
        for (; i < n; i++) y[i] = s[i] * scale;
    }
}

/* y = x * a + b with scalar a, b (one BatchNorm channel plane). */
NC_TC static void nc_affine_scalar(const float *x, float *y, nc_int n, float a, float b)
{
    nc_int i = 0;
    nc_v16f av = a - (nc_v16f){0}, bv = b - (nc_v16f){0};
    for (; i + 16 <= n; i += 16) NC_ST16(y + i, NC_LD16(x + i) * av + bv);
    for (; i < n; i++) y[i] = x[i] * a + b;
}

/* y[j] = x[j] * a[j] + b[j] (one channels-last BatchNorm row). */
NC_TC static void nc_affine_vec(const float *x, float *y, const float *a, const float *b, nc_int n)
{
    nc_int i = 0;
    for (; i + 16 <= n; i += 16)
        NC_ST16(y + i, NC_LD16(x + i) * NC_LD16(a + i) + NC_LD16(b + i));
    for (; i < n; i++) y[i] = x[i] * a[i] + b[i];
}

#endif /* NC_KERNELS_H */

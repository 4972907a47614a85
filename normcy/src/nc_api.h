/*
 * normcy's C kernel API: the one run-time ISA dispatch for every kernel family.
 *
 * Layers: the kernel bodies (nc_norm_kern.h, nc_ops_kern.h, nc_gemm_kern.h) are written
 * once against the SIMD vocabulary of nc_simd.h and hold no validation; this header
 * compiles them once per instruction set, collects each variant's functions in a table,
 * chooses one table at start-up, and exposes plain C functions that call through it.  The
 * Cython modules validate arguments and call only the functions declared at the end.
 *
 * Variants (portable GCC >= 12 or Clang >= 14 build on x86-64):
 *   avx512   `#pragma GCC target("arch=x86-64-v4")` (Clang: `#pragma clang attribute` with
 *            the same features), 64-byte vectors
 *   avx2     `#pragma GCC target("arch=x86-64-v3")` (Clang: likewise), 32-byte vectors, FMA
 *   baseline the build's own target (SSE2 on x86-64, NEON on aarch64), 16-byte vectors
 * The widest variant the CPU supports is chosen, capped by the environment variable
 * NORMCY_MAX_ISA=avx512|avx2|sse2|baseline|generic (read once, at import; like oneDNN's
 * ONEDNN_MAX_CPU_ISA), so that every variant can be tested and measured on one machine.
 * A NORMCY_NATIVE=1 build (NC_NATIVE_BUILD, -march=native) compiles one variant with the
 * build host's widest vectors; so does a build whose compiler flags (CFLAGS=-march=...)
 * already target AVX or more: GCC refuses to inline the intrinsics of a variant region
 * that asks for less than the command line, and a "baseline" variant compiled for AVX2
 * would not be the portable one.  Other compilers/architectures get the baseline variant.
 * A single-variant build ignores NORMCY_MAX_ISA (and says so: nc_cap_invalid = 2).
 */
#ifndef NC_API_H
#define NC_API_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__linux__)
#include <unistd.h>     /* sysconf: the L1 data cache size */
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>   /* vfmaq_f32 / vfmaq_f64: nc_simd.h's ncv_fma */
#endif

enum { NCO_ACT_IDENTITY = 0, NCO_ACT_RELU = 1, NCO_ACT_GELU = 2, NCO_ACT_GELU_TANH = 3 };

#define NC_CHUNK 1024

/* Streamed output (nc_stream_row): the cache line, and a partial line held back until the
   next row completes it. */
#define NC_LINE_BYTES 64
#define NC_LINE_FLOATS 16
typedef struct nc_carry {
    float *line;                  /* the held line's (aligned) address, NULL if none */
    ptrdiff_t fill;               /* its first `fill` elements are held in v */
    float v[NC_LINE_FLOATS];
} nc_carry;

/* One step of the streamed add + LayerNorm / RMSNorm pipeline (nc_stream_fused): row B's moments
   while row A's outputs stream out. */
typedef struct nc_fuse {
    const float *x, *xb, *r;    /* row B: s = (x + xb) + r (xb may be NULL; r NULL: s = x) */
    const float *px, *pr;       /* the next row's x and r, prefetched (px NULL: none) */
    float *d;                   /* row B's s, stored (L1 scratch, n floats; NULL: no add) */
    const float *sa;            /* row A's s (the previous step's d) */
    float *ya, *soa;            /* row A's outputs (soa NULL: s is not written) */
    nc_carry *cy, *cs;          /* their carries */
    const float *w, *b;         /* weight and bias (either may be NULL; RMS: no bias) */
    int rms;                    /* RMSNorm (y = (s * scale) * w, M2 = sum of squares) */
    ptrdiff_t n;                /* row length, n >= NC_BLK */
    float mhi, mlo, scale;      /* row A: the mean as a float pair, 1 / std */
    double mean, m2;            /* out: row B's mean and M2, as nc_moments gives them */
} nc_fuse;

/* Write the held elements with ordinary stores and forget them. */
static inline void nc_stream_flush(nc_carry *c)
{
    ptrdiff_t k;
    for (k = 0; k < c->fill; k++) c->line[k] = c->v[k];
    c->line = NULL;
    c->fill = 0;
}

/* The L1 data cache of the CPU, bytes (nc_dispatch_init: sysconf where glibc reports it,
   else 32 KB); the GEMM's K block (nc_gemm_kc) takes a slice of twice the size into an L1
   of 48 KB or more. */
static long nc_l1d_bytes = 32768;

/* Kernel families a module compiles (each Cython module includes a nc_api_*.h that sets
   this before including nc_api.h): the GEMM needs the ops (activations, softmax). */
#define NC_F_NORM 1
#define NC_F_OPS 2
#define NC_F_GEMM 4
#ifndef NC_FAMILIES
#define NC_FAMILIES (NC_F_NORM | NC_F_OPS | NC_F_GEMM)
#endif
#if (NC_FAMILIES & NC_F_GEMM) && !(NC_FAMILIES & NC_F_OPS)
#error "the GEMM family needs the ops family"
#endif

/* ------------------------------------------------------------- the kernel table */
typedef struct nc_ktable {
    const char *name;          /* "avx512", "avx2", "baseline", "native" */
    const char *detail;        /* human-readable */
    int vbytes;                /* vector register width in bytes */
    /* norms / BatchNorm (nc_norm_kern.h) */
    void (*moments)(const float *, const float *, const float *, float *, ptrdiff_t,
                    double *, double *);
    void (*ln_apply)(const float *, float *, const float *, const float *, ptrdiff_t,
                     float, float, float);
    double (*sumsq)(const float *, const float *, const float *, float *, ptrdiff_t);
    void (*scale_apply)(const float *, float *, const float *, ptrdiff_t, float);
    void (*ln_apply_d)(const float *, float *, const float *, const float *, ptrdiff_t,
                       double, double);
    void (*scale_apply_d)(const float *, float *, const float *, ptrdiff_t, double);
    void (*affine_scalar)(const float *, float *, ptrdiff_t, float, float, float, int);
    void (*affine_rows)(const float *, float *, const float *, const float *, const float *,
                        ptrdiff_t, ptrdiff_t);
    void (*stream_row)(float *, const float *, ptrdiff_t, nc_carry *);
    void (*ln_apply_stream)(const float *, float *, const float *, const float *, ptrdiff_t,
                            float, float, float, nc_carry *);
    void (*scale_apply_stream)(const float *, float *, const float *, ptrdiff_t, float,
                               nc_carry *);
    void (*stream_fused)(nc_fuse *);
    void (*affine_scalar_stream)(const float *, float *, ptrdiff_t, float, float, float, int,
                                 nc_carry *);
    void (*affine_rows_stream)(const float *, float *, const float *, const float *,
                               const float *, ptrdiff_t, ptrdiff_t, nc_carry *);
    void (*ln_apply2)(const float *, const float *, float *, float *, const float *,
                      const float *, ptrdiff_t, float, float, float, float, float, float);
    void (*scale_apply2)(const float *, const float *, float *, float *, const float *,
                         ptrdiff_t, float, float);
    float (*moments_shift)(const float *, const float *, const float *, ptrdiff_t);
    void (*moments_part)(const float *, const float *, const float *, float *, ptrdiff_t,
                         float, ptrdiff_t, ptrdiff_t, double *);
    void (*moments_merge)(const double *, ptrdiff_t, double *, double *);
    void (*sumsq_part)(const float *, const float *, const float *, float *, ptrdiff_t,
                       ptrdiff_t, ptrdiff_t, double *);
    /* Transformer element-wise / row kernels (nc_ops_kern.h) */
    void (*act_row)(const float *, const float *, const float *, float *, ptrdiff_t, int);
    void (*exp_row)(const float *, float *, ptrdiff_t);
    void (*softmax_row)(const float *, float *, ptrdiff_t, float, const float *,
                        const uint8_t *, ptrdiff_t);
    void (*softmax_row2)(const float *, const float *, float *, float *, ptrdiff_t, float,
                         const float *, const float *, const uint8_t *, const uint8_t *,
                         ptrdiff_t, ptrdiff_t);
    /* packed GEMM and fused attention (nc_gemm_kern.h) */
    void (*gemm_run)(const float *, ptrdiff_t, const float *, ptrdiff_t, ptrdiff_t,
                     const float *, const float *, ptrdiff_t, float *, ptrdiff_t, int,
                     ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t);
    void (*gemm_pack)(const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, float *);
    ptrdiff_t (*gemm_nr)(void);
    ptrdiff_t (*gemm_mr)(void);
    void (*attention_head)(const float *, ptrdiff_t, const float *, const float *, ptrdiff_t,
                           const float *,
                           ptrdiff_t, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, int,
                           const float *, ptrdiff_t, const uint8_t *, float *);
    double (*fma_loop)(ptrdiff_t);
    ptrdiff_t (*gemm_kc)(ptrdiff_t);
    ptrdiff_t (*gemm_mc)(ptrdiff_t, ptrdiff_t);
} nc_ktable;

/* ------------------------------------------------------------- the variants */
#if defined(__clang__) && defined(__x86_64__) && __clang_major__ >= 14
#define NC_CLANG_MULTI 1    /* Clang: the variant regions as `#pragma clang attribute` */
#else
#define NC_CLANG_MULTI 0
#endif
#if defined(NC_NATIVE_BUILD) || defined(__AVX__) || !defined(__GNUC__) || \
    !(NC_CLANG_MULTI || (!defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12))
/* one variant: the compiler's own target */
#define NC_MULTI 0
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NC_ONE_VB 64
#elif defined(__AVX2__) && defined(__FMA__)
#define NC_ONE_VB 32
#else
#define NC_ONE_VB 16
#endif
#define NC_VBYTES NC_ONE_VB
#define NC_SFX one
#include "nc_simd.h"
#include "nc_families.h"
#include "nc_simd_end.h"
#undef NC_VBYTES
#undef NC_SFX
#else
#define NC_MULTI 1
/* NC_VARIANT_FMA: the region's target has FMA (GCC also defines __FMA__ inside its target
   regions; Clang's target attributes leave the predefined macros alone) */
#define NC_VARIANT_FMA 1
#if NC_CLANG_MULTI
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx2,fma,bmi,bmi2,popcnt,sse4.2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#endif
#define NC_VBYTES 64
#define NC_SFX v4
#include "nc_simd.h"
#include "nc_families.h"
#include "nc_simd_end.h"
#undef NC_VBYTES
#undef NC_SFX
#if NC_CLANG_MULTI
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if NC_CLANG_MULTI
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,bmi2,popcnt,sse4.2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#endif
#define NC_VBYTES 32
#define NC_SFX v3
#include "nc_simd.h"
#include "nc_families.h"
#include "nc_simd_end.h"
#undef NC_VBYTES
#undef NC_SFX
#if NC_CLANG_MULTI
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef NC_VARIANT_FMA

#define NC_VBYTES 16
#define NC_SFX v1
#include "nc_simd.h"
#include "nc_families.h"
#include "nc_simd_end.h"
#undef NC_VBYTES
#undef NC_SFX
#endif

#if NC_FAMILIES & NC_F_NORM
#define NC_TABLE_NORM(S) nc_moments_##S, nc_ln_apply_##S, nc_sumsq_##S, nc_scale_apply_##S,  \
     nc_ln_apply_d_##S, nc_scale_apply_d_##S, nc_affine_scalar_##S, nc_affine_rows_##S,     \
     nc_stream_row_##S, nc_ln_apply_stream_##S, nc_scale_apply_stream_##S,                \
     nc_stream_fused_##S, nc_affine_scalar_stream_##S, nc_affine_rows_stream_##S,          \
     nc_ln_apply2_##S, nc_scale_apply2_##S, nc_moments_shift_##S, nc_moments_part_##S, nc_moments_merge_##S,     \
     nc_sumsq_part_##S
#else
#define NC_TABLE_NORM(S) 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
#endif
#if NC_FAMILIES & NC_F_OPS
#define NC_TABLE_OPS(S) nc_ops_act_row_##S, nc_ops_exp_row_##S, nc_ops_softmax_row_##S, \
    nc_ops_softmax_row2_##S
#else
#define NC_TABLE_OPS(S) 0, 0, 0, 0
#endif
#if NC_FAMILIES & NC_F_GEMM
#define NC_TABLE_GEMM(S) nc_gemm_run_##S, nc_gemm_pack_##S, nc_gemm_nr_##S, nc_gemm_mr_##S, \
     nc_attention_head_##S, nc_fma_loop_##S, nc_gemm_kc_##S, \
     nc_gemm_mc_##S
#else
#define NC_TABLE_GEMM(S) 0, 0, 0, 0, 0, 0, 0, 0
#endif
#define NC_TABLE(S, NAME, DETAIL, VB) \
    {NAME, DETAIL, VB, NC_TABLE_NORM(S), NC_TABLE_OPS(S), NC_TABLE_GEMM(S)}

#if NC_MULTI
static const nc_ktable nc_table_v4 = NC_TABLE(v4, "avx512", "x86-64-v4 (AVX-512)", 64);
static const nc_ktable nc_table_v3 = NC_TABLE(v3, "avx2", "x86-64-v3 (AVX2+FMA)", 32);
static const nc_ktable nc_table_v1 = NC_TABLE(v1, "baseline", "x86-64 baseline (SSE2)", 16);
#define NC_DEFAULT_TABLE (&nc_table_v1)
#else
static const nc_ktable nc_table_one = NC_TABLE(one, "native",
#if defined(NC_NATIVE_BUILD)
    "native (-march=native, single variant)",
#elif defined(__AVX__)
#if NC_ONE_VB == 64
    "the compiler flags' target, AVX-512 (single variant, no runtime dispatch)",
#elif NC_ONE_VB == 32
    "the compiler flags' target, AVX2+FMA (single variant, no runtime dispatch)",
#else
    "the compiler flags' target, 16-byte vectors (single variant, no runtime dispatch)",
#endif
#else
    "portable (single variant, no runtime dispatch)",
#endif
    NC_ONE_VB);
#define NC_DEFAULT_TABLE (&nc_table_one)
#endif

#define NC_HAVE_CLONES NC_MULTI   /* run-time dispatch between variants */
#define NC_HAVE_STREAM 1          /* streaming stores (a plain copy where none exist) */

static const nc_ktable *nc_kt = NC_DEFAULT_TABLE;
static char nc_cap_req[32];        /* NORMCY_MAX_ISA as given ("" if unset) */
static int nc_cap_invalid = 0;     /* 1 if NORMCY_MAX_ISA named no known variant */
static int nc_cpu_best = 0;        /* 4, 3 or 1: the widest variant this CPU runs */

/* Choose the kernel table: the CPU's widest variant, capped by NORMCY_MAX_ISA. */
static void nc_dispatch_init(void)
{
    const char *cap = getenv("NORMCY_MAX_ISA");
    int level = 1, lim = 4;
#if NC_MULTI
    __builtin_cpu_init();
#if NC_CLANG_MULTI
    /* the x86-64-v3 / -v4 level names arrived in later Clang versions: the features the
       regions' target attributes name */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("bmi") &&
        __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("sse4.2")) {
        level = 3;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vl"))
            level = 4;
    }
#else
    if (__builtin_cpu_supports("x86-64-v4")) level = 4;
    else if (__builtin_cpu_supports("x86-64-v3")) level = 3;
#endif
#endif
    nc_cpu_best = level;
#if defined(__linux__) && defined(_SC_LEVEL1_DCACHE_SIZE)
    {
        long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        nc_l1d_bytes = l1 >= 4096 && l1 <= (1L << 24) ? l1 : 32768;
    }
#endif
    nc_cap_req[0] = '\0';
    nc_cap_invalid = 0;
    if (cap != NULL && cap[0] != '\0') {
        size_t k;
        char low[32];
        /* case-insensitive; surrounding blanks (a quoted " avx2") are ignored */
        while (*cap == ' ' || *cap == '\t')
            cap++;
        for (k = 0; k < sizeof low - 1 && cap[k]; k++)
            low[k] = (char)((cap[k] >= 'A' && cap[k] <= 'Z') ? cap[k] + 32 : cap[k]);
        while (k > 0 && (low[k - 1] == ' ' || low[k - 1] == '\t' || low[k - 1] == '\n'))
            k--;
        low[k] = '\0';
        memcpy(nc_cap_req, low, k + 1);
        if (!strcmp(low, "avx512") || !strcmp(low, "x86-64-v4") || !strcmp(low, "avx512_core"))
            lim = 4;
        else if (!strcmp(low, "avx2") || !strcmp(low, "x86-64-v3"))
            lim = 3;
        else if (!strcmp(low, "sse2") || !strcmp(low, "baseline") || !strcmp(low, "generic") ||
                 !strcmp(low, "x86-64") || !strcmp(low, "default"))
            lim = 1;
        else
            nc_cap_invalid = 1;
    }
    if (level > lim) level = lim;
#if !NC_MULTI
    if (nc_cap_req[0] != '\0')
        nc_cap_invalid = 2;     /* one variant: nothing to cap */
#endif
#if NC_MULTI
    nc_kt = level >= 4 ? &nc_table_v4 : level == 3 ? &nc_table_v3 : &nc_table_v1;
#else
    (void)level;
    nc_kt = &nc_table_one;
#endif
}

static inline const char *nc_isa(void) { return nc_kt->detail; }
static inline const char *nc_isa_name(void) { return nc_kt->name; }
static inline const char *nc_isa_cap(void) { return nc_cap_req; }
static inline int nc_isa_cap_invalid(void) { return nc_cap_invalid; }
static inline int nc_isa_vbytes(void) { return nc_kt->vbytes; }
/* the variants this CPU can run, widest first, as a comma-separated list */
static inline const char *nc_isa_supported(void)
{
#if NC_MULTI
    return nc_cpu_best >= 4 ? "avx512,avx2,baseline" : nc_cpu_best == 3 ? "avx2,baseline"
                                                                        : "baseline";
#else
    return "native";
#endif
}

/* ------------------------------------------------------------- the public C API */
static inline void nc_moments(const float *x, const float *xb, const float *r, float *d,
                              ptrdiff_t n, double *mean, double *m2)
{ nc_kt->moments(x, xb, r, d, n, mean, m2); }
static inline void nc_ln_apply(const float *s, float *y, const float *w, const float *b,
                               ptrdiff_t n, float mhi, float mlo, float scale)
{ nc_kt->ln_apply(s, y, w, b, n, mhi, mlo, scale); }
static inline double nc_sumsq(const float *x, const float *xb, const float *r, float *d,
                              ptrdiff_t n)
{ return nc_kt->sumsq(x, xb, r, d, n); }
static inline void nc_scale_apply(const float *s, float *y, const float *w, ptrdiff_t n,
                                  float scale)
{ nc_kt->scale_apply(s, y, w, n, scale); }
/* two rows of the same length at once (the same results as two nc_ln_apply calls) */
/* nc_moments / nc_sumsq of a long row in pieces (rows split among threads): the row's
   shift (before any piece stores s), chunk statistics of [c0, c1), then merged in chunk
   order: exactly the whole-row results */
static inline float nc_moments_shift(const float *x, const float *xb, const float *r,
                                     ptrdiff_t n)
{ return nc_kt->moments_shift(x, xb, r, n); }
static inline void nc_moments_part(const float *x, const float *xb, const float *r, float *d,
                                   ptrdiff_t n, float K, ptrdiff_t c0, ptrdiff_t c1,
                                   double *cm)
{ nc_kt->moments_part(x, xb, r, d, n, K, c0, c1, cm); }
static inline void nc_moments_merge(const double *cm, ptrdiff_t n, double *mean, double *m2)
{ nc_kt->moments_merge(cm, n, mean, m2); }
static inline void nc_sumsq_part(const float *x, const float *xb, const float *r, float *d,
                                 ptrdiff_t n, ptrdiff_t c0, ptrdiff_t c1, double *cq)
{ nc_kt->sumsq_part(x, xb, r, d, n, c0, c1, cq); }
static inline void nc_ln_apply2(const float *s0, const float *s1, float *y0, float *y1,
                                const float *w, const float *b, ptrdiff_t n,
                                float mhi0, float mlo0, float scale0,
                                float mhi1, float mlo1, float scale1)
{ nc_kt->ln_apply2(s0, s1, y0, y1, w, b, n, mhi0, mlo0, scale0, mhi1, mlo1, scale1); }
static inline void nc_scale_apply2(const float *s0, const float *s1, float *y0, float *y1,
                                   const float *w, ptrdiff_t n, float scale0, float scale1)
{ nc_kt->scale_apply2(s0, s1, y0, y1, w, n, scale0, scale1); }
static inline void nc_ln_apply_d(const float *s, float *y, const float *w, const float *b,
                                 ptrdiff_t n, double mean, double scale)
{ nc_kt->ln_apply_d(s, y, w, b, n, mean, scale); }
static inline void nc_scale_apply_d(const float *s, float *y, const float *w, ptrdiff_t n,
                                    double scale)
{ nc_kt->scale_apply_d(s, y, w, n, scale); }
static inline void nc_affine_scalar(const float *x, float *y, ptrdiff_t n, float m, float a,
                                    float b, int centred)
{ nc_kt->affine_scalar(x, y, n, m, a, b, centred); }
static inline void nc_affine_rows(const float *x, float *y, const float *m, const float *a,
                                  const float *b, ptrdiff_t n, ptrdiff_t nrows)
{ nc_kt->affine_rows(x, y, m, a, b, n, nrows); }
static inline void nc_stream_row(float *dst, const float *src, ptrdiff_t n, nc_carry *c)
{ nc_kt->stream_row(dst, src, n, c); }
static inline void nc_ln_apply_stream(const float *s, float *y, const float *w, const float *b,
                                      ptrdiff_t n, float mhi, float mlo, float scale,
                                      nc_carry *c)
{ nc_kt->ln_apply_stream(s, y, w, b, n, mhi, mlo, scale, c); }
static inline void nc_stream_fused(nc_fuse *f) { nc_kt->stream_fused(f); }
static inline void nc_affine_scalar_stream(const float *x, float *y, ptrdiff_t n, float m,
                                           float a, float b, int centred, nc_carry *c)
{ nc_kt->affine_scalar_stream(x, y, n, m, a, b, centred, c); }
static inline void nc_affine_rows_stream(const float *x, float *y, const float *m2,
                                         const float *a2, const float *b2, ptrdiff_t n,
                                         ptrdiff_t nrows, nc_carry *c)
{ nc_kt->affine_rows_stream(x, y, m2, a2, b2, n, nrows, c); }
static inline void nc_scale_apply_stream(const float *s, float *y, const float *w, ptrdiff_t n,
                                         float scale, nc_carry *c)
{ nc_kt->scale_apply_stream(s, y, w, n, scale, c); }
static inline void nc_stream_fence(void)
{
#if defined(__x86_64__)
    _mm_sfence();
#endif
}
/* kept for the modules' import-time call */
static void nc_stream_init(void) { nc_dispatch_init(); }
static inline void nc_ops_act_row(const float *x, const float *bias, const float *res,
                                  float *out, ptrdiff_t n, int act)
{ nc_kt->act_row(x, bias, res, out, n, act); }
static inline void nc_ops_exp_row(const float *x, float *out, ptrdiff_t n)
{ nc_kt->exp_row(x, out, n); }
static inline void nc_ops_softmax_row(const float *x, float *out, ptrdiff_t n, float scale,
                                      const float *mask, const uint8_t *kpm, ptrdiff_t limit)
{ nc_kt->softmax_row(x, out, n, scale, mask, kpm, limit); }
/* two rows of the same length at once (the same results as two nc_ops_softmax_row) */
static inline void nc_ops_softmax_row2(const float *x0, const float *x1, float *out0,
                                       float *out1, ptrdiff_t n, float scale,
                                       const float *mask0, const float *mask1,
                                       const uint8_t *kpm0, const uint8_t *kpm1,
                                       ptrdiff_t limit0, ptrdiff_t limit1)
{ nc_kt->softmax_row2(x0, x1, out0, out1, n, scale, mask0, mask1, kpm0, kpm1, limit0, limit1); }
#define nc_ops_isa nc_isa
static inline void nc_gemm_run(const float *x, ptrdiff_t ldx, const float *wp, ptrdiff_t N,
                               ptrdiff_t K, const float *bias, const float *res, ptrdiff_t ldr,
                               float *y, ptrdiff_t ldy, int act, ptrdiff_t m0, ptrdiff_t m1,
                               ptrdiff_t p0, ptrdiff_t p1, ptrdiff_t pnext)
{ nc_kt->gemm_run(x, ldx, wp, N, K, bias, res, ldr, y, ldy, act, m0, m1, p0, p1, pnext); }
static inline void nc_gemm_pack(const float *w, ptrdiff_t ldw, ptrdiff_t N, ptrdiff_t K,
                                float *wp)
{ nc_kt->gemm_pack(w, ldw, N, K, wp); }
static inline ptrdiff_t nc_gemm_nr(void) { return nc_kt->gemm_nr(); }
static inline double nc_fma_loop(ptrdiff_t iters) { return nc_kt->fma_loop(iters); }
static inline ptrdiff_t nc_gemm_kc(ptrdiff_t K) { return nc_kt->gemm_kc(K); }
static inline long nc_l1d(void) { return nc_l1d_bytes; }
/* the GEMM's row block for `rows` rows (equal blocks of at most MC, see nc_gemm_kern.h) */
static inline ptrdiff_t nc_gemm_mc(ptrdiff_t K, ptrdiff_t rows) { return nc_kt->gemm_mc(K, rows); }
static inline ptrdiff_t nc_gemm_mr(void) { return nc_kt->gemm_mr(); }
static inline void nc_attention_head(const float *q, ptrdiff_t ldq, const float *bq,
                                     const float *kt, ptrdiff_t ldk, const float *v, ptrdiff_t ldv, float *out,
                                     ptrdiff_t ldo, ptrdiff_t L, ptrdiff_t dh, ptrdiff_t klen,
                                     int causal, const float *mask, ptrdiff_t ldm,
                                     const uint8_t *kpm, float *scores)
{ nc_kt->attention_head(q, ldq, bq, kt, ldk, v, ldv, out, ldo, L, dh, klen, causal, mask, ldm, kpm,
                        scores); }

#endif /* NC_API_H */

/*
 * normcy's one SIMD vocabulary.
 *
 * Every C kernel of normcy (norms, BatchNorm, softmax, activations, GEMM, attention) is
 * written once against the names defined here and compiled once per instruction set by
 * nc_api.h, which includes the kernel bodies several times inside
 * `#pragma GCC target(...)` regions with a different NC_VBYTES each time:
 *
 *   variant   target               NC_VBYTES  lanes (NC_VW)  vector registers
 *   avx512    arch=x86-64-v4       64         16             32 x zmm
 *   avx2      arch=x86-64-v3       32          8             16 x ymm (+ FMA)
 *   baseline  default (SSE2/NEON)  16          4             16 x xmm (32 x q on NEON)
 *
 * The vector is always one native register.  GCC lowers wider generic vectors (the former
 * 64-byte vectors on AVX2) through the stack: broadcasts built element by element, spills
 * of half-registers, store-forwarding stalls; that made the AVX2 row kernels ~5x slower
 * than the hardware allows.  Kernels unroll by NC_UNROLL vectors with that many
 * independent accumulators per sum (short dependency chains; 2 x NC_UNROLL accumulators
 * plus a shift and NC_UNROLL loads stay within 16 registers).
 *
 * This header is included once per variant: NC_VBYTES and NC_SFX (the variant's name
 * suffix) must be defined; NC_FN(name) gives the variant's name of a function.
 * nc_simd_end.h undefines the short names again.  Only GCC/Clang vector extensions are
 * used, plus x86 intrinsics where GCC has no generic form (streaming stores, masked tail
 * loads, MAXPS/MINPS, FMA); no -ffast-math, and no implicit FMA contraction
 * (-ffp-contract=off): fused multiply-adds are written explicitly with ncv_fma (below).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#ifndef NC_SIMD_TYPES_DONE
#define NC_SIMD_TYPES_DONE
typedef ptrdiff_t nc_int;
typedef float nc_vf64 __attribute__((vector_size(64)));
typedef float nc_vf32 __attribute__((vector_size(32)));
typedef float nc_vf16 __attribute__((vector_size(16)));
typedef float nc_vf8 __attribute__((vector_size(8)));
typedef int32_t nc_vi64 __attribute__((vector_size(64)));
typedef int32_t nc_vi32 __attribute__((vector_size(32)));
typedef int32_t nc_vi16 __attribute__((vector_size(16)));
typedef double nc_vd64 __attribute__((vector_size(64)));
typedef double nc_vd32 __attribute__((vector_size(32)));
typedef double nc_vd16 __attribute__((vector_size(16)));
typedef uint8_t nc_vb16 __attribute__((vector_size(16)));
typedef uint8_t nc_vb8 __attribute__((vector_size(8)));
typedef uint8_t nc_vb4 __attribute__((vector_size(4)));
typedef uint16_t nc_vh32 __attribute__((vector_size(32)));
typedef uint16_t nc_vh16 __attribute__((vector_size(16)));
typedef uint16_t nc_vh8 __attribute__((vector_size(8)));
#define NC_CAT_(a, b) a##_##b
#define NC_CAT(a, b) NC_CAT_(a, b)
#define NC_INLINE static inline __attribute__((always_inline))
/* a loop with a small constant trip count (at most 16) unrolled whole, so that arrays
   indexed by its counter (a micro-tile's accumulators, a lockstep group's vectors) become
   registers.  Clang does not honour GCC's pragma there and kept them in memory (the GEMM
   and the exact GELU ran 3-4x slower) */
#if defined(__clang__)
#define NC_UNROLL_ALL _Pragma("clang loop unroll(full)")
#else
#define NC_UNROLL_ALL _Pragma("GCC unroll 16")
#endif
/* the vector helpers are always inlined: no ABI is crossed */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define NC_FN(name) NC_CAT(name, NC_SFX)

#if NC_VBYTES == 64
#define NC_VW 16
#define ncv nc_vf64
#define nciv nc_vi64
#define nchv nc_vf32   /* half a vector: NC_VW/2 floats, widened to ncdv */
#define ncdv nc_vd64
#define ncbv nc_vb16
#define nchwv nc_vh32
#elif NC_VBYTES == 32
#define NC_VW 8
#define ncv nc_vf32
#define nciv nc_vi32
#define nchv nc_vf16
#define ncdv nc_vd32
#define ncbv nc_vb8
#define nchwv nc_vh16
#elif NC_VBYTES == 16
#define NC_VW 4
#define ncv nc_vf16
#define nciv nc_vi16
#define nchv nc_vf8
#define ncdv nc_vd16
#define ncbv nc_vb4
#define nchwv nc_vh8
#else
#error "NC_VBYTES must be 64, 32 or 16"
#endif
#define NC_UNROLL 4
#define NC_BLK (NC_UNROLL * NC_VW)

/* Elements before p reaches a vector-size boundary (p is float-aligned), at most len:
   loops peel these so the vector body's stores never split cache lines. */
#define NC_PEEL(p, len) ({ nc_int _h = (nc_int)(((NC_VBYTES - ((uintptr_t)(p) & (NC_VBYTES - 1))) \
                                                 & (NC_VBYTES - 1)) / 4u); _h < (len) ? _h : (len); })

#define ncv_ld NC_FN(ncv_ld)
#define ncv_st NC_FN(ncv_st)
#define ncv_set1 NC_FN(ncv_set1)
#define ncv_seti NC_FN(ncv_seti)
#define ncv_sel NC_FN(ncv_sel)
#define ncv_abs NC_FN(ncv_abs)
#define ncv_max NC_FN(ncv_max)
#define ncv_min NC_FN(ncv_min)
#define ncv_sel_sign NC_FN(ncv_sel_sign)
#define ncv_hsum NC_FN(ncv_hsum)
#define ncv_hmax NC_FN(ncv_hmax)
#define ncv_ld_half_d NC_FN(ncv_ld_half_d)
#define ncdv_hsum NC_FN(ncdv_hsum)
#define ncv_bytes_nonzero NC_FN(ncv_bytes_nonzero)
#define ncv_iota NC_FN(ncv_iota)
#define ncv_stream NC_FN(ncv_stream)
#define ncv_ld_n NC_FN(ncv_ld_n)
#define ncv_st_n NC_FN(ncv_st_n)
#define ncv_fma NC_FN(ncv_fma)
#define ncdv_fma NC_FN(ncdv_fma)
#define nc_fmaf NC_FN(nc_fmaf)
#define nc_fma NC_FN(nc_fma)

/*
 * Fused multiply-add: ncv_fma(a, b, c) = a * b + c per lane, rounded once where the variant
 * has FMA (AVX2, AVX-512, aarch64; NC_HAS_FMA), a multiplication and an addition (two
 * roundings) where it has none (SSE2); ncdv_fma for double lanes, nc_fmaf / nc_fma for
 * scalars, the same rule.  normcy compiles with -ffp-contract=off, so the compiler never
 * fuses on its own: every fused operation is written with these, and a result's bits
 * depend on the source and the variant only.  (With GCC's default contraction, which
 * a * b + c became one FMA was the compiler's choice, made separately for every inlined
 * copy of a function and differently by different GCC versions: a newer GCC broke the
 * bit-identity of an attention row computed in a pair and alone.)  Subtractions are
 * written as fma(-a, b, c) or fma(a, b, -c): negation is exact.
 */
#if defined(__FMA__) || defined(__aarch64__) || (defined(NC_VARIANT_FMA) && NC_VARIANT_FMA)
#define NC_HAS_FMA 1
#else
#define NC_HAS_FMA 0
#endif
NC_INLINE ncv ncv_fma(ncv a, ncv b, ncv c)
{
#if defined(__x86_64__) && NC_VW == 16
    return (ncv)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__x86_64__) && NC_VW == 8 && NC_HAS_FMA
    return (ncv)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__x86_64__) && NC_VW == 4 && NC_HAS_FMA
    return (ncv)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
#elif defined(__aarch64__) && NC_VW == 4
    return (ncv)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
    return a * b + c;
#endif
}
NC_INLINE ncdv ncdv_fma(ncdv a, ncdv b, ncdv c)
{
#if defined(__x86_64__) && NC_VW == 16
    return (ncdv)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(__x86_64__) && NC_VW == 8 && NC_HAS_FMA
    return (ncdv)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#elif defined(__x86_64__) && NC_VW == 4 && NC_HAS_FMA
    return (ncdv)_mm_fmadd_pd((__m128d)a, (__m128d)b, (__m128d)c);
#elif defined(__aarch64__) && NC_VW == 4
    return (ncdv)vfmaq_f64((float64x2_t)c, (float64x2_t)a, (float64x2_t)b);
#else
    return a * b + c;
#endif
}
NC_INLINE float nc_fmaf(float a, float b, float c)
{
#if NC_HAS_FMA
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}
NC_INLINE double nc_fma(double a, double b, double c)
{
#if NC_HAS_FMA
    return __builtin_fma(a, b, c);
#else
    return a * b + c;
#endif
}

NC_INLINE ncv ncv_ld(const float *p) { ncv v; memcpy(&v, p, sizeof v); return v; }
NC_INLINE void ncv_st(float *p, ncv v) { memcpy(p, &v, sizeof v); }
/* The partial last vector of a row: m floats, 0 <= m < NC_VW.  ncv_ld_n reads p[0..m)
   into the low lanes (the others hold fill) and never touches p[m..); ncv_st_n writes
   lanes [0, m) to p[0..m).  Masked loads on AVX2/AVX-512; elsewhere, and for AVX2 stores
   (VMASKMOVPS stores are microcoded on AMD), copies of constant size by the bits of m,
   which GCC inlines (a variable-size memcpy is a library call per tail). */
#define NC_COPY_BITS(dst, src, m)                                                     \
    do {                                                                              \
        nc_int _o = 0;                                                                \
        if (NC_VW > 8 && ((m) & 8)) { memcpy((dst) + _o, (src) + _o, 32); _o += 8; }  \
        if (NC_VW > 4 && ((m) & 4)) { memcpy((dst) + _o, (src) + _o, 16); _o += 4; }  \
        if ((m) & 2) { memcpy((dst) + _o, (src) + _o, 8); _o += 2; }                  \
        if ((m) & 1) { memcpy((dst) + _o, (src) + _o, 4); }                           \
    } while (0)
NC_INLINE ncv ncv_ld_n(const float *p, nc_int m, float fill)
{
#if defined(__x86_64__) && NC_VW == 16
    return (ncv)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), (__mmask16)((1u << m) - 1u), p);
#elif defined(__x86_64__) && NC_VW == 8
    const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)m),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return (ncv)_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, k),
                                 _mm256_castsi256_ps(k));
#else
    float t[NC_VW];
    ncv v = fill - (ncv){0};
    memcpy(t, &v, sizeof t);
    NC_COPY_BITS(t, p, m);
    memcpy(&v, t, sizeof v);
    return v;
#endif
}
NC_INLINE void ncv_st_n(float *p, ncv v, nc_int m)
{
#if defined(__x86_64__) && NC_VW == 16
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << m) - 1u), (__m512)v);
#else
    float t[NC_VW];
    memcpy(t, &v, sizeof t);
    NC_COPY_BITS(p, t, m);
#endif
}

/* a - 0 keeps every value, -0 included, and compiles to one broadcast */
NC_INLINE ncv ncv_set1(float a) { return a - (ncv){0}; }
NC_INLINE nciv ncv_seti(int32_t a) { return a - (nciv){0}; }
/* m lanes are all-ones (-1) or zero */
NC_INLINE ncv ncv_sel(nciv m, ncv a, ncv b) { return (ncv)(((nciv)a & m) | ((nciv)b & ~m)); }
NC_INLINE ncv ncv_abs(ncv a) { return (ncv)((nciv)a & ncv_seti(0x7fffffff)); }
/* ncv_max(a, b) = a > b ? a : b and ncv_min(a, b) = a < b ? a : b per lane (b where either
   is NaN): exactly the x86 MAXPS / MINPS rules, which GCC does not pattern-match for
   vectors, hence the intrinsics there (NC_MAXMIN_PS: that variant's register type and
   intrinsic prefix) */
#if defined(__x86_64__) && NC_VW == 16
#define NC_MAXMIN_PS(OP, a, b) (ncv)_mm512_##OP##_ps((__m512)(a), (__m512)(b))
#elif defined(__x86_64__) && NC_VW == 8
#define NC_MAXMIN_PS(OP, a, b) (ncv)_mm256_##OP##_ps((__m256)(a), (__m256)(b))
#elif defined(__x86_64__) && NC_VW == 4
#define NC_MAXMIN_PS(OP, a, b) (ncv)_mm_##OP##_ps((__m128)(a), (__m128)(b))
#endif
#ifdef NC_MAXMIN_PS
NC_INLINE ncv ncv_max(ncv a, ncv b) { return NC_MAXMIN_PS(max, a, b); }
NC_INLINE ncv ncv_min(ncv a, ncv b) { return NC_MAXMIN_PS(min, a, b); }
#else
NC_INLINE ncv ncv_max(ncv a, ncv b) { return ncv_sel(a > b, a, b); }
NC_INLINE ncv ncv_min(ncv a, ncv b) { return ncv_sel(a < b, a, b); }
#endif

/* a where the sign bit of s is set, else b (the sign of -0 and of NaNs counts): one
   BLENDVPS on AVX/AVX2, which reads only the sign bits; a shift and a select elsewhere */
NC_INLINE ncv ncv_sel_sign(ncv s, ncv a, ncv b)
{
#if defined(__x86_64__) && NC_VW == 8
    return (ncv)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)s);
#else
    return ncv_sel((nciv)s >> 31, a, b);
#endif
}

/* Horizontal sum with a fixed tree order (halves, then pairs), returned in double.
   Deterministic for a given variant; short dependency chain. */
NC_INLINE double ncv_hsum(ncv a)
{
#if NC_VW == 16
    nc_vf32 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7)
              + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    ncv b = a;
#endif
#if NC_VW >= 8
    nc_vf16 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
#else
    nc_vf16 c = b;
#endif
    return (double)((c[0] + c[2]) + (c[1] + c[3]));
}

NC_INLINE float ncv_hmax(ncv a)
{
#if NC_VW == 16
    nc_vf32 lo8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7);
    nc_vf32 hi8 = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    nc_vf32 b = (nc_vf32)(((nc_vi32)lo8 & (lo8 > hi8)) | ((nc_vi32)hi8 & ~(lo8 > hi8)));
#else
    ncv b = a;
#endif
#if NC_VW >= 8
    nc_vf16 l4 = __builtin_shufflevector(b, b, 0, 1, 2, 3), h4 = __builtin_shufflevector(b, b, 4, 5, 6, 7);
    nc_vf16 c = (nc_vf16)(((nc_vi16)l4 & (l4 > h4)) | ((nc_vi16)h4 & ~(l4 > h4)));
#else
    nc_vf16 c = b;
#endif
    float m0 = c[0] > c[2] ? c[0] : c[2], m1 = c[1] > c[3] ? c[1] : c[3];
    return m0 > m1 ? m0 : m1;
}

/* NC_VW/2 floats widened to one double vector of the same register width */
NC_INLINE ncdv ncv_ld_half_d(const float *p)
{
    nchv h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, ncdv);
}

NC_INLINE double ncdv_hsum(ncdv a)
{
    double t[NC_VW / 2];
    memcpy(t, &a, sizeof t);
    for (int w = NC_VW / 4; w >= 1; w >>= 1)
        for (int k = 0; k < w; k++) t[k] += t[k + w];
    return t[0];
}

/* NC_VW bytes -> int32 lanes, all-ones where the byte is non-zero (two widening steps:
 * GCC lowers a direct u8 -> i32 conversion to scalar code) */
NC_INLINE nciv ncv_bytes_nonzero(const uint8_t *p)
{
    ncbv b;
    memcpy(&b, p, sizeof b);
    nchwv h = __builtin_convertvector(b, nchwv);
    return __builtin_convertvector(h, nciv) != ncv_seti(0);
}

NC_INLINE nciv ncv_iota(void)
{
#if NC_VW == 16
    return (nciv){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#elif NC_VW == 8
    return (nciv){0, 1, 2, 3, 4, 5, 6, 7};
#else
    return (nciv){0, 1, 2, 3};
#endif
}

/* streaming (non-temporal) store of one vector to a NC_VBYTES-aligned address */
NC_INLINE void ncv_stream(float *p, ncv v)
{
#if defined(__x86_64__) && NC_VW == 16
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__x86_64__) && NC_VW == 8
    _mm256_stream_ps(p, (__m256)v);
#elif defined(__x86_64__)
    _mm_stream_ps(p, (__m128)v);
#else
    ncv_st(p, v);
#endif
}

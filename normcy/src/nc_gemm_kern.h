/*
 * normcy packed-weight GEMM and fused attention: y = act(x @ W^T + b) (+ residual).
 *
 * Written once against nc_simd.h and compiled once per SIMD variant by nc_api.h (no include
 * guard on purpose; names go through NC_FN).  No validation here: the Cython boundary
 * (normcy/_gemm.pyx) checks shapes, strides, dtypes and aliasing once.
 *
 * Packed layout (made once, at model load, by nc_gemm_pack)
 * ---------------------------------------------------------
 * W is (N, K) row-major, torch.nn.Linear's layout.  It is cut into ceil(N / NC_NR) column
 * panels of NC_NR = 2 vectors; panel p holds, for k = 0..K-1, the NC_NR weights
 * W[p*NC_NR + j, k] (j = 0..NC_NR-1) contiguously (zeros past N).  The micro-kernel streams a
 * panel linearly: two aligned vector loads per k.  The layout depends on the variant's
 * vector width, so a packed matrix records the NC_NR it was packed for.
 *
 * Micro-kernel: NC_MR rows x NC_NR columns, 2 * NC_MR vector accumulators in registers
 * (AVX2: 6 x 16, 12 ymm accumulators + 2 panel loads + 1 broadcast = 15 of 16 registers;
 * AVX-512: 8 x 32, 16 + 3 of 32 zmm; baseline: 6 x 8 in 15 of 16 xmm).  The row count is
 * bounded by the general registers too: each row of x needs an address register (GCC
 * spilled the accumulators of a 12 x 32 AVX-512 tile to the stack).  Every k step loads
 * the panel's two vectors once and broadcasts one x value per row: 2 * NC_MR FMAs per
 * 2 + NC_MR loads.
 *
 * Cache blocking
 * --------------
 * - K is cut into blocks of KC <= 6144 / NC_NR (24 KB of a panel: AVX2 384, AVX-512 192;
 *   equal blocks, a multiple of 8; twice that with an L1 of 48 KB or more, see
 *   nc_gemm_kc): the panel's KC x NC_NR slice stays in a 32 KB L1 for
 *   all the micro-tiles of a row block, while the tiles' rows of x stream through it (each
 *   cache line of x serves 16 consecutive k, then is not needed again by that tile).  The
 *   earlier 16 KB bound also kept a tile's NC_MR x KC floats of x resident, which nothing
 *   reuses; at K = 384 it cost a second K block (store and reload of the accumulators):
 *   3-4% of the single-thread rate on the AMD EPYC (M = 4096, best of 9).  Partial sums
 *   of a tile go to y between K blocks and are loaded back into the accumulators, so each
 *   output element is still one sequential FMA chain over k in order (storing and
 *   reloading a float accumulator is exact).
 * - Rows are taken in blocks of MC rows: MC x K floats of x fit in about 256 KB (half of
 *   a 512 KB - 2 MB L2), so a row block stays in L2 while every panel is streamed against
 *   it once, K block by K block, each slice reused by all MC / NC_MR micro-tiles of the
 *   block from L1; the tiles' partial sums (MC x NC_NR floats) stay in L1/L2 between the
 *   K blocks of a panel.
 * - Few rows (M <= MC): each panel is read once per call, from memory or L3: the weights
 *   are the traffic, which is why they are packed once and never again.
 *
 * Determinism
 * -----------
 * Output element (i, j) is acc = fma(x[i,k], W[j,k], acc) for k = 0..K-1 in order (ncv_fma:
 * one rounding on AVX2 / AVX-512, a multiplication and an addition on SSE2), then
 * the epilogue: y = act(acc + b[j]) (+ r[i,j]).  The micro-tile height, the row block,
 * the thread that computes it and the other rows in the call do not change any of these
 * operations, so results are bit-identical for every thread count and every batch
 * composition (batch invariance).  NaN and Inf propagate as in any sum of products.
 */
#define NC_NR (2 * NC_VW)
#if NC_VW == 16
#define NC_MR 8
#else
#define NC_MR 6
#endif

/* software prefetch distance along a packed panel (bytes) */
#ifndef NC_PF_BYTES
#define NC_PF_BYTES 1024
#endif

#define nc_gemm_epi NC_FN(nc_gemm_epi)
#define nca_qk NC_FN(nca_qk)
#define nca_qk2 NC_FN(nca_qk2)
#define nca_pv NC_FN(nca_pv)

/* y = act(acc + bias) (+ res) for one vector of one row; nv = valid lanes (< NC_VW: tail) */
NC_INLINE void nc_gemm_epi(ncv acc, const float *bias, const float *res, float *y, int act,
                           nc_int nv)
{
    if (nv >= NC_VW) {
        if (bias) acc = acc + ncv_ld(bias);
        acc = nco_apply_act(acc, act);
        if (res) acc = acc + ncv_ld(res);
        ncv_st(y, acc);
    } else if (nv > 0) {
        /* the partial last vector through the vocabulary's tail loads and stores */
        if (bias) acc = acc + ncv_ld_n(bias, nv, 0.0f);
        acc = nco_apply_act(acc, act);
        if (res) acc = acc + ncv_ld_n(res, nv, 0.0f);
        ncv_st_n(y, acc, nv);
    }
}

/*
 * The micro-kernel: MR (<= NC_MR, a compile-time constant after inlining) rows of x at a
 * (row stride lda) times kc rows of one packed panel slice bp, accumulated onto cin
 * (MR x NC_NR floats, row stride ldi; NULL = start from zero) and stored to cout (row
 * stride ldo; may be cin).  Instantiated as one small non-inlined function per MR so that
 * the register allocator sees only the k loop (2 * MR accumulators stay in registers).
 */
NC_INLINE void NC_FN(nc_gemm_kloop)(const int MR, const int PF, const float *a, nc_int lda,
                                    const float *bp, nc_int ldb, nc_int kc, const float *cin,
                                    nc_int ldi, float *cout, nc_int ldo, const float *pfn,
                                    nc_int pstep)
{
    ncv c0[NC_MR], c1[NC_MR];
    NC_UNROLL_ALL
    for (int r = 0; r < MR; r++) {
        if (cin) { c0[r] = ncv_ld(cin + r * ldi); c1[r] = ncv_ld(cin + r * ldi + NC_VW); }
        else { c0[r] = ncv_set1(0.0f); c1[r] = ncv_set1(0.0f); }
    }
    for (nc_int k = 0; k < kc; k++) {
        const ncv b0 = ncv_ld(bp + k * ldb), b1 = ncv_ld(bp + k * ldb + NC_VW);
        if (PF == 1 || PF == 3) {
            /* the first tile of a panel block meets the panel cold (from memory or L3:
               with few rows the weights are the traffic): fetch it NC_PF_BYTES ahead, a
               cache line per line consumed; the tiles after it find the block in L1 */
            __builtin_prefetch(bp + k * NC_NR + NC_PF_BYTES / 4, 0, 3);
#if NC_NR * 4 > 64
            __builtin_prefetch(bp + k * NC_NR + NC_PF_BYTES / 4 + 16, 0, 3);
#endif
        }
        if (PF == 2 || PF == 3) {
            /* this tile's share of the slice the thread streams next, pstep floats per k,
               into L2: the memory traffic of the next block overlaps this block's compute
               instead of stalling the next block's first tile */
            __builtin_prefetch(pfn + k * pstep, 0, 2);
        }
        NC_UNROLL_ALL
        for (int r = 0; r < MR; r++) {
            const ncv av = ncv_set1(a[r * lda + k]);
            c0[r] = ncv_fma(av, b0, c0[r]);
            c1[r] = ncv_fma(av, b1, c1[r]);
        }
    }
    NC_UNROLL_ALL
    for (int r = 0; r < MR; r++) {
        ncv_st(cout + r * ldo, c0[r]);
        ncv_st(cout + r * ldo + NC_VW, c1[r]);
    }
}

/* one non-inlined micro-kernel per tile height R and prefetch mode PF (name prefix P) */
#define NC_GEMM_KFN(P, R, PF)                                                             \
    static __attribute__((noinline)) void NC_FN(nc_gemm_##P##R)(                          \
        const float *a, nc_int lda, const float *bp, nc_int kc, const float *cin,         \
        nc_int ldi, float *cout, nc_int ldo, const float *pfn, nc_int pstep)              \
    { NC_FN(nc_gemm_kloop)(R, PF, a, lda, bp, NC_NR, kc, cin, ldi, cout, ldo, pfn, pstep); }
/* the same micro-kernel over a B whose k rows are ldb floats apart (not a packed panel:
   attention's K^T and V in place), from zero, no prefetch (name prefix s) */
#define NC_GEMM_SFN(R)                                                                    \
    static __attribute__((noinline)) void NC_FN(nc_gemm_s##R)(                            \
        const float *a, nc_int lda, const float *bp, nc_int ldb, nc_int kc, float *cout,  \
        nc_int ldo)                                                                       \
    { NC_FN(nc_gemm_kloop)(R, 0, a, lda, bp, ldb, kc, NULL, 0, cout, ldo, NULL, 0); }
#define NC_GEMM_KDEF(R)                                                                   \
    NC_GEMM_KFN(k, R, 0) NC_GEMM_KFN(kp, R, 1) NC_GEMM_KFN(kn, R, 2) NC_GEMM_KFN(kb, R, 3) \
    NC_GEMM_SFN(R)
NC_GEMM_KDEF(1) NC_GEMM_KDEF(2) NC_GEMM_KDEF(3) NC_GEMM_KDEF(4) NC_GEMM_KDEF(5)
NC_GEMM_KDEF(6)
#if NC_MR > 6
NC_GEMM_KDEF(7) NC_GEMM_KDEF(8)
#endif
#undef NC_GEMM_KDEF
#undef NC_GEMM_KFN
#undef NC_GEMM_SFN

/* the micro-kernels of prefix P by tile height: row[mr] for mr = 1..NC_MR */
#if NC_MR > 6
#define NC_KROW(P) {0, NC_FN(nc_gemm_##P##1), NC_FN(nc_gemm_##P##2), NC_FN(nc_gemm_##P##3),   \
                    NC_FN(nc_gemm_##P##4), NC_FN(nc_gemm_##P##5), NC_FN(nc_gemm_##P##6),   \
                    NC_FN(nc_gemm_##P##7), NC_FN(nc_gemm_##P##8)}
#else
#define NC_KROW(P) {0, NC_FN(nc_gemm_##P##1), NC_FN(nc_gemm_##P##2), NC_FN(nc_gemm_##P##3),   \
                    NC_FN(nc_gemm_##P##4), NC_FN(nc_gemm_##P##5), NC_FN(nc_gemm_##P##6)}
#endif

typedef void (*NC_FN(nc_gemm_kfn))(const float *, nc_int, const float *, nc_int,
                                   const float *, nc_int, float *, nc_int, const float *,
                                   nc_int);

/*
 * One micro-tile of mr rows (1..NC_MR), k block [k0, k0+kc) of a panel with nv valid
 * columns.  first: start from zero, else continue from the partial sums stored in y;
 * last: apply the epilogue, else store the partial sums to y.
 */
static inline void NC_FN(nc_gemm_tile)(int mr, const float *a, nc_int lda, const float *bp,
                                       nc_int kc, const float *bias, const float *res,
                                       nc_int ldr, float *y, nc_int ldy, nc_int nv, int act,
                                       int first, int last, int pf, const float *pfn,
                                       nc_int pstep)
{
    /* k: no prefetch, kp: own slice ahead, kn: share of the next slice, kb: both */
    static const NC_FN(nc_gemm_kfn) kfs[4][NC_MR + 1] = {NC_KROW(k), NC_KROW(kp), NC_KROW(kn),
                                                         NC_KROW(kb)};
    /* pf: bit 0 = the tile's own slice ahead (first tile of a block), bit 1 = a share of
       the next slice (only with one) */
    const NC_FN(nc_gemm_kfn) *kf = kfs[pfn ? pf : pf & 1];
    float buf[NC_MR * NC_NR] __attribute__((aligned(64)));
    if (nv == NC_NR && !last) {
        /* whole panel, partial sums straight in y */
        kf[mr](a, lda, bp, kc, first ? NULL : y, ldy, y, ldy, pfn, pstep);
        return;
    }
    const float *cin = NULL;
    nc_int ldi = NC_NR;
    if (!first) {
        if (nv == NC_NR) {
            cin = y;
            ldi = ldy;
        } else {
            for (int r = 0; r < mr; r++) {
                memset(buf + r * NC_NR, 0, NC_NR * sizeof(float));
                memcpy(buf + r * NC_NR, y + r * ldy, (size_t)nv * sizeof(float));
            }
            cin = buf;
        }
    }
    kf[mr](a, lda, bp, kc, cin, ldi, buf, NC_NR, pfn, pstep);
    if (last && act != NCO_ACT_IDENTITY && nv == NC_NR) {
        /* activation over the whole tile at once: the row kernel keeps four vectors in
           flight (one vector at a time, GELU's ~100-cycle dependency chain was the cost of
           the epilogue); the same operations per element: (acc + b) -> act -> (+ r) */
        if (bias) {
            const ncv b0 = ncv_ld(bias), b1 = ncv_ld(bias + NC_VW);
            for (int r = 0; r < mr; r++) {
                ncv_st(buf + r * NC_NR, ncv_ld(buf + r * NC_NR) + b0);
                ncv_st(buf + r * NC_NR + NC_VW, ncv_ld(buf + r * NC_NR + NC_VW) + b1);
            }
        }
        NC_FN(nc_ops_act_row)(buf, NULL, NULL, buf, (nc_int)mr * NC_NR, act);
        for (int r = 0; r < mr; r++) {
            ncv v0 = ncv_ld(buf + r * NC_NR), v1 = ncv_ld(buf + r * NC_NR + NC_VW);
            if (res) {
                v0 = v0 + ncv_ld(res + r * ldr);
                v1 = v1 + ncv_ld(res + r * ldr + NC_VW);
            }
            ncv_st(y + r * ldy, v0);
            ncv_st(y + r * ldy + NC_VW, v1);
        }
    } else if (last) {
        for (int r = 0; r < mr; r++) {
            const float *rr = res ? res + r * ldr : NULL;
            nc_gemm_epi(ncv_ld(buf + r * NC_NR), bias, rr, y + r * ldy, act, nv);
            nc_gemm_epi(ncv_ld(buf + r * NC_NR + NC_VW), bias ? bias + NC_VW : NULL,
                        rr ? rr + NC_VW : NULL, y + r * ldy + NC_VW, act, nv - NC_VW);
        }
    } else {
        for (int r = 0; r < mr; r++) memcpy(y + r * ldy, buf + r * NC_NR, (size_t)nv * sizeof(float));
    }
}

/*
 * One row against P <= 4 whole panels at once (the GEMV case, M = 1): a 1 x NC_NR tile has
 * only two accumulator chains and is bound by the FMA latency; four panels give eight.
 * Full K from zero: each element is the same sequential FMA chain over k as in the tiles
 * above (which store and reload their partial sums exactly), so results are identical.
 * P < 4 takes the panels left over at the end of a thread's range (12 panels split 6 + 6
 * between two threads: 4 + 2 each, the 2 as one pair instead of two lone 1-row tiles).
 */
NC_INLINE void NC_FN(nc_gemv_body)(const int P, const float *a, const float *bp,
                                   nc_int pstride, nc_int K, float *out)
{
    ncv c[8];
    NC_UNROLL_ALL
    for (int u = 0; u < 2 * P; u++) c[u] = ncv_set1(0.0f);
    for (nc_int k = 0; k < K; k++) {
        const ncv av = ncv_set1(a[k]);
        NC_UNROLL_ALL
        for (int u = 0; u < P; u++) {
            c[2 * u] = ncv_fma(av, ncv_ld(bp + u * pstride + k * NC_NR), c[2 * u]);
            c[2 * u + 1] = ncv_fma(av, ncv_ld(bp + u * pstride + k * NC_NR + NC_VW), c[2 * u + 1]);
        }
    }
    NC_UNROLL_ALL
    for (int u = 0; u < 2 * P; u++) ncv_st(out + u * NC_VW, c[u]);
}

typedef void (*NC_FN(nc_gemv_fn))(const float *, const float *, nc_int, nc_int, float *);
#define NC_GEMV_FN(P)                                                                     \
    static __attribute__((noinline)) void NC_FN(nc_gemv##P)(                              \
        const float *a, const float *bp, nc_int pstride, nc_int K, float *out)            \
    {                                                                                     \
        NC_FN(nc_gemv_body)(P, a, bp, pstride, K, out);                                   \
    }
NC_GEMV_FN(1)
NC_GEMV_FN(2)
NC_GEMV_FN(3)
NC_GEMV_FN(4)
#undef NC_GEMV_FN

/* K block: KC x NC_NR floats of a panel, at most 24 KB (6144 floats: AVX2 KC <= 384,
   AVX-512 KC <= 192), equal blocks rounded up to a multiple of 8; the slice stays in a
   32 KB L1 for all the micro-tiles of a row block while their rows of x stream through
   (see "Cache blocking" in the header: a 16 KB bound, which also kept a tile's x
   resident, cost a second K block at K = 384 and 3-4% of the single-thread rate).  With
   an L1 of 48 KB or more, slices of up to 48 KB (AVX2 KC <= 768, AVX-512 KC <= 384):
   fewer blocks (fewer stores and reloads of the partial sums, fewer tile starts) were
   1-3% faster at K = 384-1536 on the AMD EPYC Zen 5 (48 KB L1), both variants, M = 512 -
   4096, one and two threads, though the slice then shares the L1 with x's rows. */
static nc_int NC_FN(nc_gemm_kc)(nc_int K)
{
    nc_int kcmax = (nc_l1d_bytes >= 49152 ? 12288 : 6144) / NC_NR;
    nc_int nkb = (K + kcmax - 1) / kcmax;
    nc_int kc = (K + nkb - 1) / nkb;
    return (kc + 7) & ~(nc_int)7;
}

/* The row block for `rows` rows: MC x K floats of x in ~256 KB of L2 (see the header),
   MC whole micro-tiles, and the rows cut into equal blocks of at most MC (510 rows: 3 x
   170, not 168 + 168 + 168 + 6: a small last block streams every panel for a few rows, at
   a fraction of the rate).  nc_gemm_run uses it, and so do callers that post-process rows
   (the fused norm epilogue), so that a block is still in cache when they come back to it. */
static nc_int NC_FN(nc_gemm_mc)(nc_int K, nc_int rows)
{
    nc_int mc = ((nc_int)65536 / (K > 0 ? K : 1)) / NC_MR * NC_MR;
    if (mc < NC_MR) mc = NC_MR;
    const nc_int nblk = (rows + mc - 1) / mc;
    return nblk > 0 ? (rows + nblk - 1) / nblk : mc;
}

/*
 * The epilogue of a whole panel's rows at once, for the GELUs without a residual: y holds
 * the accumulators of rows x NC_NR floats (row stride ldy); y = act(y + b).  One micro-tile
 * is 6-12 vectors, too few to hide the GELU's ~120-cycle chain (the exact GELU cost ~40
 * cycles per vector per tile, against ~27 on long rows: AMD EPYC); a row block's strip is
 * up to MC rows, which the software-pipelined loop takes NCO_NU vectors (NCO_NU / 2 rows) at
 * a time.  The same operations on every element as the per-tile epilogue (acc + b -> act;
 * the accumulator stored and reloaded exactly), so the same bits.
 */
#define NC_SV(base, ld, v) ((base) + ((v) >> 1) * (ld) + ((v) & 1) * NC_VW)
static void NC_FN(nc_gemm_strip_epi)(float *y, nc_int ldy, nc_int rows, const float *bias,
                                     int act)
{
    const int NU = NCO_NU;
    const nc_int RG = NCO_NU / 2;   /* rows per group of NCO_NU vectors */
    ncv bb[2];
    bb[0] = bias ? ncv_ld(bias) : ncv_set1(0.0f);
    bb[1] = bias ? ncv_ld(bias + NC_VW) : ncv_set1(0.0f);
    nc_int r = 0;
#define NC_SLD(rr, u) (bias ? ncv_ld(NC_SV(y + (rr) * ldy, ldy, u)) + bb[(u) & 1]            \
                            : ncv_ld(NC_SV(y + (rr) * ldy, ldy, u)))
    if (act == NCO_ACT_GELU && rows >= 2 * RG) {
        /* groups of RG rows, the pipeline of the row kernels (nc_ops_kern.h) */
        const nc_int ng = rows / RG;
#define NC_GLD(g, u) NC_SLD((g) * RG, u)
#define NC_GST(g, u, v) ncv_st(NC_SV(y + (g) * RG * ldy, ldy, u), v)
        NCO_GELU_PIPE(ng, NC_GLD, NC_GST);
#undef NC_GLD
#undef NC_GST
        r = ng * RG;
    } else if (act == NCO_ACT_GELU_TANH) {
        for (; r + RG <= rows; r += RG) {
            ncv v[NCO_NU];
            NCO_EACH v[u] = NC_SLD(r, u);
            nco_gelu_tanh_n(NU, v);
            NCO_EACH ncv_st(NC_SV(y + r * ldy, ldy, u), v[u]);
        }
    }
    for (; r < rows; r++) {
        /* the last rows: one row's two vectors in lockstep */
        ncv v[2] = {NC_SLD(r, 0), NC_SLD(r, 1)};
        if (act == NCO_ACT_GELU) nco_gelu_erf_n(2, v);
        else if (act == NCO_ACT_GELU_TANH) nco_gelu_tanh_n(2, v);
        else { v[0] = nco_apply_act(v[0], act); v[1] = nco_apply_act(v[1], act); }
        ncv_st(y + r * ldy, v[0]);
        ncv_st(y + r * ldy + NC_VW, v[1]);
    }
#undef NC_SLD
}
#undef NC_SV

/* rows [m0, m1) x panels [p0, p1) of y = act(x W^T + b) (+ r).  y must not alias r when
   K > nc_gemm_kc(K) (the caller copies r then): partial sums go through y.  pnext: the
   panel the calling thread will most likely work on after p1 - 1 (-1: none), whose first
   K block the last panel's tiles prefetch as they do the next panel inside the range. */
static void NC_FN(nc_gemm_run)(const float *x, nc_int ldx, const float *wp, nc_int N,
                               nc_int K, const float *bias, const float *res, nc_int ldr,
                               float *y, nc_int ldy, int act, nc_int m0, nc_int m1,
                               nc_int p0, nc_int p1, nc_int pnext)
{
    const nc_int kcb = NC_FN(nc_gemm_kc)(K);
    /* the GELUs without a residual: whole panels' tiles store their accumulators and the
       epilogue runs over the row block's strip (nc_gemm_strip_epi); with a residual, y may
       be the residual itself, which the tiles must read before they write */
    const int defer = (act == NCO_ACT_GELU || act == NCO_ACT_GELU_TANH) && !res;
    const nc_int mcb = NC_FN(nc_gemm_mc)(K, m1 - m0);
    for (nc_int i0 = m0; i0 < m1; i0 += mcb) {
        nc_int i1 = i0 + mcb < m1 ? i0 + mcb : m1;
        nc_int pstart = p0;
        if (i1 - i0 == 1) {
            /* a single row: up to four whole panels at a time (see nc_gemv_body); a
               partial last panel (N not a multiple of NC_NR) goes to the tiles below */
            static const NC_FN(nc_gemv_fn) gemv[5] = {NULL, NC_FN(nc_gemv1), NC_FN(nc_gemv2),
                                                      NC_FN(nc_gemv3), NC_FN(nc_gemv4)};
            float buf[4 * NC_NR] __attribute__((aligned(64)));
            const float *rr = res ? res + i0 * ldr : NULL;
            for (;;) {
                nc_int np = p1 - pstart < 4 ? p1 - pstart : 4;
                if ((pstart + np) * NC_NR > N) np--;
                if (np <= 0) break;
                gemv[np](x + i0 * ldx, wp + pstart * K * NC_NR, K * NC_NR, K, buf);
                for (int u = 0; u < 2 * np; u++) {
                    nc_int jj = pstart * NC_NR + u * NC_VW;
                    nc_gemm_epi(ncv_ld(buf + u * NC_VW), bias ? bias + jj : NULL,
                                rr ? rr + jj : NULL, y + i0 * ldy + jj, act, NC_VW);
                }
                pstart += np;
            }
        }
        for (nc_int p = pstart; p < p1; p++) {
            nc_int j0 = p * NC_NR;
            nc_int nv = N - j0 < NC_NR ? N - j0 : NC_NR;
            const float *bj = bias ? bias + j0 : NULL;
            const int dp = defer && nv == NC_NR;
            /* the K blocks of one panel back to back: the partial sums of the row block's
               tiles (MC x NC_NR floats) stay in L1/L2 between them */
            for (nc_int k0 = 0; k0 < K; k0 += kcb) {
                const nc_int kc = K - k0 < kcb ? K - k0 : kcb;
                const int first = k0 == 0, last = k0 + kc >= K;
                const float *bp = wp + p * K * NC_NR + k0 * NC_NR;
                /* tiles of balanced heights (20 rows: 5+5+5+5, not 6+6+6+2): a short tile
                   has too few accumulator chains to cover the FMA latency */
                const nc_int len = i1 - i0, ntl = (len + NC_MR - 1) / NC_MR;
                /* The slice this thread streams next (the panel's next K block, else the
                   next panel's first; after the last panel of the range, pnext's) is shared
                   out among the tiles of this block, which then find their own slice in L2:
                   with few rows (a row block of 1-3 tiles, M ~ 7-20) the first tile used
                   to wait on memory as long as the others computed.  A lone tile (M <= 6)
                   only prefetches its own slice ahead: adding the next slice made it 15%
                   slower (AMD EPYC, 6 x 1536 x 6144). */
                const float *nxt = !last ? bp + kc * NC_NR
                                 : p + 1 < p1 ? wp + (p + 1) * K * NC_NR
                                 : pnext >= 0 ? wp + pnext * K * NC_NR : NULL;
                const nc_int pstep = NC_NR / ntl > 0 ? NC_NR / ntl : 1;
                for (nc_int t = 0; t < ntl; t++) {
                    nc_int i = i0 + len * t / ntl, ie = i0 + len * (t + 1) / ntl;
                    const float *pfn = nxt && ntl > 1 ? nxt + t * kc * pstep : NULL;
                    NC_FN(nc_gemm_tile)((int)(ie - i), x + i * ldx + k0, ldx, bp, kc, bj,
                                        res ? res + i * ldr + j0 : NULL, ldr, y + i * ldy + j0,
                                        ldy, nv, act, first, last && !dp, t == 0 ? 3 : 2, pfn,
                                        pstep);
                }
                if (last && dp) NC_FN(nc_gemm_strip_epi)(y + i0 * ldy + j0, ldy, i1 - i0, bj, act);
            }
        }
    }
}

/* Pack W (N, K), row stride ldw, into panels (see the header); wp holds
   ceil(N / NC_NR) * K * NC_NR floats. */
static void NC_FN(nc_gemm_pack)(const float *w, nc_int ldw, nc_int N, nc_int K, float *wp)
{
    nc_int np = (N + NC_NR - 1) / NC_NR;
    for (nc_int p = 0; p < np; p++) {
        float *dst = wp + p * K * NC_NR;
        for (nc_int j = 0; j < NC_NR; j++) {
            nc_int n = p * NC_NR + j;
            if (n < N) {
                const float *src = w + n * ldw;
                for (nc_int k = 0; k < K; k++) dst[k * NC_NR + j] = src[k];
            } else {
                for (nc_int k = 0; k < K; k++) dst[k * NC_NR + j] = 0.0f;
            }
        }
    }
}

/* FP32 FMA-throughput probe for the bench: 12 independent vector FMA chains (enough to
   cover 4-5 cycles of latency on two FMA pipes), iters steps; 2 * 12 * NC_VW * iters
   flops.  Returns a value derived from every chain so that nothing is optimized away. */
static double NC_FN(nc_fma_loop)(nc_int iters)
{
    ncv a[12];
    const ncv m = ncv_set1(0.999999f), c = ncv_set1(1e-7f);
    NC_UNROLL_ALL
    for (int j = 0; j < 12; j++) a[j] = ncv_set1(1.0f + 0.001f * (float)j);
    for (nc_int i = 0; i < iters; i++) {
        NC_UNROLL_ALL
        for (int j = 0; j < 12; j++) a[j] = ncv_fma(a[j], m, c);
        __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]));
    }
    ncv t = a[0];
    NC_UNROLL_ALL
    for (int j = 1; j < 12; j++) t = t + a[j];
    return ncv_hsum(t);
}

static nc_int NC_FN(nc_gemm_nr)(void) { return NC_NR; }
static nc_int NC_FN(nc_gemm_mr)(void) { return NC_MR; }

/*
 * Attention for one (sequence, head): q (L x dh, row stride ldq, already scaled),
 * kt (dh x L, row stride ldk: keys transposed), v (L x dh, row stride ldv), out (L x dh,
 * row stride ldo).  Keys j >= klen are masked (padding), and j > i too when causal;
 * mask (L x L, row stride ldm, additive) and kpm (L bytes, non-zero = masked key) may be
 * NULL; bq (dh floats, may be NULL) is added to every row of q.  ldk is a multiple of
 * 4 * NC_VW (>= L): the score loops read K^T in whole vectors, lanes past L included
 * (their scores are computed and never used), so short sequences need no partial loads;
 * scores is scratch of >= NC_MR * (ldk + dh) floats.  Row i: s = q_i K^T (one FMA chain per
 * key over d in order), p = softmax(s) (the softmax row kernel), out_i = sum_j p_j v_j:
 * without a causal or an additive mask (nc_attention_head -> nca_tiles, dh a multiple of
 * NC_NR) one FMA chain over j in order; otherwise (the row-pair loop of
 * nc_attention_head) two interleaved chains over j, added at the end.  Either way the
 * result of a row does not depend on the other rows, threads or the batch (which path
 * runs depends on the masks and dh only).
 */
/* scores[j] = q_i . k_j for j < ncols: one FMA chain over d in order per score */
NC_INLINE void nca_qk(const float *qi, const float *kt, nc_int ldk, nc_int dh, nc_int ncols,
                      float *scores)
{
    nc_int j = 0;
    /* eight key vectors per pass: eight independent FMA chains over d (one or two
       were latency-bound); each score is still one chain over d in order */
    for (; j + 8 * NC_VW <= ncols; j += 8 * NC_VW) {
        ncv sc[8];
        NC_UNROLL_ALL
        for (int u = 0; u < 8; u++) sc[u] = ncv_set1(0.0f);
        for (nc_int d = 0; d < dh; d++) {
            const ncv qd = ncv_set1(qi[d]);
            const float *kr = kt + d * ldk + j;
            NC_UNROLL_ALL
            for (int u = 0; u < 8; u++) sc[u] = ncv_fma(qd, ncv_ld(kr + u * NC_VW), sc[u]);
        }
        NC_UNROLL_ALL
        for (int u = 0; u < 8; u++) ncv_st(scores + j + u * NC_VW, sc[u]);
    }
    for (; j + 2 * NC_VW <= ncols; j += 2 * NC_VW) {
        ncv s0 = ncv_set1(0.0f), s1 = ncv_set1(0.0f);
        for (nc_int d = 0; d < dh; d++) {
            const ncv qd = ncv_set1(qi[d]);
            s0 = ncv_fma(qd, ncv_ld(kt + d * ldk + j), s0);
            s1 = ncv_fma(qd, ncv_ld(kt + d * ldk + j + NC_VW), s1);
        }
        ncv_st(scores + j, s0);
        ncv_st(scores + j + NC_VW, s1);
    }
    for (; j < ncols; j += NC_VW) {
        /* the last, partial vector: K^T rows are padded to whole vectors (ldk) */
        ncv s0 = ncv_set1(0.0f);
        for (nc_int d = 0; d < dh; d++) s0 = ncv_fma(ncv_set1(qi[d]), ncv_ld(kt + d * ldk + j), s0);
        ncv_st(scores + j, s0);   /* the score rows are ldk floats long */
    }
}

/* nca_qk for two query rows at once: every K^T vector loaded serves both rows (the QK
   sweep over K^T is the L1/L2 traffic of attention); the same chain per score, so the
   same bits as two nca_qk calls.  The last block may run past ncols into K^T's padding
   (ldk is a multiple of 4 * NC_VW), so a short row is one block of eight chains. */
NC_INLINE void nca_qk2(const float *qa, const float *qb, const float *kt, nc_int ldk,
                       nc_int dh, nc_int ncols, float *sa, float *sb)
{
    nc_int j = 0;
    for (; j < ncols; j += 4 * NC_VW) {
        ncv a[4], b[4];
        NC_UNROLL_ALL
        for (int u = 0; u < 4; u++) { a[u] = ncv_set1(0.0f); b[u] = ncv_set1(0.0f); }
        for (nc_int d = 0; d < dh; d++) {
            const ncv qad = ncv_set1(qa[d]), qbd = ncv_set1(qb[d]);
            const float *kr = kt + d * ldk + j;
            NC_UNROLL_ALL
            for (int u = 0; u < 4; u++) {
                const ncv k = ncv_ld(kr + u * NC_VW);
                a[u] = ncv_fma(qad, k, a[u]);
                b[u] = ncv_fma(qbd, k, b[u]);
            }
        }
        NC_UNROLL_ALL
        for (int u = 0; u < 4; u++) {
            ncv_st(sa + j + u * NC_VW, a[u]);
            ncv_st(sb + j + u * NC_VW, b[u]);
        }
    }
}

/* out_i = sum_j p_j v_j over j < lim */
NC_INLINE void nca_pv(const float *scores, const float *v, nc_int ldv, nc_int dh, nc_int lim,
                      float *oi)
{
    nc_int d = 0;
    /* up to four d vectors at once, even and odd keys in separate accumulators (the
       same two sums as below, eight chains in flight) */
    for (; d + 4 * NC_VW <= dh; d += 4 * NC_VW) {
        ncv oe[4], oo[4];
        NC_UNROLL_ALL
        for (int u = 0; u < 4; u++) { oe[u] = ncv_set1(0.0f); oo[u] = ncv_set1(0.0f); }
        nc_int jj = 0;
        for (; jj + 2 <= lim; jj += 2) {
            const ncv p0 = ncv_set1(scores[jj]), p1 = ncv_set1(scores[jj + 1]);
            const float *v0 = v + jj * ldv + d, *v1 = v + (jj + 1) * ldv + d;
            NC_UNROLL_ALL
            for (int u = 0; u < 4; u++) {
                oe[u] = ncv_fma(p0, ncv_ld(v0 + u * NC_VW), oe[u]);
                oo[u] = ncv_fma(p1, ncv_ld(v1 + u * NC_VW), oo[u]);
            }
        }
        if (jj < lim) {
            const ncv p0 = ncv_set1(scores[jj]);
            NC_UNROLL_ALL
            for (int u = 0; u < 4; u++)
                oe[u] = ncv_fma(p0, ncv_ld(v + jj * ldv + d + u * NC_VW), oe[u]);
        }
        NC_UNROLL_ALL
        for (int u = 0; u < 4; u++) ncv_st(oi + d + u * NC_VW, oe[u] + oo[u]);
    }
    for (; d + NC_VW <= dh; d += NC_VW) {
        ncv o0 = ncv_set1(0.0f), o1 = ncv_set1(0.0f);
        nc_int jj = 0;
        for (; jj + 2 <= lim; jj += 2) {
            o0 = ncv_fma(ncv_set1(scores[jj]), ncv_ld(v + jj * ldv + d), o0);
            o1 = ncv_fma(ncv_set1(scores[jj + 1]), ncv_ld(v + (jj + 1) * ldv + d), o1);
        }
        if (jj < lim) o0 = ncv_fma(ncv_set1(scores[jj]), ncv_ld(v + jj * ldv + d), o0);
        ncv_st(oi + d, o0 + o1);
    }
    for (; d < dh; d++) {
        float o0 = 0.0f, o1 = 0.0f;
        nc_int jj = 0;
        for (; jj + 2 <= lim; jj += 2) {
            o0 = nc_fmaf(scores[jj], v[jj * ldv + d], o0);
            o1 = nc_fmaf(scores[jj + 1], v[(jj + 1) * ldv + d], o1);
        }
        if (jj < lim) o0 = nc_fmaf(scores[jj], v[jj * ldv + d], o0);
        oi[d] = o0 + o1;
    }
}

typedef void (*NC_FN(nc_gemm_sfn))(const float *, nc_int, const float *, nc_int, nc_int,
                                   float *, nc_int);

/*
 * Attention without a causal or an additive mask (every row sees keys [0, klen), kpm
 * aside): query rows in tiles of NC_MR through the GEMM micro-kernel, which reads K^T and
 * V in place (row strides ldk, ldv): the tile's scores S = q K^T (NC_MR x NC_NR per call,
 * one FMA chain over d in order per score: the same bits as nca_qk), the softmax of its
 * rows (in pairs, as below), then out = P V (one FMA chain over the keys in order per
 * output).  An NC_MR-row tile reuses each K^T / V vector for NC_MR rows (the row pairs
 * below, two), with 2 NC_MR accumulators; the score rows stay in L1 (NC_MR x ldk floats).
 * Needs dh a multiple of NC_NR.  scratch: NC_MR * (ldk + dh) floats.
 */
static void NC_FN(nca_tiles)(const float *q, nc_int ldq, const float *bq, const float *kt,
                             nc_int ldk, const float *v, nc_int ldv, float *out, nc_int ldo,
                             nc_int L, nc_int dh, nc_int klen, const uint8_t *kpm,
                             float *scratch)
{
    static const NC_FN(nc_gemm_sfn) sf[NC_MR + 1] = NC_KROW(s);
    float *S = scratch, *qt = scratch + NC_MR * ldk;
    /* keys past klen are -inf: skipped unless kpm needs the whole row (as below) */
    const nc_int ncols = kpm ? L : klen;
    for (nc_int i0 = 0; i0 < L; i0 += NC_MR) {
        const int mr = L - i0 < NC_MR ? (int)(L - i0) : NC_MR;
        const float *qa = q + i0 * ldq;
        nc_int lda = ldq;
        if (bq) {
            /* the query bias, added once per row (q is read in place from the projections) */
            for (int r = 0; r < mr; r++)
                for (nc_int d = 0; d < dh; d++) qt[r * dh + d] = qa[r * ldq + d] + bq[d];
            qa = qt;
            lda = dh;
        }
        /* scores of whole key panels: K^T's rows are ldk >= ncols rounded up to NC_NR floats
           long (zero past L), so the last panel reads no further */
        for (nc_int j = 0; j < ncols; j += NC_NR)
            sf[mr](qa, lda, kt + j, ldk, dh, S + j, ldk);
        int r = 0;
        for (; r + 2 <= mr; r += 2)
            NC_FN(nc_ops_softmax_row2)(S + r * ldk, S + (r + 1) * ldk, S + r * ldk,
                                       S + (r + 1) * ldk, ncols, 1.0f, NULL, NULL, kpm, kpm,
                                       klen, klen);
        if (r < mr) NC_FN(nc_ops_softmax_row)(S + r * ldk, S + r * ldk, ncols, 1.0f, NULL, kpm,
                                              klen);
        for (nc_int d = 0; d < dh; d += NC_NR)
            sf[mr](S, ldk, v + d, ldv, klen, out + i0 * ldo + d, ldo);
    }
}

static void NC_FN(nc_attention_head)(const float *q, nc_int ldq, const float *bq,
                                     const float *kt, nc_int ldk,
                                     const float *v, nc_int ldv, float *out, nc_int ldo,
                                     nc_int L, nc_int dh, nc_int klen, int causal,
                                     const float *mask, nc_int ldm, const uint8_t *kpm,
                                     float *scores)
{
    if (!causal && !mask && dh % NC_NR == 0) {
        NC_FN(nca_tiles)(q, ldq, bq, kt, ldk, v, ldv, out, ldo, L, dh, klen, kpm, scores);
        return;
    }
    float *s1 = scores + ldk;
    float *qb0 = s1 + ldk, *qb1 = qb0 + dh;
    nc_int i = 0;
    /* query rows in pairs: one sweep of K^T for both rows' scores, the softmax of both
       rows interleaved, then V swept for one row and again, from L1, for the other */
    for (; i < L; i += 2) {
        const int two = i + 1 < L;
        const float *q0 = q + i * ldq, *q1 = two ? q + (i + 1) * ldq : NULL;
        if (bq) {
            /* the query bias, added once per row (q is read in place from the projection
               rows) */
            for (nc_int d = 0; d < dh; d++) qb0[d] = q0[d] + bq[d];
            q0 = qb0;
            if (two) {
                for (nc_int d = 0; d < dh; d++) qb1[d] = q1[d] + bq[d];
                q1 = qb1;
            }
        }
        nc_int lim0 = klen, lim1 = klen;
        if (causal && i + 1 < lim0) lim0 = i + 1;
        if (causal && i + 2 < lim1) lim1 = i + 2;
        /* keys past lim are -inf: skipped entirely unless a mask needs the whole row */
        nc_int nc0 = (mask || kpm) ? L : lim0, nc1 = (mask || kpm) ? L : lim1;
        const float *m0 = mask ? mask + i * ldm : NULL;
        if (two && nc0 == nc1) {
            nca_qk2(q0, q1, kt, ldk, dh, nc0, scores, s1);
            NC_FN(nc_ops_softmax_row2)(scores, s1, scores, s1, nc0, 1.0f, m0,
                                       mask ? m0 + ldm : NULL, kpm, kpm, lim0, lim1);
        } else {
            nca_qk(q0, kt, ldk, dh, nc0, scores);
            NC_FN(nc_ops_softmax_row)(scores, scores, nc0, 1.0f, m0, kpm, lim0);
            if (two) {
                nca_qk(q1, kt, ldk, dh, nc1, s1);
                NC_FN(nc_ops_softmax_row)(s1, s1, nc1, 1.0f, mask ? m0 + ldm : NULL, kpm,
                                          lim1);
            }
        }
        nca_pv(scores, v, ldv, dh, lim0, out + i * ldo);
        if (two) nca_pv(s1, v, ldv, dh, lim1, out + (i + 1) * ldo);
    }
}

#undef NC_KROW
#undef nc_gemm_epi
#undef nca_qk
#undef nca_qk2
#undef nca_pv
#undef NC_NR
#undef NC_MR

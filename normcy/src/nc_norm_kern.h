/*
 * normcy row kernels for the norms and BatchNorm: contiguous float32 rows, written once
 * against the SIMD vocabulary of nc_simd.h and compiled once per instruction set by
 * nc_api.h (this file has no include guard on purpose; every function name goes through
 * NC_FN).  No intrinsics, no -ffast-math.
 *
 * Numerics
 * --------
 * Moments are computed chunk by chunk (NC_CHUNK floats, L1 resident):
 *   pass A: float32 lane sums of v = s - K (NC_UNROLL accumulators of NC_VW lanes, at most
 *           NC_CHUNK / NC_BLK <= 64 terms per lane), K = the mean of the row's first
 *           NC_VW values (a shift that keeps the sums exact-ish when |mean| >> std);
 *   pass B (only when pass A is ill-conditioned): the classic two-pass algorithm, the
 *           mean in double lanes, then corrected sums of (s - mean) in float lanes, or in
 *           double lanes when those could overflow or underflow;
 * chunks are merged with Chan et al.'s pairwise formula in double.  Never E[x^2]-E[x]^2.
 * The normalization subtracts the mean as a float32 hi/lo pair, so rows with
 * |mean| >> std keep full accuracy.
 * Every reduction has a fixed order that does not depend on threads or on the other rows:
 * results are bit-for-bit identical for any thread count (for a given SIMD variant).
 */
#ifndef NC_CHUNK
#define NC_CHUNK 1024
#endif
/* ---- kernel bodies: included once per SIMD variant by nc_api.h ---- */
/* Pass B in double lanes: exact enough for any finite float32 input. */
static inline void NC_FN(nc_passb_double)(const float *src, nc_int len, double mc,
                                   double *s1_out, double *s2_out)
{
    ncdv s1a = {0}, s1b = {0}, s2a = {0}, s2b = {0};
    ncdv mv = mc - (ncdv){0};
    nc_int i;
    for (i = 0; i + NC_VW <= len; i += NC_VW) {
        ncdv da = ncv_ld_half_d(src + i) - mv;
        ncdv db = ncv_ld_half_d(src + i + NC_VW / 2) - mv;
        s1a += da; s2a = ncdv_fma(da, da, s2a);
        s1b += db; s2b = ncdv_fma(db, db, s2b);
    }
    double s1 = ncdv_hsum(s1a + s1b);
    double s2 = ncdv_hsum(s2a + s2b);
    for (; i < len; i++) {
        double dd = (double)src[i] - mc;
        s1 += dd; s2 = nc_fma(dd, dd, s2);
    }
    *s1_out = s1;
    *s2_out = s2;
}

/* one chunk of src (from element i on), shifted sums v = src - K: a += v, q += v*v */
#define NC_MOM_LOOP(SRC)                                                                  \
    do {                                                                                  \
        for (; i + NC_BLK <= len; i += NC_BLK) {                                          \
            ncv v0 = ncv_ld((SRC) + i) - kv, v1 = ncv_ld((SRC) + i + NC_VW) - kv;         \
            ncv v2 = ncv_ld((SRC) + i + 2 * NC_VW) - kv;                                  \
            ncv v3 = ncv_ld((SRC) + i + 3 * NC_VW) - kv;                                  \
            a0 += v0; a1 += v1; a2 += v2; a3 += v3;                                       \
            q0 = ncv_fma(v0, v0, q0); q1 = ncv_fma(v1, v1, q1);                           \
            q2 = ncv_fma(v2, v2, q2); q3 = ncv_fma(v3, v3, q3);                           \
        }                                                                                 \
        for (; i + NC_VW <= len; i += NC_VW) {                                            \
            ncv v0 = ncv_ld((SRC) + i) - kv;                                              \
            a0 += v0; q0 = ncv_fma(v0, v0, q0);                                           \
        }                                                                                 \
    } while (0)

/* one chunk of src (from element i on), sums of squares: q += v*v */
#define NC_SQ_LOOP(SRC)                                                                   \
    do {                                                                                  \
        for (; i + NC_BLK <= len; i += NC_BLK) {                                          \
            ncv v0 = ncv_ld((SRC) + i), v1 = ncv_ld((SRC) + i + NC_VW);                   \
            ncv v2 = ncv_ld((SRC) + i + 2 * NC_VW), v3 = ncv_ld((SRC) + i + 3 * NC_VW);   \
            q0 = ncv_fma(v0, v0, q0); q1 = ncv_fma(v1, v1, q1);                           \
            q2 = ncv_fma(v2, v2, q2); q3 = ncv_fma(v3, v3, q3);                           \
        }                                                                                 \
        for (; i + NC_VW <= len; i += NC_VW) {                                            \
            ncv v0 = ncv_ld((SRC) + i);                                                   \
            q0 = ncv_fma(v0, v0, q0);                                                     \
        }                                                                                 \
    } while (0)

/* one chunk of s = EXPR_S, stored into dc, with shifted sums v = s - K: a += v, q += v*v */
#define NC_ADD_STORE_MOM(EXPR_S)                                                     \
    do {                                                                             \
        for (; i + NC_BLK <= len; i += NC_BLK) {                                        \
            ncv v0, v1, v2, v3;                                                  \
            { nc_int o = i;      v0 = EXPR_S; ncv_st(dc + o, v0); }                 \
            { nc_int o = i + NC_VW; v1 = EXPR_S; ncv_st(dc + o, v1); }                 \
            { nc_int o = i + 2 * NC_VW; v2 = EXPR_S; ncv_st(dc + o, v2); }                 \
            { nc_int o = i + 3 * NC_VW; v3 = EXPR_S; ncv_st(dc + o, v3); }                 \
            v0 -= kv; v1 -= kv; v2 -= kv; v3 -= kv;                                  \
            a0 += v0; a1 += v1; a2 += v2; a3 += v3;                                  \
            q0 = ncv_fma(v0, v0, q0); q1 = ncv_fma(v1, v1, q1);                      \
            q2 = ncv_fma(v2, v2, q2); q3 = ncv_fma(v3, v3, q3);                      \
        }                                                                            \
        for (; i + NC_VW <= len; i += NC_VW) {                                             \
            ncv v0; nc_int o = i; v0 = EXPR_S; ncv_st(dc + o, v0);              \
            v0 -= kv; a0 += v0; q0 = ncv_fma(v0, v0, q0);                            \
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
/* The shift K of nc_moments: the mean of the row's first NC_VW values of s (all of them
   when the row is shorter), 0 if those hold an Inf or NaN. */
NC_INLINE float NC_FN(nco_shift)(const float *x, const float *xb, const float *r, nc_int n)
{
    float K;
    nc_int i;
    if (n >= NC_VW) {
        /* a vector load and a tree sum: short dependency chain before the main loop */
        ncv f = ncv_ld(x);
        if (r != NULL) f = xb != NULL ? (f + ncv_ld(xb)) + ncv_ld(r) : f + ncv_ld(r);
        K = (float)(ncv_hsum(f) * (1.0 / NC_VW));
    } else {
        double ks = 0.0;
        for (i = 0; i < n; i++) {
            float sv = r != NULL ? (xb != NULL ? (x[i] + xb[i]) + r[i] : x[i] + r[i]) : x[i];
            ks += (double)sv;
        }
        K = (float)(ks / (double)n);
    }
    if (!(K - K == 0.0f)) K = 0.0f;    /* Inf/NaN among the first values */
    return K;
}

/* One chunk's statistics from its shifted lane sums a0..a3, q0..q3 (elements [0, tail)
   of src; [tail, len) are added here, in double): mean and M2, through the robust
   two-pass form on src when the shifted sums are ill-conditioned (see nc_moments). */
NC_INLINE void NC_FN(nco_chunk_stats)(const float *src, nc_int len, nc_int tail, float K,
                                      ncv a0, ncv a1, ncv a2, ncv a3, ncv q0, ncv q1,
                                      ncv q2, ncv q3, double *mean_out, double *m2_out)
{
    const double inv_len = 1.0 / (double)len;
    double sa, sq, mean_c, m2c;
    nc_int i;
    sa = ncv_hsum((a0 + a1) + (a2 + a3));
    sq = ncv_hsum((q0 + q1) + (q2 + q3));
    for (i = tail; i < len; i++) {
        double t = (double)(src[i] - K);
        sa += t; sq = nc_fma(t, t, sq);
    }
    if (sq < 1e36 && sq >= 1e-28 && sa * sa * inv_len <= 0.5 * sq) {
        mean_c = nc_fma(sa, inv_len, (double)K);
        m2c = nc_fma(-(sa * sa), inv_len, sq);
        if (m2c < 0.0) m2c = 0.0;
    } else {
        /* robust two-pass on the (stored) chunk: mean in double lanes ... */
        ncdv ma = {0}, mb = {0};
        const ncdv kd = (double)K - (ncdv){0};
        for (i = 0; i + NC_VW <= len; i += NC_VW) {
            ma += ncv_ld_half_d(src + i) - kd;
            mb += ncv_ld_half_d(src + i + NC_VW / 2) - kd;
        }
        sa = ncdv_hsum(ma + mb);
        for (; i < len; i++) sa += (double)src[i] - (double)K;
        double mc = nc_fma(sa, inv_len, (double)K);
        /* ... then corrected sums of (s - mean) in float lanes */
        const float mcf = (float)mc;
        const ncv mv = mcf - (ncv){0};
        ncv e0 = {0}, e1 = {0};
        q0 = (ncv){0}; q1 = (ncv){0};
        for (i = 0; i + 2 * NC_VW <= len; i += 2 * NC_VW) {
            ncv d0 = ncv_ld(src + i) - mv, d1 = ncv_ld(src + i + NC_VW) - mv;
            e0 += d0; q0 = ncv_fma(d0, d0, q0);
            e1 += d1; q1 = ncv_fma(d1, d1, q1);
        }
        for (; i + NC_VW <= len; i += NC_VW) {
            ncv d0 = ncv_ld(src + i) - mv;
            e0 += d0; q0 = ncv_fma(d0, d0, q0);
        }
        double s1 = ncv_hsum(e0 + e1);
        double s2 = ncv_hsum(q0 + q1);
        for (; i < len; i++) {
            double dd = (double)(src[i] - mcf);
            s1 += dd; s2 = nc_fma(dd, dd, s2);
        }
        double mref = (double)mcf;
        if (!(s2 < 1e36) || s2 < 1e-28) {
            /* possible float overflow/underflow, NaN/Inf or a constant chunk:
               exactly, in double lanes */
            mref = mc;
            NC_FN(nc_passb_double)(src, len, mc, &s1, &s2);
        }
        m2c = nc_fma(-(s1 * s1), inv_len, s2);
        if (!(m2c > 0.0)) m2c = (m2c == m2c) ? 0.0 : m2c;   /* clamp, keep NaN */
        mean_c = nc_fma(s1, inv_len, mref);
    }
    *mean_out = mean_c;
    *m2_out = m2c;
}

/* Chan et al.'s pairwise merge, in double: a chunk of len values with mean mean_c and
   M2 m2c joins the cnt values merged so far (nc_moments and the streamed pipeline). */
NC_INLINE void NC_FN(nco_chan_merge)(double *cnt, double *mean, double *m2, nc_int len,
                                     double mean_c, double m2c)
{
    double ntot = *cnt + (double)len;
    double delta = mean_c - *mean;
    *mean = nc_fma(delta, (double)len / ntot, *mean);
    *m2 += nc_fma(delta * delta, *cnt * (double)len / ntot, m2c);
    *cnt = ntot;
}

/* The sums of one chunk, elements [c0, c0 + len) of s = x (+ xb) (+ r): STORE_LOOP(EXPR)
   forms s = EXPR vector by vector, stores it into d and sums it (the add), LOAD_LOOP(SRC)
   sums x; both leave i at the first element not summed in vectors (tail), added by the
   caller in scalars, and src at the chunk's s (nc_moments' and nc_sumsq's chunk bodies). */
#define NCO_CHUNK_SUMS(STORE_LOOP, LOAD_LOOP)                                             \
    do {                                                                                  \
        if (r != NULL) {                                                                  \
            const float *xc = x + c0, *rc = r + c0;                                       \
            float *dc = d + c0;                                                           \
            i = 0;   /* peeling costs more than split loads here (measured) */            \
            if (xb != NULL) {                                                             \
                const float *bc = xb + c0;                                                \
                STORE_LOOP((ncv_ld(xc + o) + ncv_ld(bc + o)) + ncv_ld(rc + o));           \
                tail = i;                                                                 \
                for (; i < len; i++) dc[i] = (xc[i] + bc[i]) + rc[i];                     \
            } else {                                                                      \
                STORE_LOOP(ncv_ld(xc + o) + ncv_ld(rc + o));                              \
                tail = i;                                                                 \
                for (; i < len; i++) dc[i] = xc[i] + rc[i];                               \
            }                                                                             \
            src = dc;                                                                     \
        } else {                                                                          \
            src = x + c0;                                                                 \
            i = 0;                                                                        \
            LOAD_LOOP(src);                                                               \
            tail = i;                                                                     \
        }                                                                                 \
    } while (0)

/* One chunk of nc_moments: elements [c0, c0 + len) of the row s = x (+ xb) (+ r), s
   stored into d when r != NULL; mean and M2 of the chunk around the row's shift K. */
NC_INLINE void NC_FN(nco_moments_chunk)(const float *x, const float *xb, const float *r,
                                        float *d, nc_int c0, nc_int len, float K,
                                        double *mean_c, double *m2c)
{
    const ncv kv = K - (ncv){0};
    const float *src;
    ncv a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    ncv q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    nc_int i, tail;
    NCO_CHUNK_SUMS(NC_ADD_STORE_MOM, NC_MOM_LOOP);
    NC_FN(nco_chunk_stats)(src, len, tail, K, a0, a1, a2, a3, q0, q1, q2, q3, mean_c, m2c);
}

static void NC_FN(nc_moments)(const float *x, const float *xb, const float *r, float *d,
                             nc_int n, double *mean_out, double *m2_out)
{
    double cnt = 0.0, mean = 0.0, m2 = 0.0;
    float K;
    if (n <= 0) { *mean_out = 0.0; *m2_out = 0.0; return; }
    K = NC_FN(nco_shift)(x, xb, r, n);
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        double mean_c, m2c;
        NC_FN(nco_moments_chunk)(x, xb, r, d, c0, len, K, &mean_c, &m2c);
        if (len == n) {        /* the whole row was one chunk */
            *mean_out = mean_c;
            *m2_out = m2c;
            return;
        }
        NC_FN(nco_chan_merge)(&cnt, &mean, &m2, len, mean_c, m2c);
    }
    *mean_out = mean;
    *m2_out = m2;
}

/*
 * nc_moments of a long row in pieces, for rows split among threads: the row's shift
 * (nc_moments_shift, taken once, before any piece stores s: d may be x or r), then the
 * chunks [c0, c1) of the row (c0 a multiple of NC_CHUNK; c1 too, or n), each chunk's mean
 * and M2 into cm[0], cm[1], cm[2], ... (two doubles per chunk, the first chunk's at cm[0]);
 * s stored into d when r != NULL.  nc_moments_merge then gives exactly nc_moments' mean and
 * M2 from all the row's chunks: the same shift, the same chunk sums, the same merges in the
 * same order.
 */
static float NC_FN(nc_moments_shift)(const float *x, const float *xb, const float *r,
                                     nc_int n)
{
    return NC_FN(nco_shift)(x, xb, r, n);
}

static void NC_FN(nc_moments_part)(const float *x, const float *xb, const float *r, float *d,
                                   nc_int n, float K, nc_int c0, nc_int c1, double *cm)
{
    if (c1 > n) c1 = n;
    for (; c0 < c1; c0 += NC_CHUNK, cm += 2) {
        nc_int len = c1 - c0 < NC_CHUNK ? c1 - c0 : NC_CHUNK;
        NC_FN(nco_moments_chunk)(x, xb, r, d, c0, len, K, &cm[0], &cm[1]);
    }
}

static void NC_FN(nc_moments_merge)(const double *cm, nc_int n, double *mean_out,
                                    double *m2_out)
{
    double cnt = 0.0, mean = 0.0, m2 = 0.0;
    if (n <= 0) { *mean_out = 0.0; *m2_out = 0.0; return; }
    if (n <= NC_CHUNK) { *mean_out = cm[0]; *m2_out = cm[1]; return; }
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK, cm += 2) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        NC_FN(nco_chan_merge)(&cnt, &mean, &m2, len, cm[0], cm[1]);
    }
    *mean_out = mean;
    *m2_out = m2;
}

/* a vector store, non-temporal when NT (a compile-time constant) */
#define NCO_ST(NT, p, v) ((NT) ? ncv_stream((p), (v)) : ncv_st((p), (v)))

/* y = ((s - mhi) - mlo) * scale * w + b, evaluated as t = fma(s - mhi, scale, -mlo*scale)
   and y = fma(t, w, b) (one rounding each where the variant has FMA); y may be s itself.
   mhi + mlo is the row mean as an unevaluated float pair, so |mean| >> std loses nothing.
   NT: y is 64-byte aligned and n a whole number of lines; non-temporal stores. */
NC_INLINE void NC_FN(nco_ln_apply_impl)(const int NT, const float *s, float *y, const float *w,
                                      const float *b, nc_int n, float mhi, float mlo,
                                      float scale)
{
    nc_int i = 0, head = NT ? 0 : NC_PEEL(y, n);
    const float c = -(mlo * scale);
    const ncv hv = mhi - (ncv){0}, cv = c - (ncv){0}, sv = scale - (ncv){0};
    if (w != NULL && b != NULL) {
        for (; i < head; i++) y[i] = nc_fmaf(nc_fmaf(s[i] - mhi, scale, c), w[i], b[i]);
        for (; i + NC_VW <= n; i += NC_VW) {
            ncv t = ncv_fma(ncv_ld(s + i) - hv, sv, cv);
            NCO_ST(NT, y + i, ncv_fma(t, ncv_ld(w + i), ncv_ld(b + i)));
        }
        for (; i < n; i++) y[i] = nc_fmaf(nc_fmaf(s[i] - mhi, scale, c), w[i], b[i]);
    } else if (w != NULL) {
        for (; i < head; i++) y[i] = nc_fmaf(s[i] - mhi, scale, c) * w[i];
        for (; i + NC_VW <= n; i += NC_VW) {
            ncv t = ncv_fma(ncv_ld(s + i) - hv, sv, cv);
            NCO_ST(NT, y + i, t * ncv_ld(w + i));
        }
        for (; i < n; i++) y[i] = nc_fmaf(s[i] - mhi, scale, c) * w[i];
    } else if (b != NULL) {
        for (; i < head; i++) y[i] = nc_fmaf(s[i] - mhi, scale, c) + b[i];
        for (; i + NC_VW <= n; i += NC_VW) {
            ncv t = ncv_fma(ncv_ld(s + i) - hv, sv, cv);
            NCO_ST(NT, y + i, t + ncv_ld(b + i));
        }
        for (; i < n; i++) y[i] = nc_fmaf(s[i] - mhi, scale, c) + b[i];
    } else {
        for (; i < head; i++) y[i] = nc_fmaf(s[i] - mhi, scale, c);
        for (; i + NC_VW <= n; i += NC_VW)
            NCO_ST(NT, y + i, ncv_fma(ncv_ld(s + i) - hv, sv, cv));
        for (; i < n; i++) y[i] = nc_fmaf(s[i] - mhi, scale, c);
    }
}

static void NC_FN(nc_ln_apply)(const float *s, float *y, const float *w, const float *b,
                              nc_int n, float mhi, float mlo, float scale)
{
    NC_FN(nco_ln_apply_impl)(0, s, y, w, b, n, mhi, mlo, scale);
}

/* Two rows of the same length at once: y0 from s0 and y1 from s1, each element computed
   exactly as nc_ln_apply computes it (the same bits), with one load of w and b serving
   both rows (the one-row loop is bound by its three loads per vector).  The vector stores
   are aligned as in nc_ln_apply: both rows peel the same head, which needs the two outputs
   equally misaligned (rows of a whole number of vectors); otherwise the rows go one at a
   time.  (Unpeeled, every 64-byte store of a NumPy row, 16-byte aligned, splits a cache
   line.  With the unpeeled two-row loop, layer_norm and rms_norm ran 1.4-1.8x slower on a
   Xeon with AVX-512 than one peeled row at a time (32x384 and 4096x768, one thread,
   bisected to that commit); split stores are the suspected cause, not yet re-measured
   there.  On AMD's AVX2 the peel measured neutral.) */
#define NC_LN2_LOOP(FIN, SCALAR)                                                          \
    do {                                                                                  \
        for (; i < head; i++) { SCALAR; }                                                 \
        for (; i + NC_VW <= n; i += NC_VW) {                                              \
            NC_LN2_WB;                                                                    \
            ncv t0 = ncv_fma(ncv_ld(s0 + i) - hv0, sv0, cv0);                             \
            ncv t1 = ncv_fma(ncv_ld(s1 + i) - hv1, sv1, cv1);                             \
            ncv_st(y0 + i, FIN(t0));                                                      \
            ncv_st(y1 + i, FIN(t1));                                                      \
        }                                                                                 \
        for (; i < n; i++) { SCALAR; }                                                    \
    } while (0)
static void NC_FN(nc_ln_apply2)(const float *s0, const float *s1, float *y0, float *y1,
                               const float *w, const float *b, nc_int n,
                               float mhi0, float mlo0, float scale0,
                               float mhi1, float mlo1, float scale1)
{
    const nc_int head = NC_PEEL(y0, n);
    if (NC_PEEL(y1, n) != head) {
        NC_FN(nc_ln_apply)(s0, y0, w, b, n, mhi0, mlo0, scale0);
        NC_FN(nc_ln_apply)(s1, y1, w, b, n, mhi1, mlo1, scale1);
        return;
    }
    nc_int i = 0;
    const float c0 = -(mlo0 * scale0), c1 = -(mlo1 * scale1);
    const ncv hv0 = mhi0 - (ncv){0}, cv0 = c0 - (ncv){0}, sv0 = scale0 - (ncv){0};
    const ncv hv1 = mhi1 - (ncv){0}, cv1 = c1 - (ncv){0}, sv1 = scale1 - (ncv){0};
#define NC_T0 nc_fmaf(s0[i] - mhi0, scale0, c0)
#define NC_T1 nc_fmaf(s1[i] - mhi1, scale1, c1)
    if (w != NULL && b != NULL) {
#define NC_LN2_WB ncv wv = ncv_ld(w + i), bv = ncv_ld(b + i)
#define NC_LN2_FIN(t) ncv_fma(t, wv, bv)
        NC_LN2_LOOP(NC_LN2_FIN, y0[i] = nc_fmaf(NC_T0, w[i], b[i]);
                                y1[i] = nc_fmaf(NC_T1, w[i], b[i]));
#undef NC_LN2_FIN
#undef NC_LN2_WB
    } else if (w != NULL) {
#define NC_LN2_WB ncv wv = ncv_ld(w + i)
#define NC_LN2_FIN(t) ((t) * wv)
        NC_LN2_LOOP(NC_LN2_FIN, y0[i] = NC_T0 * w[i]; y1[i] = NC_T1 * w[i]);
#undef NC_LN2_FIN
#undef NC_LN2_WB
    } else if (b != NULL) {
#define NC_LN2_WB ncv bv = ncv_ld(b + i)
#define NC_LN2_FIN(t) ((t) + bv)
        NC_LN2_LOOP(NC_LN2_FIN, y0[i] = NC_T0 + b[i]; y1[i] = NC_T1 + b[i]);
#undef NC_LN2_FIN
#undef NC_LN2_WB
    } else {
#define NC_LN2_WB (void)0
#define NC_LN2_FIN(t) (t)
        NC_LN2_LOOP(NC_LN2_FIN, y0[i] = NC_T0; y1[i] = NC_T1);
#undef NC_LN2_FIN
#undef NC_LN2_WB
    }
#undef NC_T0
#undef NC_T1
}
#undef NC_LN2_LOOP

/* Scalar double-precision apply for rows whose scale is outside float32's comfortable
   range (|x| near FLT_MAX, or subnormal rows with eps = 0): y = (s - mean) * scale * w + b. */
static void NC_FN(nc_ln_apply_d)(const float *s, float *y, const float *w, const float *b, nc_int n,
                          double mean, double scale)
{
    for (nc_int i = 0; i < n; i++) {
        double t = ((double)s[i] - mean) * scale;
        if (w) t = b ? nc_fma(t, (double)w[i], (double)b[i]) : t * (double)w[i];
        else if (b) t += (double)b[i];
        y[i] = (float)t;
    }
}

static void NC_FN(nc_scale_apply_d)(const float *s, float *y, const float *w, nc_int n, double scale)
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
        for (; i + NC_BLK <= len; i += NC_BLK) {                                        \
            ncv v0, v1, v2, v3;                                                  \
            { nc_int o = i;      v0 = EXPR_S; ncv_st(dc + o, v0); }                 \
            { nc_int o = i + NC_VW; v1 = EXPR_S; ncv_st(dc + o, v1); }                 \
            { nc_int o = i + 2 * NC_VW; v2 = EXPR_S; ncv_st(dc + o, v2); }                 \
            { nc_int o = i + 3 * NC_VW; v3 = EXPR_S; ncv_st(dc + o, v3); }                 \
            q0 = ncv_fma(v0, v0, q0); q1 = ncv_fma(v1, v1, q1);                      \
            q2 = ncv_fma(v2, v2, q2); q3 = ncv_fma(v3, v3, q3);                      \
        }                                                                            \
        for (; i + NC_VW <= len; i += NC_VW) {                                             \
            ncv v0; nc_int o = i; v0 = EXPR_S; ncv_st(dc + o, v0);              \
            q0 = ncv_fma(v0, v0, q0);                                                \
        }                                                                            \
    } while (0)

/* One chunk's sum of squares from its lane sums q0..q3 (elements [0, tail) of src;
   [tail, len) are added here), redone in double lanes when it could have overflowed or
   underflowed in float (see nc_sumsq). */
NC_INLINE double NC_FN(nco_chunk_sumsq)(const float *src, nc_int len, nc_int tail, ncv q0,
                                        ncv q1, ncv q2, ncv q3)
{
    nc_int i;
    double q = ncv_hsum((q0 + q1) + (q2 + q3));
    for (i = tail; i < len; i++) q = nc_fma((double)src[i], (double)src[i], q);
    if (!(q < 1e36) || q < 1e-28) {
        ncdv qa = {0}, qb = {0};
        for (i = 0; i + NC_VW <= len; i += NC_VW) {
            ncdv da = ncv_ld_half_d(src + i);
            ncdv db = ncv_ld_half_d(src + i + NC_VW / 2);
            qa = ncdv_fma(da, da, qa);
            qb = ncdv_fma(db, db, qb);
        }
        q = ncdv_hsum(qa + qb);
        for (; i < len; i++) q = nc_fma((double)src[i], (double)src[i], q);
    }
    return q;
}

/* One chunk of nc_sumsq: the sum of s^2 over elements [c0, c0 + len) */
NC_INLINE double NC_FN(nco_sumsq_chunk)(const float *x, const float *xb, const float *r,
                                        float *d, nc_int c0, nc_int len)
{
    const float *src;
    nc_int i, tail;
    ncv q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    NCO_CHUNK_SUMS(NC_ADD_STORE_SQ, NC_SQ_LOOP);
    return NC_FN(nco_chunk_sumsq)(src, len, tail, q0, q1, q2, q3);
}

static double NC_FN(nc_sumsq)(const float *x, const float *xb, const float *r, float *d, nc_int n)
{
    double total = 0.0;
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
        total += NC_FN(nco_sumsq_chunk)(x, xb, r, d, c0, len);
    }
    return total;
}

/* nc_sumsq in pieces (see nc_moments_part): the chunks [c0, c1) of the row, each chunk's
   sum of squares into cq[0], cq[1], ...; their sum in chunk order, from 0.0, is exactly
   nc_sumsq's. */
static void NC_FN(nc_sumsq_part)(const float *x, const float *xb, const float *r, float *d,
                                 nc_int n, nc_int c0, nc_int c1, double *cq)
{
    if (c1 > n) c1 = n;
    for (; c0 < c1; c0 += NC_CHUNK, cq++) {
        nc_int len = c1 - c0 < NC_CHUNK ? c1 - c0 : NC_CHUNK;
        *cq = NC_FN(nco_sumsq_chunk)(x, xb, r, d, c0, len);
    }
}

/* y = (s * scale) * w ; y may be s itself. */
NC_INLINE void NC_FN(nco_scale_apply_impl)(const int NT, const float *s, float *y,
                                         const float *w, nc_int n, float scale)
{
    nc_int i = 0, head = NT ? 0 : NC_PEEL(y, n);
    ncv sv = scale - (ncv){0};
    if (w != NULL) {
        for (; i < head; i++) y[i] = (s[i] * scale) * w[i];
        for (; i + NC_VW <= n; i += NC_VW) NCO_ST(NT, y + i, (ncv_ld(s + i) * sv) * ncv_ld(w + i));
        for (; i < n; i++) y[i] = (s[i] * scale) * w[i];
    } else {
        for (; i < head; i++) y[i] = s[i] * scale;
        for (; i + NC_VW <= n; i += NC_VW) NCO_ST(NT, y + i, ncv_ld(s + i) * sv);
        for (; i < n; i++) y[i] = s[i] * scale;
    }
}

static void NC_FN(nc_scale_apply)(const float *s, float *y, const float *w, nc_int n, float scale)
{
    NC_FN(nco_scale_apply_impl)(0, s, y, w, n, scale);
}

/* Two rows at once, each element as nc_scale_apply computes it; one load of w per pair;
   aligned stores as in nc_ln_apply2 (the same head for both rows, else one row at a time). */
static void NC_FN(nc_scale_apply2)(const float *s0, const float *s1, float *y0, float *y1,
                                  const float *w, nc_int n, float scale0, float scale1)
{
    const nc_int head = NC_PEEL(y0, n);
    if (NC_PEEL(y1, n) != head) {
        NC_FN(nc_scale_apply)(s0, y0, w, n, scale0);
        NC_FN(nc_scale_apply)(s1, y1, w, n, scale1);
        return;
    }
    nc_int i = 0;
    const ncv sv0 = scale0 - (ncv){0}, sv1 = scale1 - (ncv){0};
    if (w != NULL) {
        for (; i < head; i++) {
            y0[i] = (s0[i] * scale0) * w[i];
            y1[i] = (s1[i] * scale1) * w[i];
        }
        for (; i + NC_VW <= n; i += NC_VW) {
            ncv wv = ncv_ld(w + i);
            ncv_st(y0 + i, (ncv_ld(s0 + i) * sv0) * wv);
            ncv_st(y1 + i, (ncv_ld(s1 + i) * sv1) * wv);
        }
        for (; i < n; i++) {
            y0[i] = (s0[i] * scale0) * w[i];
            y1[i] = (s1[i] * scale1) * w[i];
        }
    } else {
        for (; i < head; i++) {
            y0[i] = s0[i] * scale0;
            y1[i] = s1[i] * scale1;
        }
        for (; i + NC_VW <= n; i += NC_VW) {
            ncv_st(y0 + i, ncv_ld(s0 + i) * sv0);
            ncv_st(y1 + i, ncv_ld(s1 + i) * sv1);
        }
        for (; i < n; i++) {
            y0[i] = s0[i] * scale0;
            y1[i] = s1[i] * scale1;
        }
    }
}

/* Inference BatchNorm, two forms, chosen per call from the parameters (normcy/_norms.pyx):
   - centred, y = (x - m) * a + b: when |m| is large against the channel's spread, the
     folded shift b - m * a is large and its float32 rounding (and a's, times |x|) is
     amplified by the cancellation in x * a + shift (6.8e-3 off at mean 1e4, std 0.1),
     while x - m is exact near the mean (Sterbenz) and the result keeps ~1 ulp;
   - folded, y = x * a + c (m == NULL; c = b - m * a): one parameter stream fewer, which
     out of cache is 12-20% faster for channels-last rows (C microbenchmark, AMD EPYC Zen 5:
     the extra L1 load per vector slows the streaming), and as accurate to within ~3 ulps of
     |weight| when every |m| <= 2 sqrt(var + eps), the case it is used for.
   The same form for every layout and thread count of a call: the same bits. */

/* one channel plane: scalar m (centred, when `centred`), a, b */
static void NC_FN(nc_affine_scalar)(const float *x, float *y, nc_int n, float m, float a,
                                    float b, int centred)
{
    nc_int i = 0, head = NC_PEEL(y, n);
    ncv mv = m - (ncv){0}, av = a - (ncv){0}, bv = b - (ncv){0};
    if (centred) {
        for (; i < head; i++) y[i] = nc_fmaf(x[i] - m, a, b);
        for (; i + NC_VW <= n; i += NC_VW) ncv_st(y + i, ncv_fma(ncv_ld(x + i) - mv, av, bv));
        for (; i < n; i++) y[i] = nc_fmaf(x[i] - m, a, b);
    } else {
        for (; i < head; i++) y[i] = nc_fmaf(x[i], a, b);
        for (; i + NC_VW <= n; i += NC_VW) ncv_st(y + i, ncv_fma(ncv_ld(x + i), av, bv));
        for (; i < n; i++) y[i] = nc_fmaf(x[i], a, b);
    }
}

/* nrows contiguous channels-last rows of n channels: y[r][j] = (x[r][j] - m[j]) * a[j] +
   b[j] (centred) or x[r][j] * a[j] + b[j] (m == NULL), one row after the other (a row of
   1024 floats is one 4 KB page: taking rows in pairs, to share the parameter loads, ran
   two page streams at once and was 1.35x slower out of cache in the C microbenchmark). */
static void NC_FN(nc_affine_rows)(const float *x, float *y, const float *m, const float *a,
                                  const float *b, nc_int n, nc_int nrows)
{
    nc_int r;
    for (r = 0; r < nrows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        nc_int i = 0, head = NC_PEEL(yr, n);
        if (m != NULL) {
            for (; i < head; i++) yr[i] = nc_fmaf(xr[i] - m[i], a[i], b[i]);
            for (; i + NC_VW <= n; i += NC_VW)
                ncv_st(yr + i, ncv_fma(ncv_ld(xr + i) - ncv_ld(m + i), ncv_ld(a + i),
                                       ncv_ld(b + i)));
            for (; i < n; i++) yr[i] = nc_fmaf(xr[i] - m[i], a[i], b[i]);
        } else {
            for (; i < head; i++) yr[i] = nc_fmaf(xr[i], a[i], b[i]);
            for (; i + NC_VW <= n; i += NC_VW)
                ncv_st(yr + i, ncv_fma(ncv_ld(xr + i), ncv_ld(a + i), ncv_ld(b + i)));
            for (; i < n; i++) yr[i] = nc_fmaf(xr[i], a[i], b[i]);
        }
    }
}


/* Streaming (non-temporal) copy of one row of a run of rows, for outputs far larger than
   the caches: rows are computed into an L1-resident scratch and streamed out, so the
   destination lines are never read for ownership.  Only whole 64-byte lines are streamed.
   The partial line at the row's end is held in `c` and completed by the next row when that
   row starts where this one ended (consecutive rows of a C-contiguous array, or the next
   chunk of the same row), then streamed as one line; otherwise it is written with ordinary
   stores (nc_stream_flush).  An ordinary store into a line that is not in cache waits for
   that line's read-for-ownership: with one such line per row and output (NumPy's large
   arrays start 16 bytes past a page), the store queue stalled on them and add_layer_norm
   16384x1024 streamed at 40-48 GB/s on two threads against 64-77 GB/s with 64-byte aligned
   outputs (AMD EPYC Zen 5, one process).  dst is float-aligned (the boundary refuses
   unaligned arrays).  Callers flush the carry after their last row, then fence
   (nc_stream_fence) before anyone reads. */
static void NC_FN(nc_stream_row)(float *dst, const float *src, nc_int n, nc_carry *c)
{
    float *const end = dst + n;
    float *p = dst;
    nc_int k;
    if (n <= 0) return;
    float *const L = (float *)((uintptr_t)dst & ~(uintptr_t)(NC_LINE_BYTES - 1));
    if (L != dst) {
        /* the row starts inside a line: its first h elements complete that line */
        float *const lend = L + NC_LINE_FLOATS;
        const nc_int h = (lend < end ? lend : end) - dst;
        if (c->line == L && L + c->fill == dst) {
            for (k = 0; k < h; k++) c->v[c->fill + k] = src[k];
            c->fill += h;
            if (c->fill == NC_LINE_FLOATS) {
                for (k = 0; k < NC_LINE_FLOATS; k += NC_VW) ncv_stream(L + k, ncv_ld(c->v + k));
                c->line = NULL;
                c->fill = 0;
            }
        } else {
            nc_stream_flush(c);
            for (k = 0; k < h; k++) dst[k] = src[k];
        }
        p += h;
        src += h;
    }
    for (; end - p >= NC_LINE_FLOATS; p += NC_LINE_FLOATS, src += NC_LINE_FLOATS)
        for (k = 0; k < NC_LINE_FLOATS; k += NC_VW) ncv_stream(p + k, ncv_ld(src + k));
    if (p < end) {
        /* a partial last line: held for the next row (p is line-aligned here, so any carry
           was completed or flushed above) */
        nc_stream_flush(c);
        c->line = p;
        c->fill = end - p;
        for (k = 0; k < c->fill; k++) c->v[k] = src[k];
    }
}

/* elements before p reaches a 64-byte line (p float-aligned), at most n */
NC_INLINE nc_int NC_FN(nco_line_peel)(const float *p, nc_int n)
{
    nc_int h = (nc_int)(((NC_LINE_BYTES - ((uintptr_t)p & (NC_LINE_BYTES - 1)))
                         & (NC_LINE_BYTES - 1)) / 4u);
    return h < n ? h : n;
}

/* The outputs of one row (nc_ln_apply's or nc_scale_apply's, the same bits) streamed
   straight to y: the whole 64-byte lines with non-temporal stores from the registers, the
   partial lines at either end through nc_stream_row's carry.  Saves the scratch row that
   nc_stream_row would otherwise copy (a store and a load per element, in L1). */
#define NCO_APPLY_STREAM(PLAIN, NTAPPLY)                                                  \
    do {                                                                                  \
        float tmp[NC_LINE_FLOATS];                                                        \
        const nc_int h = NC_FN(nco_line_peel)(y, n);                                      \
        if (h > 0) {                                                                      \
            PLAIN(0, h);                                                                  \
            NC_FN(nc_stream_row)(y, tmp, h, c);                                           \
        }                                                                                 \
        const nc_int body = (n - h) / NC_LINE_FLOATS * NC_LINE_FLOATS;                    \
        if (body > 0) {                                                                   \
            nc_stream_flush(c);      /* nothing held here: h completed or flushed it */    \
            NTAPPLY(h, body);                                                             \
        }                                                                                 \
        if (h + body < n) {                                                               \
            PLAIN(h + body, n - h - body);                                                \
            NC_FN(nc_stream_row)(y + h + body, tmp, n - h - body, c);                     \
        }                                                                                 \
    } while (0)

static void NC_FN(nc_ln_apply_stream)(const float *s, float *y, const float *w,
                                      const float *b, nc_int n, float mhi, float mlo,
                                      float scale, nc_carry *c)
{
#define NCO_P(o, m) NC_FN(nco_ln_apply_impl)(0, s + (o), tmp, w ? w + (o) : NULL,          \
                                            b ? b + (o) : NULL, (m), mhi, mlo, scale)
#define NCO_N(o, m) NC_FN(nco_ln_apply_impl)(1, s + (o), y + (o), w ? w + (o) : NULL,       \
                                            b ? b + (o) : NULL, (m), mhi, mlo, scale)
    NCO_APPLY_STREAM(NCO_P, NCO_N);
#undef NCO_P
#undef NCO_N
}

static void NC_FN(nc_scale_apply_stream)(const float *s, float *y, const float *w, nc_int n,
                                         float scale, nc_carry *c)
{
#define NCO_P(o, m) NC_FN(nco_scale_apply_impl)(0, s + (o), tmp, w ? w + (o) : NULL, (m), scale)
#define NCO_N(o, m) NC_FN(nco_scale_apply_impl)(1, s + (o), y + (o), w ? w + (o) : NULL, (m), scale)
    NCO_APPLY_STREAM(NCO_P, NCO_N);
#undef NCO_P
#undef NCO_N
}

/* one output vector of nco_ln_apply_impl (the same operations) */
NC_INLINE ncv NC_FN(nco_ln_vec)(const int W, const int B, ncv sx, const float *w,
                                const float *b, ncv hv, ncv sv, ncv cv)
{
    const ncv t = ncv_fma(sx - hv, sv, cv);
    if (W && B) return ncv_fma(t, ncv_ld(w), ncv_ld(b));
    if (W) return t * ncv_ld(w);
    if (B) return t + ncv_ld(b);
    return t;
}

/*
 * The streamed norm pipeline, one step: the moments of row B (with an add, s = (x + xb)
 * + r stored into d; else s = x) in the same loop as row A's outputs (y from its s, and
 * with an add s itself, streamed out).  One row at a time, the memory loads stop while a
 * row's reductions and outputs are computed; fused, the loads of the next row overlap the
 * stores of this one.  add_layer_norm 16384x1024 + sum_out, AMD EPYC Zen 5, AVX-512,
 * builds alternated in one session: NumPy's layout (rows 16 bytes past a line) 1T 27-29
 * -> 32-38 GB/s, 2T 39-44 -> 48-53; 64-byte aligned rows 1T 38-40 -> 45-54, 2T 40-46 ->
 * 48-55.  Row B's moments are nc_moments' (RMS: nc_sumsq's) for a one-chunk row,
 * operation for operation (the same bits); row A's outputs are nco_ln_apply_impl's (RMS:
 * nco_scale_apply_impl's; the same bits), whole lines streamed from the registers and
 * the partial lines at either end through the carries.
 * One chunk (n <= NC_CHUNK floats of row B and the same range of row A; nc_stream_fused
 * cuts longer rows, and the carries join the chunks' partial lines as they join rows').
 * kset: K is the row's shift, given (the chunks after the first), else computed here.
 * Needs float-aligned outputs; rows A and B distinct.
 */
NC_INLINE void NC_FN(nco_fused_body)(const int RMS, const int ADD, const int XB, const int W,
                                     const int B, nc_fuse *f, int kset, float Kgiven)
{
    const nc_int n = f->n, len = n;
    const float *const x = f->x, *const xb = f->xb, *const r = f->r, *const sa = f->sa;
    const float *const w = f->w, *const b = f->b;
    float *const dc = f->d, *const ya = f->ya, *const soa = f->soa;
    float tmp[NC_LINE_FLOATS];
    nc_int i = 0, tail, k;
    /* row B: the shift and the lane sums of nc_moments (RMS: nc_sumsq's, q only) */
    const float K = RMS ? 0.0f
                        : kset ? Kgiven : NC_FN(nco_shift)(x, XB ? xb : NULL, ADD ? r : NULL, n);
    const ncv kv = K - (ncv){0};
    ncv a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    ncv q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    /* row A: nco_ln_apply_impl's constants (RMS: nco_scale_apply_impl's, sv only) */
    const float mhi = f->mhi, mlo = f->mlo, scale = f->scale, c = -(mlo * scale);
    const ncv hv = mhi - (ncv){0}, cv = c - (ncv){0}, sv = scale - (ncv){0};
    /* row A: the partial first lines, through the carries */
    const nc_int hy = NC_FN(nco_line_peel)(ya, n);
    const nc_int hs = soa ? NC_FN(nco_line_peel)(soa, n) : 0;
    if (hy > 0) {
        if (RMS) NC_FN(nco_scale_apply_impl)(0, sa, tmp, w, hy, scale);
        else NC_FN(nco_ln_apply_impl)(0, sa, tmp, w, b, hy, mhi, mlo, scale);
        NC_FN(nc_stream_row)(ya, tmp, hy, f->cy);
    }
    if (hs > 0) NC_FN(nc_stream_row)(soa, sa, hs, f->cs);
    nc_stream_flush(f->cy);     /* (empty unless an earlier row did not end where A starts) */
    nc_stream_flush(f->cs);
    /* floats of whole lines after the heads, and the blocks done in the fused loop */
    const nc_int ly = (n - hy) / NC_LINE_FLOATS * NC_LINE_FLOATS;
    const nc_int ls = soa ? (n - hs) / NC_LINE_FLOATS * NC_LINE_FLOATS : n;
    nc_int nf = n / NC_BLK;
    if (nf > ly / NC_BLK) nf = ly / NC_BLK;
    if (nf > ls / NC_BLK) nf = ls / NC_BLK;
    for (k = 0; k < nf; k++, i += NC_BLK) {
        ncv v0, v1, v2, v3;
        if (ADD) {
#define NCO_SB(o) (XB ? (ncv_ld(x + (o)) + ncv_ld(xb + (o))) + ncv_ld(r + (o))             \
                      : ncv_ld(x + (o)) + ncv_ld(r + (o)))
            v0 = NCO_SB(i); ncv_st(dc + i, v0);
            v1 = NCO_SB(i + NC_VW); ncv_st(dc + i + NC_VW, v1);
            v2 = NCO_SB(i + 2 * NC_VW); ncv_st(dc + i + 2 * NC_VW, v2);
            v3 = NCO_SB(i + 3 * NC_VW); ncv_st(dc + i + 3 * NC_VW, v3);
#undef NCO_SB
        } else {
            v0 = ncv_ld(x + i); v1 = ncv_ld(x + i + NC_VW);
            v2 = ncv_ld(x + i + 2 * NC_VW); v3 = ncv_ld(x + i + 3 * NC_VW);
        }
        if (!RMS) {
            v0 -= kv; v1 -= kv; v2 -= kv; v3 -= kv;
            a0 += v0; a1 += v1; a2 += v2; a3 += v3;
        }
        q0 = ncv_fma(v0, v0, q0); q1 = ncv_fma(v1, v1, q1);
        q2 = ncv_fma(v2, v2, q2); q3 = ncv_fma(v3, v3, q3);
        if (f->px) {
            /* the same block of the row after B, a row ahead of its loads */
            for (int u = 0; u < NC_BLK; u += NC_LINE_FLOATS) {
                __builtin_prefetch(f->px + i + u, 0, 3);
                if (ADD) __builtin_prefetch(f->pr + i + u, 0, 3);
            }
        }
        /* row A: the same block of its whole lines */
        NC_UNROLL_ALL
        for (int u = 0; u < NC_UNROLL; u++) {
            const nc_int o = hy + i + u * NC_VW;
            const ncv sx = ncv_ld(sa + o);
            ncv_stream(ya + o, RMS ? (W ? (sx * sv) * ncv_ld(w + o) : sx * sv)
                                   : NC_FN(nco_ln_vec)(W, B, sx, W ? w + o : NULL,
                                                       B ? b + o : NULL, hv, sv, cv));
        }
        if (soa) {
            NC_UNROLL_ALL
            for (int u = 0; u < NC_UNROLL; u++) {
                const nc_int o = hs + i + u * NC_VW;
                ncv_stream(soa + o, ncv_ld(sa + o));
            }
        }
    }
    /* the rest of row B, as nc_moments (nc_sumsq) goes on from block nf */
    if (!ADD && RMS) NC_SQ_LOOP(x);
    else if (!ADD) NC_MOM_LOOP(x);
    else if (RMS && XB) NC_ADD_STORE_SQ((ncv_ld(x + o) + ncv_ld(xb + o)) + ncv_ld(r + o));
    else if (RMS) NC_ADD_STORE_SQ(ncv_ld(x + o) + ncv_ld(r + o));
    else if (XB) NC_ADD_STORE_MOM((ncv_ld(x + o) + ncv_ld(xb + o)) + ncv_ld(r + o));
    else NC_ADD_STORE_MOM(ncv_ld(x + o) + ncv_ld(r + o));
    tail = i;
    if (ADD && XB) for (; i < len; i++) dc[i] = (x[i] + xb[i]) + r[i];
    else if (ADD) for (; i < len; i++) dc[i] = x[i] + r[i];
    /* (the row's s: stored in dc when adding, else x itself) */
    const float *const srcb = ADD ? dc : x;
    /* the rest of row A: whole lines, then the partial last ones into the carries */
    const nc_int done = nf * NC_BLK;
    if (ly > done && RMS)
        NC_FN(nco_scale_apply_impl)(1, sa + hy + done, ya + hy + done, W ? w + hy + done : NULL,
                                    ly - done, scale);
    else if (ly > done)
        NC_FN(nco_ln_apply_impl)(1, sa + hy + done, ya + hy + done, W ? w + hy + done : NULL,
                                 B ? b + hy + done : NULL, ly - done, mhi, mlo, scale);
    if (hy + ly < n) {
        if (RMS)
            NC_FN(nco_scale_apply_impl)(0, sa + hy + ly, tmp, W ? w + hy + ly : NULL,
                                        n - hy - ly, scale);
        else
            NC_FN(nco_ln_apply_impl)(0, sa + hy + ly, tmp, W ? w + hy + ly : NULL,
                                     B ? b + hy + ly : NULL, n - hy - ly, mhi, mlo, scale);
        NC_FN(nc_stream_row)(ya + hy + ly, tmp, n - hy - ly, f->cy);
    }
    if (soa) {
        for (nc_int o = hs + done; o < hs + ls; o += NC_VW) ncv_stream(soa + o, ncv_ld(sa + o));
        if (hs + ls < n) NC_FN(nc_stream_row)(soa + hs + ls, sa + hs + ls, n - hs - ls, f->cs);
    }
    if (RMS) {
        f->mean = 0.0;
        f->m2 = NC_FN(nco_chunk_sumsq)(srcb, len, tail, q0, q1, q2, q3);
    } else {
        NC_FN(nco_chunk_stats)(srcb, len, tail, K, a0, a1, a2, a3, q0, q1, q2, q3, &f->mean,
                               &f->m2);
    }
}

static void NC_FN(nco_fused_chunk)(nc_fuse *f, int kset, float K)
{
    const int add = f->r != NULL, xb = f->xb != NULL, w = f->w != NULL, b = f->b != NULL;
    if (f->rms && !add) {
        if (w) NC_FN(nco_fused_body)(1, 0, 0, 1, 0, f, kset, K);
        else NC_FN(nco_fused_body)(1, 0, 0, 0, 0, f, kset, K);
    } else if (f->rms) {
        if (xb && w) NC_FN(nco_fused_body)(1, 1, 1, 1, 0, f, kset, K);
        else if (xb) NC_FN(nco_fused_body)(1, 1, 1, 0, 0, f, kset, K);
        else if (w) NC_FN(nco_fused_body)(1, 1, 0, 1, 0, f, kset, K);
        else NC_FN(nco_fused_body)(1, 1, 0, 0, 0, f, kset, K);
    } else if (!add) {
        if (w && b) NC_FN(nco_fused_body)(0, 0, 0, 1, 1, f, kset, K);
        else if (w) NC_FN(nco_fused_body)(0, 0, 0, 1, 0, f, kset, K);
        else if (b) NC_FN(nco_fused_body)(0, 0, 0, 0, 1, f, kset, K);
        else NC_FN(nco_fused_body)(0, 0, 0, 0, 0, f, kset, K);
    } else if (xb) {
        if (w && b) NC_FN(nco_fused_body)(0, 1, 1, 1, 1, f, kset, K);
        else if (w) NC_FN(nco_fused_body)(0, 1, 1, 1, 0, f, kset, K);
        else if (b) NC_FN(nco_fused_body)(0, 1, 1, 0, 1, f, kset, K);
        else NC_FN(nco_fused_body)(0, 1, 1, 0, 0, f, kset, K);
    } else {
        if (w && b) NC_FN(nco_fused_body)(0, 1, 0, 1, 1, f, kset, K);
        else if (w) NC_FN(nco_fused_body)(0, 1, 0, 1, 0, f, kset, K);
        else if (b) NC_FN(nco_fused_body)(0, 1, 0, 0, 1, f, kset, K);
        else NC_FN(nco_fused_body)(0, 1, 0, 0, 0, f, kset, K);
    }
}

/*
 * The streamed norm pipeline, one step (see nco_fused_body): row B's moments with row A's
 * outputs.  A row longer than NC_CHUNK goes chunk by chunk, as nc_moments (nc_sumsq) takes
 * it: the row's shift K from its first values, each chunk's lane sums and statistics, the
 * chunks merged in order (Chan et al.; RMS: the chunks' sums of squares added) - the same
 * bits - while row A's outputs over the same range of elements stream out, and the chunk
 * after row B's is prefetched (a whole row ahead, as for short rows, thrashed the L1 at
 * 4096-8192 floats).  Before, rows over NC_CHUNK went one at a time.  layer_norm /
 * rms_norm / add_layer_norm, 64 MB inputs, the builds loaded into one process and
 * alternated (bench/ab_builds.py --kernel norms; AMD EPYC Zen 5, AVX-512; two runs,
 * noise +-7%): two threads 8192x2048 1.27-1.31x / 1.28x / 1.36x, 4096x4096 1.09-1.13x /
 * 1.14x / 1.02-1.16x, 2048x8192 1.04-1.12x / 1.08-1.15x / 1.09-1.11x; one thread
 * 8192x2048 1.31-1.36x / 1.24-1.31x / 1.46-1.47x, 4096x4096 0.97-1.0x / 1.21-1.25x /
 * 0.88-1.22x, 2048x8192 0.86-0.91x / 1.06-1.08x / 0.92-0.95x (the loss: a row A of 8192
 * floats with its weight and bias, 96 KB, re-read from L2 beside the streams; in a fast
 * memory phase 1.04-1.27x at one thread; the AVX2 variant 0.97-1.53x, report).
 */
static void NC_FN(nc_stream_fused)(nc_fuse *f)
{
    const nc_int n = f->n;
    if (n <= NC_CHUNK) {
        NC_FN(nco_fused_chunk)(f, 0, 0.0f);
        return;
    }
    const float K = f->rms ? 0.0f : NC_FN(nco_shift)(f->x, f->xb, f->r, n);
    double cnt = 0.0, mean = 0.0, m2 = 0.0;
    nc_fuse g = *f;
    for (nc_int c0 = 0; c0 < n; c0 += NC_CHUNK) {
        const nc_int len = n - c0 < NC_CHUNK ? n - c0 : NC_CHUNK;
#define NCO_AT(p) ((p) ? (p) + c0 : NULL)
        g.x = f->x + c0; g.xb = NCO_AT(f->xb); g.r = NCO_AT(f->r);
        /* prefetch the chunk after this one: the row's next (when it is a whole chunk),
           else, from the last chunk, the next row's first */
        if (c0 + 2 * NC_CHUNK <= n) {
            g.px = f->x + c0 + NC_CHUNK;
            g.pr = f->r ? f->r + c0 + NC_CHUNK : NULL;
        } else if (c0 + NC_CHUNK >= n) {
            g.px = f->px;
            g.pr = f->pr;
        } else {
            g.px = NULL;
            g.pr = NULL;
        }
        g.d = NCO_AT(f->d);
        g.sa = f->sa + c0; g.ya = f->ya + c0; g.soa = NCO_AT(f->soa);
        g.w = NCO_AT(f->w); g.b = NCO_AT(f->b);
#undef NCO_AT
        g.n = len;
        NC_FN(nco_fused_chunk)(&g, 1, K);
        if (f->rms) m2 += g.m2;
        else NC_FN(nco_chan_merge)(&cnt, &mean, &m2, len, g.mean, g.m2);
    }
    f->mean = mean;
    f->m2 = m2;
}

/* nc_affine_scalar's outputs streamed (the same bits): a plane of n floats with one
   channel's parameters; whole lines from the registers, the partial ones through c. */
static void NC_FN(nc_affine_scalar_stream)(const float *x, float *y, nc_int n, float mu,
                                           float a, float b, int centred, nc_carry *c)
{
#define NCO_P(o, k) NC_FN(nc_affine_scalar)(x + (o), tmp, (k), mu, a, b, centred)
#define NCO_N(o, k)                                                                       \
    do {                                                                                  \
        const ncv mv = mu - (ncv){0}, av = a - (ncv){0}, bv = b - (ncv){0};               \
        if (centred)                                                                      \
            for (nc_int i = (o); i < (o) + (k); i += NC_VW)                               \
                ncv_stream(y + i, ncv_fma(ncv_ld(x + i) - mv, av, bv));                   \
        else                                                                              \
            for (nc_int i = (o); i < (o) + (k); i += NC_VW)                               \
                ncv_stream(y + i, ncv_fma(ncv_ld(x + i), av, bv));                        \
    } while (0)
    NCO_APPLY_STREAM(NCO_P, NCO_N);
#undef NCO_P
#undef NCO_N
}

/* nc_affine_rows' outputs streamed (the same bits): nrows consecutive rows of n floats
   (channels last) as one run of n * nrows floats, cut into lines wherever they fall; the
   parameters m2, a2, b2 hold n + NC_LINE_FLOATS values, the channels repeated cyclically,
   so that the 16 parameters of a line starting at channel k are m2[k .. k + 15]. */
static void NC_FN(nc_affine_rows_stream)(const float *x, float *y, const float *m2,
                                         const float *a2, const float *b2, nc_int n,
                                         nc_int nrows, nc_carry *c)
{
    float tmp[NC_LINE_FLOATS];
    const nc_int total = n * nrows;
    nc_int h = NC_FN(nco_line_peel)(y, total), k, q = 0;
    /* the partial first line */
    for (k = 0; k < h; k++, q = q + 1 == n ? 0 : q + 1)
        tmp[k] = m2 ? nc_fmaf(x[k] - m2[q], a2[q], b2[q]) : nc_fmaf(x[k], a2[q], b2[q]);
    if (h > 0) NC_FN(nc_stream_row)(y, tmp, h, c);
    nc_stream_flush(c);
    /* whole lines; q = the channel of the line's first element */
    nc_int o = h;
    for (; total - o >= NC_LINE_FLOATS; o += NC_LINE_FLOATS) {
        NC_UNROLL_ALL
        for (int u = 0; u < NC_LINE_FLOATS / NC_VW; u++) {
            const nc_int e = o + u * NC_VW, pq = q + u * NC_VW;
            ncv v = m2 ? ncv_fma(ncv_ld(x + e) - ncv_ld(m2 + pq), ncv_ld(a2 + pq), ncv_ld(b2 + pq))
                       : ncv_fma(ncv_ld(x + e), ncv_ld(a2 + pq), ncv_ld(b2 + pq));
            ncv_stream(y + e, v);
        }
        q += NC_LINE_FLOATS;
        while (q >= n) q -= n;
    }
    /* the partial last line, held in the carry */
    for (k = 0; o + k < total; k++, q = q + 1 == n ? 0 : q + 1)
        tmp[k] = m2 ? nc_fmaf(x[o + k] - m2[q], a2[q], b2[q]) : nc_fmaf(x[o + k], a2[q], b2[q]);
    if (k > 0) NC_FN(nc_stream_row)(y + o, tmp, k, c);
}

#undef NCO_APPLY_STREAM
#undef NCO_ST

#undef NC_ADD_STORE_MOM
#undef NC_ADD_STORE_SQ
#undef NC_MOM_LOOP
#undef NC_SQ_LOOP

/*
 * normcy element-wise / row kernels for the Transformer block: masked + scaled softmax,
 * exact (erf) GELU, tanh-approximation GELU, ReLU, fused bias + activation (+ residual).
 *
 * float32, written once against the SIMD vocabulary of nc_simd.h and compiled once per
 * instruction set by nc_api.h (no include guard on purpose; names go through NC_FN); no
 * intrinsics outside nc_simd.h and no -ffast-math.  Tails shorter than one vector go
 * through the same vector code (partial loads and stores, ncv_ld_n / ncv_st_n), so every
 * element of a row is computed by the same instruction sequence (results do not depend on
 * position or thread count).
 *
 * Numerics (measured against float64 references over dense grids, see tests/test_ops.py)
 * ------------------------------------------------------------------------------------
 * nc_ops_exp   : Cody-Waite range reduction + Cephes degree-6 polynomial, scaling by
 *                2^n in two normal factors; max relative error 1.4 ulp (8.3e-8 measured)
 *                for x in [-86.5, 88.72]; x < -86.5 -> +0 (true value < 2.7e-38: no
 *                subnormal is ever formed, they cost ~100-cycle microcode assists);
 *                x > 88.72 -> +inf; NaN -> NaN.
 * GELU (erf)   : x * Phi(x) with Phi(x) = 1 - erfc(z)/2 (x >= 0) or erfc(z)/2 (x < 0),
 *                z = |x|/sqrt(2), erfc(z) = t Q(t) exp(-z^2), t = 1/(1 + z/2), Q a
 *                degree-8 polynomial (relative error of the fit 5.8e-8), exp(-z^2) =
 *                2^(-(log2 e / 2) x^2) straight from x.  No cancellation for negative x:
 *                relative error <= 4e-7 * max(5, x^2/2) (measured over 317M inputs, every
 *                7th float32 of [-16, 16] and all of +-[12.5, 14]: 4.5e-7 for x > 0,
 *                4.8e-7 on [-2, 0], 9.2e-7 on [-4, -2], 4.9e-6 on [-10, -4], 8.7e-6
 *                below; the growth is the float32 rounding of the exponent).  |x| > 13.16:
 *                x for x > 0, -0 for x < 0 (|GELU| < 1.2e-38 there).
 * GELU (tanh)  : 0.5 x (1 + tanh(u)) rewritten exactly as x / (1 + exp(-2u)),
 *                u = sqrt(2/pi) (x + 0.044715 x^3); no cancellation: relative error
 *                <= 4e-7 * max(5, 2|u|) (1.2e-7 for x > 0, 1.2e-6 at x = -4).
 * softmax      : max-subtracted, float32 lane sums (four vector accumulators, i.e.
 *                4 x lanes partial sums, then a fixed-order reduction that depends on the
 *                row length only), multiply by the reciprocal of the sum: relative error
 *                <= 1e-6 + 1e-9 n, plus the inherent 6e-8 |logit| of rounding the scaled
 *                logits to float32.
 *                Positions masked out (bool mask, causal, or additive -inf) give exactly 0;
 *                a row with every position masked gives all zeros (never NaN).  A NaN in
 *                an unmasked position makes its row NaN; nothing leaks into other rows.
 */
/* ---- kernel bodies: included once per SIMD variant by nc_api.h ---- */
#define nco_exp_reduced NC_FN(nco_exp_reduced)
#define nco_exp_reduced_step NC_FN(nco_exp_reduced_step)
#define nco_scale_exp2 NC_FN(nco_scale_exp2)
#define nco_exp_nonpos_step NC_FN(nco_exp_nonpos_step)
#define nco_expnp_state NC_FN(nco_expnp_state)
#define nco_exp_reduced_n NC_FN(nco_exp_reduced_n)
#define nco_exp_n NC_FN(nco_exp_n)
#define nco_exp_nonpos_n NC_FN(nco_exp_nonpos_n)
#define nco_gelu_c1_step NC_FN(nco_gelu_c1_step)
#define nco_gelu_c2_step NC_FN(nco_gelu_c2_step)
#define nco_gelu_final NC_FN(nco_gelu_final)
#define nco_gelu_erf_n NC_FN(nco_gelu_erf_n)
#define nco_gelu_tanh_n NC_FN(nco_gelu_tanh_n)
#define nco_relu_n NC_FN(nco_relu_n)
#define nco_exp_inrange_n NC_FN(nco_exp_inrange_n)
#define nco_gelu_rows_piped NC_FN(nco_gelu_rows_piped)
#define nco_exp NC_FN(nco_exp)
#define nco_exp_nonpos NC_FN(nco_exp_nonpos)
#define nco_exp_inrange NC_FN(nco_exp_inrange)
#define nco_gelu_erf NC_FN(nco_gelu_erf)
#define nco_gelu_tanh NC_FN(nco_gelu_tanh)
#define nco_relu NC_FN(nco_relu)
#define nco_apply_act NC_FN(nco_apply_act)
#define nco_softmax_logits NC_FN(nco_softmax_logits)
#define nco_softmax_exp NC_FN(nco_softmax_exp)
#define nco_softmax_scale NC_FN(nco_softmax_scale)

/*
 * Lockstep: the exp and GELU bodies below take NU vectors (NU <= NCO_NU, a compile-time
 * constant after inlining) and do every step for all NU before the next step.  Each body is
 * one long dependency chain (~55 cycles for the exact GELU's longer one: a division and
 * eight FMAs of Horner; ~110 with the older formula), and the out-of-order window holds
 * little more than one chain's worth of vector operations: written one vector after
 * another, four independent vectors still ran one at a time, latency-bound (AMD EPYC,
 * AVX2: 46-50 cycles per vector for ~37 operations, older formula).  Interleaved in the
 * instruction stream, the chains fill the FMA pipes.  Every element still goes through the
 * same operations in the same order (the same bits as one vector at a time); NU = 1 is the
 * one-vector form.
 * The same holds one level up: the exact GELU's row pipeline (NCO_GELU_PIPE) runs chain 1
 * of one group and chain 2 of another, their steps alternating in the instruction stream
 * (nco_gelu_c1_step, nco_gelu_c2_step): written one after the other, the first's waiting
 * operations filled the FP scheduler before the second's could enter it.
 * What limits the exact GELU on AVX2 is latency and the 16 ymm registers, not the FMA
 * count: the loop of four vectors spills (~80 stack accesses in ~240 instructions), and
 * variants with fewer FMAs but more live values measured slower (session 15: a base-2
 * form of the old single-chain formula, 80 instead of 92 FMA-pipe operations per four
 * vectors, was 4-12% slower with 93-108 stack accesses; Estrin's scheme for its
 * polynomials, 25% slower).  What helped was cutting the chain: the two independent
 * chains of the current formula (see nco_gelu_c1_step) with the group pipeline, 6-15%
 * less time than the single ~110-cycle chain pipelined the same way (AMD EPYC, AVX2, 1
 * and 2 threads).  Four vectors per group stays best (two per group was 8-21% slower
 * with the old formula; three, within the noise).
 */
#define NCO_EACH NC_UNROLL_ALL for (int u = 0; u < NU; u++)
/* vectors per lockstep group in the row loops: four chains cover the exact GELU's latency
   on two FMA pipes (AVX2); the same on AVX-512, whose 32 registers hold them easily */
#define NCO_NU 4
/* the lockstep bodies size their arrays by NCO_NU; the softmax takes four exponentials at a
   time (its four partial sums) and the GEMM's strip epilogue two vectors per row */
#if NCO_NU < 4 || NCO_NU % 2
#error "NCO_NU must be even and at least 4"
#endif

/* exp(x), see the header comment for accuracy.  No operation ever sees or makes a subnormal
 * (those take microcode assists costing ~100 cycles each on x86): arguments below
 * NCO_EXP_LO give +0 (the true value is < 2.7e-38 there). */
#define NCO_EXP_LO (-86.5f)
/* exp(xc) for xc already clamped to [NCO_EXP_LO, 88.72], before the final scaling:
 * Cody-Waite reduction by ln 2 and a degree-6 polynomial; y in [0.7, 1.42] and ni = n with
 * exp(xc) = y 2^n, n in [-125, 128].  Shared by nco_exp and nco_exp_nonpos, which differ
 * only in how they apply 2^n (both exactly: every product is normal), so the two give the
 * same bits wherever both are defined.  In place: xc[u] becomes y. */
/* round-to-nearest-integer constant 1.5 * 2^23: for |t| < 2^22, t + it holds round(t) in
   its low mantissa bits, and (t + it) - it is round(t) exactly */
#define NCO_ROUND_MAGIC 12582912.0f
/* y * 2^n for y * 2^n known to be normal (so are y and the result): n added to the exponent
   field, an integer addition instead of a multiplication, which would take an FMA pipe.
   n must keep the product normal (the callers clamp it); n * 2^23 has no overflow and no
   negative shift in the source, and the compiler emits one shift. */
NC_INLINE ncv nco_scale_exp2(ncv y, nciv n) { return (ncv)((nciv)y + n * (1 << 23)); }
#define NCO_EXPR_STEPS 9
/* step S (a compile-time constant after unrolling) of nco_exp_reduced_n */
NC_INLINE void nco_exp_reduced_step(const int S, const int NU, ncv *xc, ncv *n, ncv *r,
                                    ncv *p, nciv *ni)
{
    /* n = round(x / ln 2) with the 1.5*2^23 trick (exact for |t| < 2^22) */
    const ncv magic = ncv_set1(NCO_ROUND_MAGIC);
    switch (S) {
    case 0:
        NCO_EACH n[u] = ncv_fma(xc[u], ncv_set1(1.44269504088896341f), magic) - magic;
        break;
    case 1: NCO_EACH r[u] = ncv_fma(-n[u], ncv_set1(0.693359375f), xc[u]); break;
    case 2: NCO_EACH r[u] = ncv_fma(-n[u], ncv_set1(-2.12194440e-4f), r[u]); break;
    case 3:
        NCO_EACH p[u] = ncv_fma(ncv_set1(1.9875691500E-4f), r[u], ncv_set1(1.3981999507E-3f));
        break;
    case 4: NCO_EACH p[u] = ncv_fma(p[u], r[u], ncv_set1(8.3334519073E-3f)); break;
    case 5: NCO_EACH p[u] = ncv_fma(p[u], r[u], ncv_set1(4.1665795894E-2f)); break;
    case 6: NCO_EACH p[u] = ncv_fma(p[u], r[u], ncv_set1(1.6666665459E-1f)); break;
    case 7: NCO_EACH p[u] = ncv_fma(p[u], r[u], ncv_set1(5.0000001201E-1f)); break;
    default:
        NCO_EACH ni[u] = __builtin_convertvector(n[u], nciv);
        NCO_EACH xc[u] = ncv_fma(p[u], r[u] * r[u], r[u]) + ncv_set1(1.0f);
        break;
    }
}

NC_INLINE void nco_exp_reduced_n(const int NU, ncv *xc, nciv *ni)
{
    ncv n[NCO_NU], r[NCO_NU], p[NCO_NU];
    NC_UNROLL_ALL
    for (int S = 0; S < NCO_EXPR_STEPS; S++) nco_exp_reduced_step(S, NU, xc, n, r, p, ni);
}

NC_INLINE ncv nco_exp_reduced(ncv xc, nciv *ni)
{
    nco_exp_reduced_n(1, &xc, ni);
    return xc;
}

/* in place, x[u] -> exp(x[u]) */
NC_INLINE void nco_exp_n(const int NU, ncv *x)
{
    const ncv lo = ncv_set1(NCO_EXP_LO), hi = ncv_set1(88.7228394f);
    nciv under[NCO_NU], over[NCO_NU], ni[NCO_NU];
    ncv y[NCO_NU];
    NCO_EACH { under[u] = x[u] < lo; over[u] = x[u] > hi; }
    NCO_EACH y[u] = ncv_sel(under[u], lo, ncv_sel(over[u], hi, x[u]));
    nco_exp_reduced_n(NU, y, ni);
    NCO_EACH {
        /* 2^n as two normal factors (2^128 alone would be inf) */
        nciv n1 = ni[u] >> 1;
        nciv n2 = ni[u] - n1;
        y[u] = (y[u] * (ncv)((n1 + 127) << 23)) * (ncv)((n2 + 127) << 23);
    }
    NCO_EACH {
        y[u] = ncv_sel(under[u], ncv_set1(0.0f), y[u]);
        y[u] = ncv_sel(over[u], ncv_set1(INFINITY), y[u]);
        /* NaN in -> NaN out (the clamps above compare false for NaN, keep it explicit) */
        x[u] = ncv_sel(x[u] != x[u], x[u], y[u]);
    }
}

NC_INLINE ncv nco_exp(ncv x)
{
    nco_exp_n(1, &x);
    return x;
}

/* exp(x) for x <= 1 (or -inf / NaN), as in softmax after the max subtraction: the same
 * results as nco_exp on that domain, minus the overflow handling.
 * n <= 1 here and n >= -125 after the clamp, so y 2^n is normal (exponent field of y, 126
 * or 127, plus n >= 1) and adding n to the exponent field is exactly the multiplication by
 * 2^n: an integer addition instead of a multiplication, which would take an FMA pipe.  A
 * NaN x gives y = NaN and n = INT_MIN on x86 (0 on aarch64), which the shift by 23
 * turns into 0: the NaN is kept as it is.  In place. */
#define NCO_EXPNP_STEPS (NCO_EXPR_STEPS + 3)
typedef struct {
    nciv under[NCO_NU], ni[NCO_NU];
    ncv n[NCO_NU], r[NCO_NU], p[NCO_NU];
} nco_expnp_state;

/* step S of nco_exp_nonpos_n (a compile-time constant after unrolling).  Written as steps,
   with its state in a struct, since the GELU pipeline of sessions 13-14 interleaved them;
   the direct form of the same operations compiled the softmax around it with other
   register assignments and measured 2-4% slower (session 15), so the steps stay. */
NC_INLINE void nco_exp_nonpos_step(const int S, const int NU, ncv *x, nco_expnp_state *st)
{
    if (S == 0) {
        const ncv lo = ncv_set1(NCO_EXP_LO);
        NCO_EACH { st->under[u] = x[u] < lo; x[u] = ncv_sel(st->under[u], lo, x[u]); }
    } else if (S <= NCO_EXPR_STEPS) {
        nco_exp_reduced_step(S - 1, NU, x, st->n, st->r, st->p, st->ni);
    } else if (S == NCO_EXPR_STEPS + 1) {
        NCO_EACH x[u] = nco_scale_exp2(x[u], st->ni[u]);   /* n in [-125, 1] */
    } else {
        NCO_EACH x[u] = ncv_sel(st->under[u], ncv_set1(0.0f), x[u]);
    }
}

NC_INLINE void nco_exp_nonpos_n(const int NU, ncv *x)
{
    nco_expnp_state st;
    NC_UNROLL_ALL
    for (int S = 0; S < NCO_EXPNP_STEPS; S++) nco_exp_nonpos_step(S, NU, x, &st);
}

NC_INLINE ncv nco_exp_nonpos(ncv x)
{
    nco_exp_nonpos_n(1, &x);
    return x;
}

/* nco_exp_nonpos for x known to lie in [NCO_EXP_LO, 1]: the same bits there, without the
   underflow clamp and its two selects (softmax takes it for rows whose logits span less
   than 86.5 after scaling: three of ~20 operations per vector) */
NC_INLINE void nco_exp_inrange_n(const int NU, ncv *x)
{
    nciv ni[NCO_NU];
    nco_exp_reduced_n(NU, x, ni);
    NCO_EACH x[u] = x[u] * (ncv)((ni[u] + 127) << 23);
}

NC_INLINE ncv nco_exp_inrange(ncv x)
{
    nco_exp_inrange_n(1, &x);
    return x;
}

/* Phi(x) * x, exact-erf GELU, as two independent chains per vector:
       erfc(z) / 2 = th Q(t) * 2^p,   z = |x| / sqrt 2,  t = 1 / (1 + z/2),  th = t / 2,
       p = -(log2 e / 2) x^2   (2^p = exp(-z^2)),
   Q(t) = erfcx(z) / t (erfcx(z) = exp(z^2) erfc(z)) a degree-8 polynomial in t, fitted in
   relative terms for |x| <= 13.2 (minimax; its float32 coefficients rounded one at a time,
   each rounding compensated by refitting the rest: 5.8e-8); normcy/src/fit_gelu.py makes
   the constants of this comment and of the code below.  Q is smooth: erfc(z) ~ exp(-z^2) /
   (z sqrt pi) at infinity is the factor t exp(-z^2).
   Chain 1 (nco_gelu_c1_step): th = 1 / (2 + z) (exactly t / 2: 2 + z is twice 1 + z/2,
   rounded the same), Q by Horner in th (the coefficients of t^k times 2^k), h1 = th Q.
   Chain 2 (nco_gelu_c2_step): 2^p with p = RN(RN(-(log2 e / 2) x) x) straight from x, in
   base 2: n = round(p), r = p - n exactly, 2^r a degree-6 minimax polynomial on [-1/2, 1/2]
   (1.6e-8), 2^n added to the exponent field.  p is clamped at -125 (2^r 2^n stays normal),
   and where it would be clamped (|x| > NCO_GELU_T, |GELU(x)| < 1.2e-38 for x < 0) chain 1
   gives h1 = 0 instead: the result is then x (x > 0) or -0 (x < 0).
   Compared with the earlier form erfc(z) = t exp(P(t) - z^2), whose exponential
   waited for the division and the polynomial (one chain of ~110 cycles per vector), the
   two chains run side by side (~55 and ~45 cycles), and x^2 / 2 no longer goes through the
   rounded z: errors 2-3x smaller for x < -2 (see the header). */
/* the largest |x| with RN(RN(x * -0.7213475) * x) >= -125: beyond it 2^p would be clamped */
#define NCO_GELU_T 13.163844108581543f
#define NCO_GELU_C1_STEPS 11
#define NCO_GELU_C2_STEPS 13
NC_INLINE void nco_gelu_c1_step(const int S, const int NU, const ncv *x, ncv *th, ncv *q)
{
    /* Q(2 th) = sum c[k] th^k, highest first */
    static const float c[9] = {-1.505706501e+01f, 3.626728058e+01f, -3.101600075e+01f,
                               8.803298950e+00f, -3.931066096e-01f, 1.614476204e+00f,
                               9.733105898e-01f, 5.646883845e-01f, 2.820882201e-01f};
    switch (S) {
    case 0:   /* 2 + z, one rounding */
        NCO_EACH th[u] = ncv_fma(ncv_abs(x[u]), ncv_set1(0.70710678118654752f),
                                 ncv_set1(2.0f));
        break;
    case 1:
        /* th = 1 / inf = 0 beyond NCO_GELU_T (selecting the divisor, not the quotient: GCC
           computed the division twice for the AVX-512 variant's masked select); a NaN x
           compares false and keeps th NaN */
        NCO_EACH th[u] = ncv_set1(1.0f) / ncv_sel(ncv_abs(x[u]) > ncv_set1(NCO_GELU_T),
                                                  ncv_set1(INFINITY), th[u]);
        break;
    case 2: NCO_EACH q[u] = ncv_fma(ncv_set1(c[0]), th[u], ncv_set1(c[1])); break;
    case 10: NCO_EACH q[u] = q[u] * th[u]; break;
    default: NCO_EACH q[u] = ncv_fma(q[u], th[u], ncv_set1(c[S - 1])); break;   /* 3..9 */
    }
}

NC_INLINE void nco_gelu_c2_step(const int S, const int NU, const ncv *x, ncv *p, ncv *k,
                                ncv *r)
{
    /* 2^r = sum e[i] r^i, highest first */
    static const float e[7] = {1.534581097e-04f, 1.339993090e-03f, 9.618489072e-03f,
                               5.550328642e-02f, 2.402264625e-01f, 6.931471825e-01f,
                               1.000000000e+00f};
    /* n = round(p) by the 1.5 * 2^23 trick: k = p + 1.5 * 2^23 holds n in its low bits */
    const ncv magic = ncv_set1(NCO_ROUND_MAGIC);
    switch (S) {
    case 0: NCO_EACH p[u] = x[u] * ncv_set1(-0.7213475108146667f); break;
    case 1: NCO_EACH p[u] = p[u] * x[u]; break;
    case 2: NCO_EACH p[u] = ncv_max(ncv_set1(-125.0f), p[u]); break;   /* keeps a NaN p */
    case 3: NCO_EACH k[u] = p[u] + magic; break;
    case 4: NCO_EACH r[u] = k[u] - magic; break;
    case 5: NCO_EACH r[u] = p[u] - r[u]; break;
    case 6: NCO_EACH p[u] = ncv_fma(ncv_set1(e[0]), r[u], ncv_set1(e[1])); break;
    case 12:
        /* 2^r 2^n (n in [-125, 0]: >= 2^-125.5, normal).  A NaN p gives garbage here, but
           then h1 is NaN too. */
        NCO_EACH p[u] = nco_scale_exp2(p[u], (nciv)k[u] - (nciv)magic);
        break;
    default: NCO_EACH p[u] = ncv_fma(p[u], r[u], ncv_set1(e[S - 5])); break;   /* 7..11 */
    }
}

/* the last step, in place on x: Phi from h1 and e = 2^p, times x */
NC_INLINE void nco_gelu_final(const int NU, ncv *x, const ncv *h1, const ncv *e)
{
    NCO_EACH {
        /* erfc(z) / 2 (x = inf: h1 = 0 and e = 2^-125) */
        ncv half_erfc = h1[u] * e[u];
        /* Phi = erfc/2 for x < 0, 1 - erfc/2 otherwise, selected by the sign bit (x = -0
           gives 1 - 0.5 = 0.5 = erfc(0)/2 either way) */
        ncv phi = ncv_sel_sign(x[u], half_erfc, ncv_set1(1.0f) - half_erfc);
        /* x = -inf: Phi = 0 and -inf * 0 would be NaN; the limit is -0, which -FLT_MAX * 0
           gives (MAXPS(-FLT_MAX, x) keeps every other x, NaN included) */
        x[u] = ncv_max(ncv_set1(-3.40282347e+38f), x[u]) * phi;
    }
}

/* the two chains' steps interleaved in the instruction stream (c1 0, c2 0, c1 1, ...) */
NC_INLINE void nco_gelu_erf_n(const int NU, ncv *x)
{
    ncv th[NCO_NU], h1[NCO_NU], e[NCO_NU], k[NCO_NU], r[NCO_NU];
    NC_UNROLL_ALL
    for (int S = 0; S < NCO_GELU_C2_STEPS; S++) {
        if (S < NCO_GELU_C1_STEPS) nco_gelu_c1_step(S, NU, x, th, h1);
        nco_gelu_c2_step(S, NU, x, e, k, r);
    }
    nco_gelu_final(NU, x, h1, e);
}

NC_INLINE ncv nco_gelu_erf(ncv x)
{
    nco_gelu_erf_n(1, &x);
    return x;
}

/* x / (1 + exp(-2u)) == 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3), in place */
NC_INLINE void nco_gelu_tanh_n(const int NU, ncv *x)
{
    ncv e[NCO_NU];
    NCO_EACH {
        ncv x3 = x[u] * x[u] * x[u];
        e[u] = ncv_set1(-1.5957691216057308f) * ncv_fma(ncv_set1(0.044715f), x3, x[u]);
    }
    nco_exp_n(NU, e);
    NCO_EACH {
        ncv y = x[u] / (ncv_set1(1.0f) + e[u]);
        x[u] = ncv_sel(x[u] == ncv_set1(-INFINITY), ncv_set1(-0.0f), y);
    }
}

NC_INLINE ncv nco_gelu_tanh(ncv x)
{
    nco_gelu_tanh_n(1, &x);
    return x;
}

NC_INLINE ncv nco_relu(ncv x)
{
    /* NaN stays NaN (the compare is false) */
    return ncv_sel(x < ncv_set1(0.0f), ncv_set1(0.0f), x);
}


NC_INLINE ncv nco_apply_act(ncv v, int act)
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
/* NCO_NU vectors per iteration first, their activations in lockstep (see "Lockstep"
   above): each activation is one long dependency chain, so independent vectors must be in
   flight together to fill the FMA pipes.  ACTN(NU, v) works in place on NU vectors; every
   element goes through the same instruction sequence whichever loop takes it. */
#define NCO_ACT_LOOP(ACTN)                                                             \
    do {                                                                               \
        for (; j + NCO_NU * NC_VW <= n; j += NCO_NU * NC_VW) {                         \
            const int NU = NCO_NU;                                                     \
            ncv v[NCO_NU];                                                             \
            NCO_EACH {                                                                 \
                v[u] = ncv_ld(x + j + u * NC_VW);                                      \
                if (bias) v[u] = v[u] + ncv_ld(bias + j + u * NC_VW);                  \
            }                                                                          \
            ACTN(NU, v);                                                               \
            NCO_EACH {                                                                 \
                if (res) v[u] = v[u] + ncv_ld(res + j + u * NC_VW);                    \
                ncv_st(out + j + u * NC_VW, v[u]);                                     \
            }                                                                          \
        }                                                                              \
        for (; j + NC_VW <= n; j += NC_VW) {                                           \
            ncv v = ncv_ld(x + j);                                                     \
            if (bias) v = v + ncv_ld(bias + j);                                        \
            ACTN(1, &v);                                                               \
            if (res) v = v + ncv_ld(res + j);                                          \
            ncv_st(out + j, v);                                                        \
        }                                                                              \
        if (j < n) {                                                                   \
            nc_int m = n - j;                                                          \
            ncv v = ncv_ld_n(x + j, m, 0.0f);                                          \
            if (bias) v = v + ncv_ld_n(bias + j, m, 0.0f);                             \
            ACTN(1, &v);                                                               \
            if (res) v = v + ncv_ld_n(res + j, m, 0.0f);                               \
            ncv_st_n(out + j, v, m);                                                   \
        }                                                                              \
    } while (0)

#define NCO_ID_N(NU, v) ((void)0)
NC_INLINE void nco_relu_n(const int NU, ncv *x) { NCO_EACH x[u] = nco_relu(x[u]); }

/*
 * The exact GELU software-pipelined over NG >= 1 groups of NCO_NU vectors: each iteration
 * runs chain 1 of group g+1 and chain 2 and the last step of group g, their steps
 * interleaved (four independent chains of each kind in flight; one group at a time, the
 * loop measured as fast as the old ~110-cycle chain's pipeline, and this 6-15% faster:
 * AMD EPYC, AVX2).  LD(g, u) gives vector u of group g (bias added), ST(g, u, v) stores it
 * (residual added); the row loop below and the GEMM's strip epilogue differ only in them.
 * LD(g, u) is called twice per vector (for chain 1, and for chain 2 and the last step one
 * iteration later), so that x is not held in a register through both; the two loads give
 * the same value (ST(g, u) comes after both, and the boundary allows an output only
 * identical to, or disjoint from, its inputs).
 * The same operations on every element as nco_gelu_erf (the same bits).
 */
#define NCO_GELU_PIPE(NG, LD, ST)                                                      \
    do {                                                                               \
        const int NU = NCO_NU;                                                         \
        ncv tha_[NCO_NU], ha_[NCO_NU];                                                 \
        {                                                                              \
            ncv x0_[NCO_NU];                                                           \
            NCO_EACH x0_[u] = LD(0, u);                                                \
            NC_UNROLL_ALL                                                              \
            for (int S = 0; S < NCO_GELU_C1_STEPS; S++)                                \
                nco_gelu_c1_step(S, NU, x0_, tha_, ha_);                               \
        }                                                                              \
        nc_int g_ = 0;                                                                 \
        for (; g_ + 1 < (NG); g_++) {                                                  \
            ncv xn_[NCO_NU], thb_[NCO_NU], hb_[NCO_NU], xo_[NCO_NU], e_[NCO_NU];       \
            ncv k_[NCO_NU], r_[NCO_NU];                                                \
            NCO_EACH { xn_[u] = LD(g_ + 1, u); xo_[u] = LD(g_, u); }                   \
            NC_UNROLL_ALL                                                              \
            for (int S = 0; S < NCO_GELU_C2_STEPS; S++) {                              \
                if (S < NCO_GELU_C1_STEPS) nco_gelu_c1_step(S, NU, xn_, thb_, hb_);    \
                nco_gelu_c2_step(S, NU, xo_, e_, k_, r_);                              \
            }                                                                          \
            nco_gelu_final(NU, xo_, ha_, e_);                                          \
            NCO_EACH { ST(g_, u, xo_[u]); ha_[u] = hb_[u]; }                           \
        }                                                                              \
        {                                                                              \
            ncv xo_[NCO_NU], e_[NCO_NU], k_[NCO_NU], r_[NCO_NU];                       \
            NCO_EACH xo_[u] = LD(g_, u);                                               \
            NC_UNROLL_ALL                                                              \
            for (int S = 0; S < NCO_GELU_C2_STEPS; S++)                                \
                nco_gelu_c2_step(S, NU, xo_, e_, k_, r_);                              \
            nco_gelu_final(NU, xo_, ha_, e_);                                          \
            NCO_EACH ST(g_, u, xo_[u]);                                                \
        }                                                                              \
    } while (0)

/* Whether the exact GELU's row loop uses the group pipeline (NCO_GELU_PIPE) or one group
   of NCO_NU vectors at a time (nco_gelu_erf_n).  The pipeline keeps two groups' chains
   live: on AVX2 it was 6-15% faster (AMD EPYC Zen 3, see above); on AVX-512 its ~28 live
   vectors and ~20 constants overflow the 32 zmm registers (54 stack accesses per group of
   four vectors in the loop GCC 12 made) and one group at a time was 1.07-1.09x faster in
   cache at one thread and 1.22-1.24x at 4096 x 1536, two threads (AMD EPYC Zen 5; same
   bits).  The GEMM's strip epilogue keeps the pipeline on every variant: without it the
   FFN's GEMM + GELU measured 0.97-1.00x on the Zen 5. */
#if NC_VW == 16
#define NCO_GELU_PIPED 0
#else
#define NCO_GELU_PIPED 1
#endif

/* the exact GELU's whole groups of a row (at least two, else none) through the pipeline;
   returns the elements done, the rest is NCO_ACT_LOOP's (all of them without the
   pipeline: NCO_GELU_PIPED) */
NC_INLINE nc_int nco_gelu_rows_piped(const float *x, const float *bias, const float *res,
                                     float *out, nc_int n)
{
    const nc_int G = NCO_NU * NC_VW, ng = n / G;
    if (!NCO_GELU_PIPED || ng < 2) return 0;
#define NCO_RLD(g, u) (bias ? ncv_ld(x + (g) * G + (u) * NC_VW) + ncv_ld(bias + (g) * G + (u) * NC_VW) \
                            : ncv_ld(x + (g) * G + (u) * NC_VW))
#define NCO_RST(g, u, v) ncv_st(out + (g) * G + (u) * NC_VW,                                      \
                                res ? (v) + ncv_ld(res + (g) * G + (u) * NC_VW) : (v))
    NCO_GELU_PIPE(ng, NCO_RLD, NCO_RST);
#undef NCO_RLD
#undef NCO_RST
    return ng * G;
}

static void NC_FN(nc_ops_act_row)(const float *x, const float *bias, const float *res,
                                  float *out, nc_int n, int act)
{
    nc_int j = 0;
    if (act == NCO_ACT_GELU) j = nco_gelu_rows_piped(x, bias, res, out, n);
    switch (act) {
    case NCO_ACT_RELU: NCO_ACT_LOOP(nco_relu_n); break;
    case NCO_ACT_GELU: NCO_ACT_LOOP(nco_gelu_erf_n); break;
    case NCO_ACT_GELU_TANH: NCO_ACT_LOOP(nco_gelu_tanh_n); break;
    default: NCO_ACT_LOOP(NCO_ID_N); break;
    }
}

/* plain exp over a row (exposed for tests of the polynomial) */
static void NC_FN(nc_ops_exp_row)(const float *x, float *out, nc_int n)
{
    const float *bias = NULL, *res = NULL;
    nc_int j = 0;
    NCO_ACT_LOOP(nco_exp_n);
}

/*
 * Softmax of one row of length n (unit stride), in place allowed (out == x):
 *   v[j] = x[j] * scale (+ mask[j]);  v[j] = -inf where kpm[j] != 0 or j >= limit;
 *   out[j] = exp(v[j] - max v) / sum exp(v - max v);  all -inf -> zeros.
 * mask (float) and kpm (bytes) are unit stride or NULL.
 */
/* pass 1: out[j] = x[j] * scale (+ mask[j]), -inf where dead; returns the row maximum and
   sets *mn to the minimum over the whole vectors (the partial last one excluded) */
NC_INLINE float nco_softmax_logits(const float *x, float *out, nc_int n, float scale,
                                   const float *mask, const uint8_t *kpm, nc_int limit,
                                   float *mn)
{
    const ncv ninf = ncv_set1(-INFINITY);
    const ncv vscale = ncv_set1(scale);
    nc_int j;
    if (limit > n) limit = n;
    if (limit < 0) limit = 0;
    const nciv iota = ncv_iota();
    /* vectors [0, nfull) lie wholly inside the row */
    const nc_int nfull = n - n % NC_VW;

    /* pass 1: scaled + masked logits into out, running max.  Max is exact whatever the
       order, so the common case (no per-position deaths among the whole vectors) keeps four
       independent maxima in flight. */
    ncv m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    const ncv pinf = ncv_set1(INFINITY);
    ncv l0 = pinf, l1 = pinf, l2 = pinf, l3 = pinf;
    j = 0;
    if (!kpm && limit >= nfull) {
        /* (GCC unswitches the loop on mask: one copy each, no test per vector) */
        for (; j + 4 * NC_VW <= nfull; j += 4 * NC_VW) {
            ncv v0, v1, v2, v3;
            if (mask) {
                v0 = ncv_fma(ncv_ld(x + j), vscale, ncv_ld(mask + j));
                v1 = ncv_fma(ncv_ld(x + j + NC_VW), vscale, ncv_ld(mask + j + NC_VW));
                v2 = ncv_fma(ncv_ld(x + j + 2 * NC_VW), vscale, ncv_ld(mask + j + 2 * NC_VW));
                v3 = ncv_fma(ncv_ld(x + j + 3 * NC_VW), vscale, ncv_ld(mask + j + 3 * NC_VW));
            } else {
                v0 = ncv_ld(x + j) * vscale;
                v1 = ncv_ld(x + j + NC_VW) * vscale;
                v2 = ncv_ld(x + j + 2 * NC_VW) * vscale;
                v3 = ncv_ld(x + j + 3 * NC_VW) * vscale;
            }
            ncv_st(out + j, v0);
            ncv_st(out + j + NC_VW, v1);
            ncv_st(out + j + 2 * NC_VW, v2);
            ncv_st(out + j + 3 * NC_VW, v3);
            m0 = ncv_max(v0, m0); m1 = ncv_max(v1, m1);
            m2 = ncv_max(v2, m2); m3 = ncv_max(v3, m3);
            l0 = ncv_min(v0, l0); l1 = ncv_min(v1, l1);
            l2 = ncv_min(v2, l2); l3 = ncv_min(v3, l3);
        }
        for (; j < nfull; j += NC_VW) {
            ncv v = mask ? ncv_fma(ncv_ld(x + j), vscale, ncv_ld(mask + j))
                         : ncv_ld(x + j) * vscale;
            ncv_st(out + j, v);
            m0 = ncv_max(v, m0);
            l0 = ncv_min(v, l0);
        }
    }
    /* the general case (and the partial last vector): per-position deaths */
    for (; j < n; j += NC_VW) {
        nc_int m = n - j < NC_VW ? n - j : NC_VW;
        ncv v, mv = ncv_set1(0.0f);
        nciv dead;
        if (m == NC_VW) {
            v = ncv_ld(x + j);
            if (mask) mv = ncv_ld(mask + j);
            if (kpm) {
                dead = ncv_bytes_nonzero(kpm + j);
            } else {
                dead = ncv_seti(0);
            }
        } else {
            v = ncv_ld_n(x + j, m, 0.0f);
            if (mask) mv = ncv_ld_n(mask + j, m, 0.0f);
            /* lanes >= m are dead (the limit test below also covers them) */
            dead = iota >= ncv_seti((int32_t)m);
            if (kpm) {
                uint8_t tk[NC_VW] = {0};
                memcpy(tk, kpm + j, m);
                dead |= ncv_bytes_nonzero(tk);
            }
        }
        v = mask ? ncv_fma(v, vscale, mv) : v * vscale;
        /* positions >= limit are dead; compare offsets within this vector only, so that
           positions beyond 2^31 are never truncated to int32 */
        if (j + NC_VW > limit)
            dead |= iota >= ncv_seti((int32_t)(limit > j ? limit - j : 0));
        v = ncv_sel(dead, ninf, v);
        m0 = ncv_max(v, m0);
        if (m == NC_VW) l0 = ncv_min(v, l0);
        if (m == NC_VW) {
            ncv_st(out + j, v);
        } else {
            ncv_st_n(out + j, v, m);
        }
    }
    /* the minimum through the maximum of the negations (NaN lanes: see nco_softmax_exp) */
    *mn = -ncv_hmax(-ncv_min(ncv_min(l0, l1), ncv_min(l2, l3)));
    return ncv_hmax(ncv_max(ncv_max(m0, m1), ncv_max(m2, m3)));
}

/* pass 2, in place on the logits: out[j] = exp(out[j] - mx); returns 1 / sum, or 0 for a
   row with every position masked (mx = -inf), which it sets to zeros (a NaN logit still
   gives NaN) */
NC_INLINE float nco_softmax_exp(float *out, nc_int n, float mx, float mn)
{
    nc_int j;
    if (mx == -INFINITY) {
        for (j = 0; j < n; j++) out[j] = (out[j] != out[j]) ? out[j] : 0.0f;
        return 0.0f;
    }
    /* exponentials and their sum: four independent exponentials in flight and four
       partial sums (vector k of each group of four goes to sum k; the rest to sum 0), added
       in a fixed order, so the result depends on n only */
    const ncv vmx = ncv_set1(mx);
    ncv s0 = ncv_set1(0.0f), s1 = s0, s2 = s0, s3 = s0;
    /* every whole-vector lane has x - mx >= mn - mx >= NCO_EXP_LO (rounding is monotonic):
       no underflow clamp needed there (false for a -inf or NaN anywhere in them: then the
       clamped form; the same bits either way).  GCC unswitches the loops on it. */
    const int inrange = mn - mx >= NCO_EXP_LO;
#define NCO_SM_EXP(v) (inrange ? nco_exp_inrange(v) : nco_exp_nonpos(v))
    for (j = 0; j + 4 * NC_VW <= n; j += 4 * NC_VW) {
        /* the four exponentials in lockstep (see "Lockstep") */
        ncv e[4];
        NC_UNROLL_ALL
        for (int u = 0; u < 4; u++) e[u] = ncv_ld(out + j + u * NC_VW) - vmx;
        if (inrange) nco_exp_inrange_n(4, e);
        else nco_exp_nonpos_n(4, e);
        s0 += e[0];
        s1 += e[1];
        s2 += e[2];
        s3 += e[3];
        NC_UNROLL_ALL
        for (int u = 0; u < 4; u++) ncv_st(out + j + u * NC_VW, e[u]);
    }
    for (; j + NC_VW <= n; j += NC_VW) {
        ncv e = NCO_SM_EXP(ncv_ld(out + j) - vmx);
        s0 += e;
        ncv_st(out + j, e);
    }
#undef NCO_SM_EXP
    if (j < n) {
        nc_int m = n - j;
        ncv e = nco_exp_nonpos(ncv_ld_n(out + j, m, -INFINITY) - vmx);
        s0 += e;
        ncv_st_n(out + j, e, m);
    }
    ncv vsum = (s0 + s1) + (s2 + s3);
    return 1.0f / (float)ncv_hsum(vsum);
}

/* pass 3: out[j] *= inv (nothing for inv = 0: the row is all zeros already) */
NC_INLINE void nco_softmax_scale(float *out, nc_int n, float inv)
{
    nc_int j;
    if (inv == 0.0f) return;
    const ncv vinv = ncv_set1(inv);
    for (j = 0; j + NC_VW <= n; j += NC_VW) ncv_st(out + j, ncv_ld(out + j) * vinv);
    if (j < n) ncv_st_n(out + j, ncv_ld_n(out + j, n - j, 0.0f) * vinv, n - j);
}

static void NC_FN(nc_ops_softmax_row)(const float *x, float *out, nc_int n, float scale,
                                      const float *mask, const uint8_t *kpm, nc_int limit)
{
    float mn, mx = nco_softmax_logits(x, out, n, scale, mask, kpm, limit, &mn);
    nco_softmax_scale(out, n, nco_softmax_exp(out, n, mx, mn));
}

/* Two independent rows of the same length, with the same results as two calls of
 * nc_ops_softmax_row: the passes of the two rows alternate, so that the out-of-order core
 * overlaps one row's serial steps (the reductions to max and sum, the division) with the
 * other row's vector work; one row at a time, those steps cost ~80 cycles per row. */
static void NC_FN(nc_ops_softmax_row2)(const float *x0, const float *x1, float *out0,
                                       float *out1, nc_int n, float scale,
                                       const float *mask0, const float *mask1,
                                       const uint8_t *kpm0, const uint8_t *kpm1,
                                       nc_int limit0, nc_int limit1)
{
    float mn0, mn1;
    float mx0 = nco_softmax_logits(x0, out0, n, scale, mask0, kpm0, limit0, &mn0);
    float mx1 = nco_softmax_logits(x1, out1, n, scale, mask1, kpm1, limit1, &mn1);
    float inv0 = nco_softmax_exp(out0, n, mx0, mn0);
    float inv1 = nco_softmax_exp(out1, n, mx1, mn1);
    nco_softmax_scale(out0, n, inv0);
    nco_softmax_scale(out1, n, inv1);
}




#undef NCO_ACT_LOOP
#undef NCO_ID_N
/* the nco_* helper names are undefined by nc_simd_end.h (the GEMM epilogue uses them) */

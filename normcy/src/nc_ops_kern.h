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
 *                z = |x|/sqrt(2), erfc from the Chebyshev-fitted formula
 *                erfc(z) = t exp(-z^2 + P(t)), t = 1/(1 + z/2) (fractional error of the
 *                formula < 1.2e-7 for every z >= 0).  No cancellation for negative x:
 *                relative error <= 4e-7 * max(5, x^2/2) (measured: 1.4e-7 for x > 0,
 *                5e-7 on [-2, 0], 1.7e-6 at x = -4, 7e-6 at x = -10 where |GELU| = 8e-23);
 *                the growth is the float32 rounding of the exponent -z^2.
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
#define nco_exp_nonpos_step NC_FN(nco_exp_nonpos_step)
#define nco_expnp_state NC_FN(nco_expnp_state)
#define nco_gelu_a_step NC_FN(nco_gelu_a_step)
#define nco_gelu_b_step NC_FN(nco_gelu_b_step)
#define nco_gelu_b_final NC_FN(nco_gelu_b_final)
#define nco_gelu_e_step NC_FN(nco_gelu_e_step)
#define nco_gelu_erf_ab NC_FN(nco_gelu_erf_ab)
#define nco_exp_reduced_n NC_FN(nco_exp_reduced_n)
#define nco_exp_n NC_FN(nco_exp_n)
#define nco_exp_nonpos_n NC_FN(nco_exp_nonpos_n)
#define nco_gelu_erf_n NC_FN(nco_gelu_erf_n)
#define nco_gelu_erf_a NC_FN(nco_gelu_erf_a)
#define nco_gelu_erf_b NC_FN(nco_gelu_erf_b)
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
 * one long dependency chain (~100 cycles of latency for the exact GELU: a division, nine
 * FMAs of Horner, the exponential), and the out-of-order window holds little more than one
 * chain's worth of vector operations: written one vector after another, four independent
 * vectors still ran one at a time, latency-bound (AMD EPYC, AVX2: 46-50 cycles per vector
 * for ~37 operations).  Interleaved in the instruction stream, the chains fill the FMA
 * pipes.  Every element still goes through the same operations in the same order (the same
 * bits as one vector at a time); NU = 1 is the one-vector form.
 * The same holds one level up: the exact GELU's row pipeline runs stage A of one group and
 * stage B of another, and written one stage after the other (A's ~70 operations, then B's)
 * the waiting operations of A filled the FP scheduler before B's could enter it, so the
 * two stages ran nearly one after the other.  The stages are therefore cut into steps
 * (nco_gelu_a_step, nco_gelu_b_step, the exponential's nco_exp_reduced_step) and
 * nco_gelu_erf_ab alternates them: 14-22% less time per element (AMD EPYC, AVX2, 1 and 2
 * threads, same bits).  Four vectors per group stays best: two per group was 8-21% slower
 * (three, tried again after the two changes below: within the noise).
 * With 16 ymm registers the two stages' state still spills (the loop of four vectors had
 * ~20 spill stores and ~60 stack loads in ~270 instructions), and the spills are what
 * remains beyond the FMA pipes' bound.  Two values no longer stay live through both stages:
 * x, which the pipeline loads again for stage B's last step (NCO_GELU_PIPE), and the
 * exponential's underflow mask, folded into th by stage A (nco_gelu_a_step).  Together
 * 10-13% less time per element (AMD EPYC, AVX2, 1 and 2 threads; same values, NaN inputs
 * give NaN with another sign bit, which follows the compiler's operand order).
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
#define NCO_EXPR_STEPS 9
/* step S (a compile-time constant after unrolling) of nco_exp_reduced_n; the steps are
   split so that the exact GELU's pipeline can interleave them with another chain */
NC_INLINE void nco_exp_reduced_step(const int S, const int NU, ncv *xc, ncv *n, ncv *r,
                                    ncv *p, nciv *ni)
{
    /* n = round(x / ln 2) with the 1.5*2^23 trick (exact for |t| < 2^22) */
    const ncv magic = ncv_set1(12582912.0f);
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

/* exp(x) for x <= 1 (or -inf / NaN), as in softmax after the max subtraction and in the
 * erfc of GELU: the same results as nco_exp on that domain, minus the overflow handling.
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

NC_INLINE void nco_exp_nonpos_step(const int S, const int NU, ncv *x, nco_expnp_state *st)
{
    if (S == 0) {
        const ncv lo = ncv_set1(NCO_EXP_LO);
        NCO_EACH { st->under[u] = x[u] < lo; x[u] = ncv_sel(st->under[u], lo, x[u]); }
    } else if (S <= NCO_EXPR_STEPS) {
        nco_exp_reduced_step(S - 1, NU, x, st->n, st->r, st->p, st->ni);
    } else if (S == NCO_EXPR_STEPS + 1) {
        /* n * 2^23 (n in [-125, 1]: no overflow, no negative shift in the source; the
           compiler emits one shift) added to the exponent field */
        NCO_EACH x[u] = (ncv)((nciv)x[u] + st->ni[u] * (1 << 23));
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

/* Phi(x) * x, exact-erf GELU, in two stages (the row loop overlaps stage A of one group
   of vectors with stage B of the one before).  Stage A: th = t / 2 with t = 1 / (1 + z/2),
   and the exponent p = P(t) - z^2 of erfc(z) = t exp(p), z = |x| / sqrt(2).
   th = 1 / (2 + z) is exactly t / 2 (2 + z rounds to twice the rounding of 1 + z/2), and
   P(t) is evaluated as P'(th) with its coefficients scaled by 2^i: every Horner step is the
   one in t times a power of two, so the same bits.  The addition 2 + z and the halving
   that erfc(z) / 2 = th exp(p) needs no longer take the FMA pipes.
   Where exp(p) underflows (p < NCO_EXP_LO: |x| > ~13.15), stage A sets th to 0 and stage
   B's exponential runs on p clamped to NCO_EXP_LO: th exp(p) is then 0 * (a normal number)
   = +0, exactly nco_exp_nonpos's th * (+0), so the same bits, while the underflow mask no
   longer stays live in a register through the exponential (it spilled). */
#define NCO_GELU_A_STEPS 13
/* stage B: the exponential (clamp, nco_exp_reduced_step's steps, 2^n) and the last step */
#define NCO_GELU_E_STEPS (NCO_EXPR_STEPS + 2)
#define NCO_GELU_B_STEPS (NCO_GELU_E_STEPS + 1)
NC_INLINE void nco_gelu_a_step(const int S, const int NU, const ncv *x, ncv *z, ncv *th,
                               ncv *p)
{
    /* P'(th): the coefficients of P times 2^i, highest first */
    static const float c[10] = {0.17087277f * 512.0f, -0.82215223f * 256.0f,
                                1.48851587f * 128.0f, -1.13520398f * 64.0f,
                                0.27886807f * 32.0f, -0.18628806f * 16.0f,
                                0.09678418f * 8.0f, 0.37409196f * 4.0f,
                                1.00002368f * 2.0f, -1.26551223f};
    if (S == 0) {
        NCO_EACH z[u] = ncv_abs(x[u]) * ncv_set1(0.70710678118654752f);
    } else if (S == 1) {
        NCO_EACH th[u] = ncv_set1(1.0f) / (z[u] + ncv_set1(2.0f));
    } else if (S == 2) {
        NCO_EACH p[u] = ncv_fma(ncv_set1(c[0]), th[u], ncv_set1(c[1]));
    } else if (S < NCO_GELU_A_STEPS - 2) {
        NCO_EACH p[u] = ncv_fma(p[u], th[u], ncv_set1(c[S - 1]));
    } else if (S == NCO_GELU_A_STEPS - 2) {
        /* the exponent is <= 3e-8 (P(1) - 0), NaN only for NaN x */
        NCO_EACH p[u] = ncv_fma(-z[u], z[u], p[u]);
    } else {
        /* exp(p) underflows: th = 0 (a NaN p compares false and keeps th NaN) */
        NCO_EACH th[u] = ncv_sel(p[u] < ncv_set1(NCO_EXP_LO), ncv_set1(0.0f), th[u]);
    }
}

/* Stage B's last step, in place on x: Phi from th and p = exp(the exponent), times x */
NC_INLINE void nco_gelu_b_final(const int NU, ncv *x, const ncv *th, const ncv *p)
{
    NCO_EACH {
        /* erfc/2 = th exp(p) */
        ncv half_erfc = th[u] * p[u];
        /* Phi = erfc/2 for x < 0, 1 - erfc/2 otherwise, selected by the sign bit (x = -0
           gives 1 - 0.5 = 0.5 = erfc(0)/2 either way) */
        ncv phi = ncv_sel_sign(x[u], half_erfc, ncv_set1(1.0f) - half_erfc);
        /* x = -inf: Phi = 0 and -inf * 0 would be NaN; the limit is -0, which -FLT_MAX * 0
           gives (MAXPS(-FLT_MAX, x) keeps every other x, NaN included) */
        x[u] = ncv_max(ncv_set1(-3.40282347e+38f), x[u]) * phi;
    }
}

/* Stage B's exponential, in place on p: nco_exp_nonpos without its underflow mask (stage
   A's th = 0 stands for it), the clamp as MAXPS(lo, p), which keeps a NaN p */
NC_INLINE void nco_gelu_e_step(const int S, const int NU, ncv *p, nco_expnp_state *st)
{
    if (S == 0) NCO_EACH p[u] = ncv_max(ncv_set1(NCO_EXP_LO), p[u]);
    else nco_exp_nonpos_step(S, NU, p, st);   /* its reduction and 2^n steps (S < its last) */
}

/* Stage B, in place on x: Phi from th and p, times x (p is overwritten) */
NC_INLINE void nco_gelu_b_step(const int S, const int NU, ncv *x, const ncv *th, ncv *p,
                               nco_expnp_state *st)
{
    if (S < NCO_GELU_E_STEPS) nco_gelu_e_step(S, NU, p, st);
    else nco_gelu_b_final(NU, x, th, p);
}

NC_INLINE void nco_gelu_erf_a(const int NU, const ncv *x, ncv *th, ncv *p)
{
    ncv z[NCO_NU];
    NC_UNROLL_ALL
    for (int S = 0; S < NCO_GELU_A_STEPS; S++) nco_gelu_a_step(S, NU, x, z, th, p);
}

NC_INLINE void nco_gelu_erf_b(const int NU, ncv *x, const ncv *th, ncv *p)
{
    nco_expnp_state st;
    NC_UNROLL_ALL
    for (int S = 0; S < NCO_GELU_B_STEPS; S++) nco_gelu_b_step(S, NU, x, th, p, &st);
}

/* stage A of one group and stage B but its last step (the exponential: pb becomes
   exp(pb)) of another, their steps interleaved in the instruction stream (A0 B0 A1 B1 ...):
   written one stage after the other, the first stage's waiting operations filled the
   scheduler and the second's could not start until they drained.  The last step
   (nco_gelu_b_final) is the caller's: it needs x, which the row pipeline loads again then
   rather than keeping it in a register through both stages (see NCO_GELU_PIPE). */
NC_INLINE void nco_gelu_erf_ab(const int NU, const ncv *xa, ncv *tha, ncv *pa,
                               const ncv *thb, ncv *pb)
{
    ncv z[NCO_NU];
    nco_expnp_state st;
    NC_UNROLL_ALL
    for (int S = 0; S < NCO_GELU_A_STEPS || S < NCO_GELU_E_STEPS; S++) {
        if (S < NCO_GELU_A_STEPS) nco_gelu_a_step(S, NU, xa, z, tha, pa);
        if (S < NCO_GELU_E_STEPS) nco_gelu_e_step(S, NU, pb, &st);
    }
}

NC_INLINE void nco_gelu_erf_n(const int NU, ncv *x)
{
    ncv th[NCO_NU], p[NCO_NU];
    nco_gelu_erf_a(NU, x, th, p);
    nco_gelu_erf_b(NU, x, th, p);
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
 * runs stage A of group g+1 and stage B of group g, two independent halves of ~60 cycles
 * of latency each.  LD(g, u) gives vector u of group g (bias added), ST(g, u, v) stores it
 * (residual added); the row loop below and the GEMM's strip epilogue differ only in them.
 * LD(g, u) is called twice per vector: for stage A and again for stage B's last step (the
 * sign of x and the product x Phi), so that x is not held in a register (nor spilled)
 * through both stages; the two loads give the same value (ST(g, u) comes after both, and
 * the boundary allows an output only identical to, or disjoint from, its inputs).
 * The same operations on every element as nco_gelu_erf (the same bits).
 */
#define NCO_GELU_PIPE(NG, LD, ST)                                                      \
    do {                                                                               \
        const int NU = NCO_NU;                                                         \
        ncv tha[NCO_NU], pa[NCO_NU];                                                   \
        {                                                                              \
            ncv x0[NCO_NU];                                                            \
            NCO_EACH x0[u] = LD(0, u);                                                 \
            nco_gelu_erf_a(NU, x0, tha, pa);                                           \
        }                                                                              \
        nc_int g_ = 0;                                                                 \
        for (; g_ + 1 < (NG); g_++) {                                                  \
            ncv xn[NCO_NU], thb[NCO_NU], pb[NCO_NU], xo[NCO_NU];                       \
            NCO_EACH xn[u] = LD(g_ + 1, u);                                            \
            nco_gelu_erf_ab(NU, xn, thb, pb, tha, pa);                                 \
            NCO_EACH xo[u] = LD(g_, u);                                                \
            nco_gelu_b_final(NU, xo, tha, pa);                                         \
            NCO_EACH {                                                                 \
                ST(g_, u, xo[u]);                                                      \
                tha[u] = thb[u]; pa[u] = pb[u];                                        \
            }                                                                          \
        }                                                                              \
        {                                                                              \
            ncv xo[NCO_NU];                                                            \
            NCO_EACH xo[u] = LD(g_, u);                                                \
            nco_gelu_erf_b(NU, xo, tha, pa);                                           \
            NCO_EACH ST(g_, u, xo[u]);                                                 \
        }                                                                              \
    } while (0)

/* the exact GELU's whole groups of a row (at least two, else none); returns the elements
   done, the rest is NCO_ACT_LOOP's */
NC_INLINE nc_int nco_gelu_rows_piped(const float *x, const float *bias, const float *res,
                                     float *out, nc_int n)
{
    const nc_int G = NCO_NU * NC_VW, ng = n / G;
    if (ng < 2) return 0;
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

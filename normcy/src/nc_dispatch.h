/*
 * Run-time SIMD dispatch shared by normcy's kernel headers.
 *
 * Portable builds compile each NC_TC kernel for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA)
 * and baseline SSE2 with GCC's target_clones; the dynamic loader picks the widest variant
 * the CPU supports once, at load time (an ifunc).  NC_NATIVE_BUILD (NORMCY_NATIVE=1)
 * compiles one variant for the build host.
 */
#ifndef NC_DISPATCH_H
#define NC_DISPATCH_H

#if !defined(NC_NATIVE_BUILD) && defined(__x86_64__) && defined(__GNUC__) && \
    !defined(__clang__) && defined(__GLIBC__) && (__GNUC__ >= 12)
#define NC_TC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NC_HAVE_CLONES 1
#else
#define NC_TC
#define NC_HAVE_CLONES 0
#endif

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

#endif /* NC_DISPATCH_H */

/* The kernel bodies of the families this module compiles (see NC_FAMILIES in nc_api.h);
   included once per SIMD variant. */
#if NC_FAMILIES & NC_F_NORM
#include "nc_norm_kern.h"
#endif
#if NC_FAMILIES & NC_F_OPS
#include "nc_ops_kern.h"
#endif
#if NC_FAMILIES & NC_F_GEMM
#include "nc_gemm_kern.h"
#endif

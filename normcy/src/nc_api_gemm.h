/* nc_api.h with the kernel families of normcy._gemm */
#define NC_FAMILIES (NC_F_OPS | NC_F_GEMM)
#include "nc_api.h"

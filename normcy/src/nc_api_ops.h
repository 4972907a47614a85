/* nc_api.h with the kernel families of normcy._ops */
#define NC_FAMILIES (NC_F_OPS)
#include "nc_api.h"

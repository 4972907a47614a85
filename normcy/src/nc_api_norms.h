/* nc_api.h with the kernel families of normcy._norms */
#define NC_FAMILIES (NC_F_NORM)
#include "nc_api.h"

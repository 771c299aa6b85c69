// error_string: text of a cudaError_t code returned by the launchers.
#include <cuda_runtime.h>

#include "kernels.h"

namespace kestrel::api {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace kestrel::api

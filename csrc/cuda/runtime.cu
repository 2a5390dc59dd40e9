// Host-side helpers of the CUDA backend: the device probe, error reporting and device selection.
#include <string>

#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace imm::cuda {

bool device_available() {
  int count = 0;
  // Without a driver (or with one too old for this runtime) this returns an error rather than crashing.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for the next check
    return false;
  }
  return count > 0;
}

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("imm_kernels._cuda: ") + what + ": " + cudaGetErrorString(status));
}

DeviceOf::DeviceOf(const void* pointer) {
  cudaPointerAttributes attributes{};
  check_cuda(cudaPointerGetAttributes(&attributes, pointer), "cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
    throw std::invalid_argument("imm_kernels._cuda: the inputs must be CUDA device memory");
  check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (attributes.device != previous_) {
    check_cuda(cudaSetDevice(attributes.device), "cudaSetDevice");
    current_ = attributes.device;
  }
}

DeviceOf::~DeviceOf() {
  if (current_ >= 0) cudaSetDevice(previous_);
}

}  // namespace imm::cuda

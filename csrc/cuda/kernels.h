// Entry points of the CUDA backend. Plain C++ (no CUDA headers), so the shared bindings.cpp compiles with the
// host compiler. `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); the work
// runs on the device that owns the problem's pointers. Nothing here waits for the GPU.
#pragma once
#include <cstdint>

#include "common/problems.h"
#include "cuda/verified.h"

namespace imm::cuda {

// Whether the CUDA runtime finds a driver and at least one device (never throws).
bool device_available();

}  // namespace imm::cuda

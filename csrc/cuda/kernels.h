// Entry points of the CUDA backend. Plain C++ (no CUDA headers), so the shared bindings.cpp compiles with the
// host compiler. `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); the work
// runs on the device that owns the problem's pointers. Nothing here waits for the GPU.
#pragma once
#include <cstdint>

#include "common/problems.h"

namespace imm::cuda {

// Whether the CUDA runtime finds a driver and at least one device (never throws).
bool device_available();

// Bytes of device scratch that mmd_fused needs in problem.workspace (per-group pair sums and coefficients).
int64_t mmd_workspace_bytes(int64_t groups, int64_t group_size, int64_t features, DType dtype);

// Loss per group and, where the grad pointers are set, the gradient of sum_g loss_g (as imm::cpu::mmd_fused).
void mmd_fused(const MmdProblem& problem, uintptr_t stream);

// dst_o = coef_o0 * src0 + coef_o1 * src1 per row (as imm::cpu::combine), in one launch.
void combine(const CombineProblem& problem, const void* const src[2], void* const dst[2], bool transpose,
             uintptr_t stream);

}  // namespace imm::cuda

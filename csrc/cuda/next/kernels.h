// Entry points of the CUDA kernels of the current contract (common/problems.h), as imm::cpu has them: opt-in
// (IMM_CUDA_KERNELS=next) until a GPU run passes the test suite with them. Plain C++, like ../kernels.h.
#pragma once
#include <cstdint>

#include "common/problems.h"

namespace imm::cuda::next {

// Bytes of device scratch mmd_forward needs in problem.workspace (pass-1 sums and the groups' losses).
int64_t mmd_workspace_bytes(int64_t groups, int64_t group_size, int64_t features, DType dtype);

// The loss of problem.reduction and, where problem.coefficients is set, the per-pair coefficients; a reduced loss
// needs problem.counter, a zero the kernels leave at zero.
void mmd_forward(const MmdForwardProblem& problem, uintptr_t stream);

// The gradients of the loss scaled by the output's gradient, from the forward's coefficients.
void mmd_backward(const MmdBackwardProblem& problem, uintptr_t stream);

// dst_o = coef_o0 * src0 + coef_o1 * src1 per row, the coefficients from the row's times (transposed in the
// backward); the times are not checked (they live in device memory).
void combine(const ::imm::CombineProblem& problem, uintptr_t stream);  // not cuda::CombineProblem (verified.h)

}  // namespace imm::cuda::next

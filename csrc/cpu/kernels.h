// Entry points of the C++ CPU backend (OpenMP over groups or rows, and over features when groups are few).
#pragma once
#include "common/problems.h"

namespace imm::cpu {

// Bytes of caller-provided scratch that mmd_fused needs: none, its threads keep their sums in their own buffers.
inline int64_t mmd_workspace_bytes(int64_t, int64_t, int64_t, DType) { return 0; }

// Loss per group and, where the grad pointers are set, the gradient of sum_g loss_g.
void mmd_fused(const MmdProblem& problem, int num_threads);

// dst_o = coef_o0 * src0 + coef_o1 * src1 per row, the coefficients from the row's times. forward: src = the two
// inputs, dst = the outputs. backward (transpose = true): src = the output grads, dst = the input grads.
// src[1] / dst[1] may be null (one output; an input needing no grad).
void combine(const CombineProblem& problem, const void* const src[2], void* const dst[2], bool transpose,
             int num_threads);

}  // namespace imm::cpu

// Entry points of the C++ CPU backend (OpenMP over groups, pair blocks or rows, and over features when there
// are too few of those for the threads). Nothing here allocates inside a parallel region: an allocation that
// fails is a std::bad_alloc before any thread starts (a Python MemoryError), never an abort.
#pragma once
#include "common/problems.h"

namespace imm::cpu {

// The loss of problem.reduction and, where problem.coefficients is set, the per-pair coefficients of the backward.
void mmd_forward(const MmdForwardProblem& problem, int num_threads);

// The gradients of the loss scaled by the output's gradient, from the forward's coefficients.
void mmd_backward(const MmdBackwardProblem& problem, int num_threads);

// dst_o = coef_o0 * src0 + coef_o1 * src1 per row, the coefficients from the row's times (transposed in the
// backward). Refuses bad times first when problem.check_values is set.
void combine(const CombineProblem& problem, int num_threads);

}  // namespace imm::cpu

// The contract of the CUDA kernels that passed the test suite on a GPU (an H200, 2026-11-26): mmd.cu and
// combine.cu compile against exactly these definitions, so their machine code is what ran there
// (tests/test_cuda_build.py compares its fingerprint). They are the default of the cuda backend until the kernels of the
// newer contract (common/problems.h, cuda/next/) have passed the tests on a GPU; then this header goes.
//
// Differences from the newer contract: the forward pass also writes the gradient of sum_g loss_g (the Python
// layer scales it by the output's gradient), bandwidth, weight and times are tensors in the accumulation type,
// inputs of combine are packed, and the gradient is sum_j P_ij (Y_j - X_j) + Q_ij (X_i - Y_j).
#pragma once
#include <cstdint>

#include "common/mmd_math.h"
#include "common/problems.h"

namespace imm::cuda {

struct MmdProblem {
  const void* y_t;
  const void* y_r;
  int64_t stride_t, stride_r;  // row strides in elements; features are contiguous
  int64_t groups, group_size, features;
  DType dtype;
  Kernel kernel;
  Estimator estimator;
  double eps;
  const void* bandwidth;  // (G,) in the accumulation type (double for f64 inputs, else float)
  const void* weight;     // (G,) likewise, already scaled by the reduction
  void* loss;             // (G,) accumulation type: weight * MMD per group
  void* grad_t;           // (B, D) contiguous in the input dtype, or null when not wanted
  void* grad_r;
  void* workspace;        // scratch of mmd_workspace_bytes() bytes from the caller (null where that is 0)
};

struct CombineProblem {
  int64_t rows, features;
  DType dtype;
  CombineKind kind;
  Schedule schedule;
  Param param;
  double sigma_data;
  const void* time0;  // (B,) accumulation type, element b at time0[b * time0_stride]
  const void* time1;
  int64_t time0_stride, time1_stride;
  int outputs;  // 1 or 2
};

inline void check(const MmdProblem& p) {
  require(p.groups > 0 && p.group_size > 0 && p.features > 0, "mmd: groups, group_size and features must be positive");
  require(p.estimator != Estimator::u || p.group_size >= 2, "mmd: the u estimator needs group_size >= 2");
  require(p.stride_t >= p.features && p.stride_r >= p.features, "mmd: row strides must be at least the feature count");
  require(p.y_t && p.y_r && p.bandwidth && p.weight && p.loss, "mmd: null input or output pointer");
}

inline void check(const CombineProblem& p) {
  require(p.rows > 0 && p.features > 0, "combine: rows and features must be positive");
  require(p.outputs == 1 || p.outputs == 2, "combine: outputs must be 1 or 2");
  require(p.kind == CombineKind::interpolate || p.outputs == 1, "combine: imm_output has one output");
  require(p.time0 && p.time1, "combine: null time pointer");
}

// psi(d) = phi'(d)/d, zero where the kernel is flat or the direction undefined (d at or below the floor).
// Written so that NaN distances stay NaN.
template <class T>
IMM_HD T laplace_psi(T d, T c, T eps) {
  return d <= eps ? T(0) : -c * exp_(-c * d) / d;
}

// The pair math as it ran on the GPU, kept verbatim (common/mmd_math.h has moved on: psi(b), the loss-only path).
template <class T>
struct VerifiedPairTerms {
  T phi_a, dphi, psi_a, dpsi;  // phi(a), phi(a) - phi(b), psi(a), psi(a) - psi(b)
};

template <class T>
IMM_HD VerifiedPairTerms<T> verified_pair_terms(Kernel kernel, T a2, T b2, T delta, T c, T eps) {
  VerifiedPairTerms<T> r;
  if (kernel == Kernel::rbf) {  // phi = exp(-c d^2)
    r.phi_a = exp_(-c * a2);
    r.dphi = exp_difference(c * a2, c * b2, c * delta);
    r.psi_a = T(-2) * c * r.phi_a;
    r.dpsi = T(-2) * c * r.dphi;
    return r;
  }
  const T a = sqrt_(a2), b = sqrt_(b2);
  const T sum = a + b;
  const T b_minus_a = sum > T(0) ? delta / sum : T(0);
  if (kernel == Kernel::laplace) {  // phi = exp(-c max(d, eps))
    const T ac = a < eps ? eps : a, bc = b < eps ? eps : b;
    const bool both_live = !(a <= eps) && !(b <= eps);
    const T gap = both_live ? b_minus_a : bc - ac;
    const T cgap = c * gap;
    r.phi_a = exp_(-c * ac);
    r.dphi = exp_difference(c * ac, c * bc, cgap);
    r.psi_a = laplace_psi(a, c, eps);
    // Close distances: psi(a) - psi(b) = psi(a) (1 - e^{-c gap} a / b), expanded so nothing cancels.
    const bool close = both_live && cgap < T(0.5) && cgap > T(-0.5);
    r.dpsi = close ? r.psi_a * (-expm1_(-cgap) + (gap / b) * exp_(-cgap)) : r.psi_a - laplace_psi(b, c, eps);
    return r;
  }
  // energy: phi = -d
  const bool both_live = !(a <= T(0)) && !(b <= T(0));
  r.phi_a = -a;
  r.dphi = b_minus_a;
  r.psi_a = a <= T(0) ? T(0) : T(-1) / a;
  const T psi_b = b <= T(0) ? T(0) : T(-1) / b;
  r.dpsi = both_live ? -b_minus_a / (a * b) : r.psi_a - psi_b;
  return r;
}

template <class T>
struct PairCoefficients {
  T loss, p, q;
};

// Loss contribution and gradient coefficients (P, Q) of one ordered pair (i, j) of one side.
template <class T>
IMM_HD PairCoefficients<T> pair_coefficients(Kernel kernel, T self_w, T cross_w, T grad_w, T a2, T b2, T delta,
                                             T c, T eps) {
  const VerifiedPairTerms<T> t = verified_pair_terms(kernel, a2, b2, delta, c, eps);
  PairCoefficients<T> r;
  r.loss = cross_w * t.dphi + (self_w - cross_w) * t.phi_a;
  r.p = grad_w * self_w * t.psi_a;
  r.q = grad_w * (cross_w * t.dpsi + (self_w - cross_w) * t.psi_a);
  return r;
}

// Bytes of device scratch that mmd_fused needs in problem.workspace (per-group pair sums and coefficients).
int64_t mmd_workspace_bytes(int64_t groups, int64_t group_size, int64_t features, DType dtype);

// Loss per group and, where the grad pointers are set, the gradient of sum_g loss_g.
void mmd_fused(const MmdProblem& problem, uintptr_t stream);

// dst_o = coef_o0 * src0 + coef_o1 * src1 per row, in one launch.
void combine(const CombineProblem& problem, const void* const src[2], void* const dst[2], bool transpose,
             uintptr_t stream);

}  // namespace imm::cuda

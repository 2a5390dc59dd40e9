// What one native call receives: raw pointers, sizes, strides and codes. Filled by the bindings, read by the
// CPU implementation and the CUDA kernels of the same contract (csrc/cuda/next/; the GPU-verified CUDA kernels
// have their own, csrc/cuda/verified.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "platform.h"

namespace imm {

// A per-group or per-row scalar operand (bandwidth, weight, a time): a float32 or float64 tensor read at
// index * stride (stride 0: one value for all), or, without a tensor, a plain value.
struct ScalarArg {
  const void* data;  // null: `value` everywhere
  int64_t stride;    // in elements
  bool is_double;    // the tensor's dtype: float64, else float32
  double value;

  IMM_HD double at(int64_t index) const {
    if (!data) return value;
    return is_double ? static_cast<const double*>(data)[index * stride]
                     : double(static_cast<const float*>(data)[index * stride]);
  }
};

// A (rows, features) view of one input: element (b, f) at data[b * row_stride + f * feature_stride].
struct Operand {
  const void* data;
  int64_t row_stride, feature_stride;
};

// The IMM loss head (imm_kernels.imm_mmd_loss): each side's rows are the outputs skip * y + out * f, formed
// where they are read and never stored, with one (skip, out) pair per group and side; the problem's y_t and y_r
// are then x_t and x_r, and the backward's gradients are those of f_t and f_r (the out factor inside).
struct OutputMix {
  const void* f_t;  // null: no mix, the rows are y_t and y_r themselves
  const void* f_r;
  int64_t stride_ft, stride_fr;  // row strides in elements; features are contiguous
  const double* coefficients;    // [G][4]: skip_t, out_t, skip_r, out_r
};

// Forward of the grouped MMD: the reduced loss (or one loss per group) and, where asked, the per-pair
// coefficients that the backward pass turns into gradients (csrc/common/mmd_math.h).
struct MmdForwardProblem {
  const void* y_t;
  const void* y_r;
  int64_t stride_t, stride_r;  // row strides in elements (any, also 0 or overlapping); features are contiguous
  int64_t groups, group_size, features;
  DType dtype;
  Kernel kernel;
  Estimator estimator;
  Reduction reduction;
  double eps;
  ScalarArg bandwidth;  // per group
  ScalarArg weight;     // per group
  void* out;            // input dtype: one element (mean, sum) or one per group (none)
  void* coefficients;   // accumulation type, [G][6][M][M] (common/mmd_math.h), or null when no gradient is wanted
  bool check_values;    // the operands live in host memory: refuse a bandwidth that is not > 0
  void* workspace;      // GPU kernels: scratch of their mmd_workspace_bytes() (null on CPUs)
  void* counter;        // GPU kernels, reduced loss: a uint32 zero they leave at zero (null on CPUs)
  OutputMix mix;        // CPU only
};

// Backward: grad_X_i = go_g sum_j Q_ij (X_i - X_j) + R_ij (X_j - Y_j) for each side X that needs it.
struct MmdBackwardProblem {
  const void* y_t;
  const void* y_r;
  int64_t stride_t, stride_r;
  int64_t groups, group_size, features;
  DType dtype;
  const void* grad_output;  // input dtype: the output's gradient, element g at grad_output[g * grad_output_stride]
  int64_t grad_output_stride;  // 0 for a reduced loss
  const void* coefficients;    // from the forward pass
  void* grad_t;                // (B, D) contiguous in the input dtype, or null when not wanted
  void* grad_r;
  OutputMix mix;  // CPU only
};

// Per-sample linear combination of two (B, F) operands with coefficients from per-sample times:
// forward dst_o = sum_i mix[o][i] src_i, transposed dst_i = sum_o mix[o][i] src_o (the backward).
struct CombineProblem {
  int64_t rows, features;
  DType dtype;
  CombineKind kind;
  Schedule schedule;
  Param param;
  double sigma_data;
  ScalarArg time0, time1;  // interpolate: (t, r); imm_output: (s, t)
  int outputs;             // 1 or 2 forward outputs
  bool transpose;
  bool check_values;       // the times live in host memory: refuse times outside [0, 1] and s > t
  Operand src[2];          // src[1].data may be null (one source)
  void* dst[2];            // contiguous (B, F) in the input dtype; either may be null (not wanted)
};

// A fixed message costs nothing when the check passes; build a composed one only where it fails (fail()).
inline void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}

[[noreturn]] inline void fail(const std::string& message) { throw std::invalid_argument(message); }

// Checks what raw pointers cannot show; the Python layer has already validated shapes and dtypes.
inline void check_sizes(int64_t groups, int64_t group_size, int64_t features, int64_t stride_t, int64_t stride_r) {
  require(groups > 0 && group_size > 0 && features > 0, "mmd: groups, group_size and features must be positive");
  require(stride_t >= 0 && stride_r >= 0, "mmd: row strides must be >= 0");
}

inline void check(const OutputMix& mix) {
  require(!mix.f_t == !mix.f_r && (!mix.f_t || mix.coefficients), "mmd: a mix needs f_t, f_r and its coefficients");
  require(mix.stride_ft >= 0 && mix.stride_fr >= 0, "mmd: row strides must be >= 0");
}

inline void check(const MmdForwardProblem& p) {
  check_sizes(p.groups, p.group_size, p.features, p.stride_t, p.stride_r);
  check(p.mix);
  require(p.estimator == Estimator::v || p.group_size >= 2, "mmd: the u and unpaired estimators need group_size >= 2");
  require(p.y_t && p.y_r && p.out, "mmd: null input or output pointer");
  if (!(p.eps >= 0 && std::isfinite(p.eps))) fail("eps must be >= 0 and finite; got " + std::to_string(p.eps));
}

inline void check(const MmdBackwardProblem& p) {
  check_sizes(p.groups, p.group_size, p.features, p.stride_t, p.stride_r);
  check(p.mix);
  require(p.y_t && p.y_r && p.grad_output && p.coefficients, "mmd backward: null input pointer");
  require(p.grad_output_stride >= 0, "mmd backward: grad_output stride must be >= 0");
}

inline void check(const CombineProblem& p) {
  require(p.rows > 0 && p.features > 0, "combine: rows and features must be positive");
  require(p.outputs == 1 || p.outputs == 2, "combine: outputs must be 1 or 2");
  require(p.kind == CombineKind::interpolate || p.outputs == 1, "combine: imm_output has one output");
  require(p.src[0].data != nullptr, "combine: null first source");
}

}  // namespace imm

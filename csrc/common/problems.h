// What one native call receives: raw pointers, sizes and codes. Filled by the bindings, read by the
// CPU and CUDA implementations alike.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "platform.h"

namespace imm {

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

// Per-sample linear combination of two (B, F) inputs with coefficients from per-sample times.
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

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Checks what raw pointers cannot show; the Python layer has already validated shapes and dtypes.
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

}  // namespace imm

// Shared by the CPU (g++) and CUDA (nvcc) builds: the enums that cross the Python boundary and the
// host/device qualifiers, so the per-element math below is written once.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define IMM_HD __host__ __device__ __forceinline__
#else
#define IMM_HD inline
#endif

namespace imm {

// The integer codes are part of the Python <-> native contract (imm_kernels/_native.py).
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };
enum class Kernel : int { laplace = 0, rbf = 1, energy = 2 };
enum class Estimator : int { v = 0, u = 1, unpaired = 2 };
enum class Reduction : int { mean = 0, sum = 1, none = 2 };
enum class Schedule : int { fm = 0, cosine = 1 };
enum class Param : int { simple_edm = 0, euler_fm = 1, identity = 2 };
enum class CombineKind : int { interpolate = 0, imm_output = 1 };

// C math names resolve to the right overload on the host and in device code alike.
IMM_HD float exp_(float x) { return expf(x); }
IMM_HD double exp_(double x) { return exp(x); }
IMM_HD float expm1_(float x) { return expm1f(x); }
IMM_HD double expm1_(double x) { return expm1(x); }
IMM_HD float sqrt_(float x) { return sqrtf(x); }
IMM_HD double sqrt_(double x) { return sqrt(x); }
IMM_HD float sin_(float x) { return sinf(x); }
IMM_HD double sin_(double x) { return sin(x); }
IMM_HD float cos_(float x) { return cosf(x); }
IMM_HD double cos_(double x) { return cos(x); }

}  // namespace imm

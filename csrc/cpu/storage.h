// CPU storage types, conversions to and from the accumulation type, the dtype dispatch and the
// instruction-set clones of the hot loops (portable binary, AVX2/AVX-512 picked at load time).
#pragma once
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "common/platform.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IMM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMM_CPU_CLONES
#endif
// For helpers of the cloned loops: a helper gcc leaves out of line is built for the default target only (SSE2),
// where bfloat16 conversions are not vectorized.
#if defined(__GNUC__)
#define IMM_CPU_INLINE inline __attribute__((always_inline))
#else
#define IMM_CPU_INLINE inline
#endif

namespace imm::cpu {

struct BFloat16 {
  uint16_t bits;
};

#if defined(__FLT16_MANT_DIG__)
using Half = _Float16;
#else
#error "imm_kernels' CPU backend needs a compiler with _Float16 (gcc >= 12 or clang >= 15)"
#endif

IMM_CPU_INLINE float bf16_to_float(BFloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

IMM_CPU_INLINE BFloat16 float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}

template <class Acc, class In>
IMM_CPU_INLINE Acc load(In v) {
  if constexpr (std::is_same_v<In, BFloat16>) {
    return Acc(bf16_to_float(v));
  } else {
    return Acc(v);
  }
}

template <class In, class Acc>
IMM_CPU_INLINE In store(Acc v) {
  if constexpr (std::is_same_v<In, BFloat16>) {
    return float_to_bf16(float(v));
  } else {
    return In(v);
  }
}

// Calls fn(In{}, Acc{}) with the storage type of `dtype` and its accumulation type.
template <class Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{}, float{});
    case DType::f64: return fn(double{}, double{});
    case DType::f16: return fn(Half{}, float{});
    case DType::bf16: return fn(BFloat16{}, float{});
  }
  throw std::invalid_argument("unknown dtype code");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs body(thread) on `threads` OpenMP threads, or directly on this thread when there is one (no team: a tiny
// call pays nothing for it). Work inside is shared with `#pragma omp for`, which runs whole outside a team.
// body must not throw: an exception cannot leave an OpenMP region.
template <class Body>
void parallel(int threads, Body&& body) {
  if (threads <= 1) return body(0);
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num());
}

}  // namespace imm::cpu

// What the CUDA kernels share: storage types and their conversions to the accumulation type, 16-byte packs of
// consecutive features (vector loads where aligned, masked scalar loads elsewhere), the dtype dispatch, and the
// host-side error checks and device selection.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/platform.h"

namespace imm::cuda {

constexpr int kWarpSize = 32;

template <class Acc, class In>
__device__ __forceinline__ Acc to_acc(In v) {
  if constexpr (std::is_same_v<In, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return Acc(v);
  }
}

template <class In, class Acc>
__device__ __forceinline__ In from_acc(Acc v) {
  if constexpr (std::is_same_v<In, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);  // NaN stays NaN
  } else {
    return In(v);
  }
}

// kSize consecutive features of one row in 16 bytes; pack p holds features [p * kSize, (p + 1) * kSize).
template <class In>
struct Pack {
  static constexpr int kSize = 16 / int(sizeof(In));
  uint4 bits;

  template <class Acc>
  __device__ __forceinline__ Acc get(int k) const {
    return to_acc<Acc>(reinterpret_cast<const In*>(&bits)[k]);
  }
  template <class Acc>
  __device__ __forceinline__ void set(int k, Acc v) {
    reinterpret_cast<In*>(&bits)[k] = from_acc<In>(v);
  }
};

template <class In>
__host__ __device__ __forceinline__ int64_t pack_count(int64_t features) {
  return (features + Pack<In>::kSize - 1) / Pack<In>::kSize;
}

// Pack `pack` of a row of `features` elements, zero past the end. `vector` says the row start is 16-byte
// aligned; the inputs are read-only for the whole launch, hence the non-coherent cache path (__ldg).
template <class In>
__device__ __forceinline__ Pack<In> load_pack(const In* row, int64_t pack, int64_t features, bool vector) {
  constexpr int n = Pack<In>::kSize;
  const int64_t f0 = pack * n;
  Pack<In> out;
  if (vector && f0 + n <= features) {
    out.bits = __ldg(reinterpret_cast<const uint4*>(row + f0));
    return out;
  }
  out.bits = make_uint4(0, 0, 0, 0);  // zero bits are 0.0 in every storage type
  In* values = reinterpret_cast<In*>(&out.bits);
#pragma unroll
  for (int k = 0; k < n; ++k)
    if (f0 + k < features) values[k] = row[f0 + k];
  return out;
}

template <class In>
__device__ __forceinline__ void store_pack(In* row, int64_t pack, int64_t features, bool vector, const Pack<In>& v) {
  constexpr int n = Pack<In>::kSize;
  const int64_t f0 = pack * n;
  if (vector && f0 + n <= features) {
    *reinterpret_cast<uint4*>(row + f0) = v.bits;
    return;
  }
  const In* values = reinterpret_cast<const In*>(&v.bits);
#pragma unroll
  for (int k = 0; k < n; ++k)
    if (f0 + k < features) row[f0 + k] = values[k];
}

// Whether rows at base + r * row_stride (elements) all start on a 16-byte boundary, so packs load as vectors.
template <class In>
bool rows_aligned(const void* base, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride * int64_t(sizeof(In))) % 16 == 0;
}

// Calls fn(In{}, Acc{}) with the storage type of `dtype` and its accumulation type.
template <class Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{}, float{});
    case DType::f64: return fn(double{}, double{});
    case DType::f16: return fn(__half{}, float{});
    case DType::bf16: return fn(__nv_bfloat16{}, float{});
  }
  throw std::invalid_argument("unknown dtype code");
}

// Raises (as Python's RuntimeError) when a CUDA call or the last launch failed.
void check_cuda(cudaError_t status, const char* what);
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Makes the device that owns `pointer` current for the guard's lifetime (torch tensors may live on a device
// other than the current one), and restores the previous device after.
class DeviceOf {
 public:
  explicit DeviceOf(const void* pointer);
  ~DeviceOf();
  DeviceOf(const DeviceOf&) = delete;
  DeviceOf& operator=(const DeviceOf&) = delete;

 private:
  int previous_ = -1, current_ = -1;
};

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace imm::cuda

// Per-sample linear combinations on NVIDIA GPUs, the current contract (common/problems.h CombineProblem), opt-in
// (IMM_CUDA_KERNELS=next) until a GPU run passes the test suite with it: interpolate / interpolate_pair / ddim /
// imm_output, forward and transposed, with times as float32/float64 tensors (any stride) or plain values, and
// strided sources (a sum's expanded gradient reads one element). One launch: a block per (pack block, row),
// rows looped past CUDA's grid limit; each thread computes its row's coefficients once (common/schedule_math.h)
// and moves kPacksPerThread 16-byte packs, all loads issued before the first store.
#include <algorithm>

#include "common/schedule_math.h"
#include "cuda/device.cuh"
#include "cuda/next/kernels.h"

namespace imm::cuda::next {
namespace {

constexpr int kThreads = 256;
constexpr int kPacksPerThread = 2;   // bytes in flight: 32 a thread, 8 KiB a block
constexpr int64_t kMaxGridY = 65535;

template <class In>
__device__ __forceinline__ Pack<In> load_source(const Operand& s, int64_t row, int64_t pack, int64_t features,
                                                bool vector) {
  const In* base = static_cast<const In*>(s.data) + row * s.row_stride;
  if (s.feature_stride == 1) return load_pack(base, pack, features, vector);
  Pack<In> out;  // strided features (an expanded gradient: stride 0), one element at a time
  out.bits = make_uint4(0, 0, 0, 0);
  In* values = reinterpret_cast<In*>(&out.bits);
#pragma unroll
  for (int k = 0; k < Pack<In>::kSize; ++k) {
    const int64_t f = pack * Pack<In>::kSize + k;
    if (f < features) values[k] = base[f * s.feature_stride];
  }
  return out;
}

template <class In, class Acc>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineProblem p, bool vector) {
  const int64_t packs = pack_count<In>(p.features);
  const int64_t first = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kPacksPerThread;
  if (first >= packs) return;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    Acc coef[2][2];  // coef[dst][src]
    combine_matrix(p.kind, p.schedule, p.param, Acc(p.sigma_data), Acc(p.time0.at(row)), Acc(p.time1.at(row)),
                   p.outputs, p.transpose, coef);
    const bool two = p.src[1].data != nullptr;
    Pack<In> a[kPacksPerThread], b[kPacksPerThread];
#pragma unroll
    for (int k = 0; k < kPacksPerThread; ++k) {
      a[k] = load_source<In>(p.src[0], row, first + k, p.features, vector);
      b[k] = two ? load_source<In>(p.src[1], row, first + k, p.features, vector) : a[k];
    }
#pragma unroll
    for (int k = 0; k < kPacksPerThread; ++k) {
      if (first + k >= packs) break;
#pragma unroll
      for (int o = 0; o < 2; ++o) {
        if (!p.dst[o]) continue;
        Pack<In> out;
#pragma unroll
        for (int f = 0; f < Pack<In>::kSize; ++f) {
          const Acc x = a[k].template get<Acc>(f);
          out.template set<Acc>(f, two ? coef[o][0] * x + coef[o][1] * b[k].template get<Acc>(f) : coef[o][0] * x);
        }
        store_pack(static_cast<In*>(p.dst[o]) + row * p.features, first + k, p.features, vector, out);
      }
    }
  }
}

template <class In, class Acc>
void run(const CombineProblem& p, cudaStream_t stream) {
  bool vector = true;  // every row of every operand starts on a 16-byte boundary, features packed
  for (const Operand& s : p.src)
    vector = vector && (!s.data || (s.feature_stride == 1 && rows_aligned<In>(s.data, s.row_stride)));
  for (void* d : p.dst) vector = vector && (!d || rows_aligned<In>(d, p.features));
  const int64_t per_block = int64_t(kThreads) * kPacksPerThread;
  const dim3 grid(unsigned(ceil_div(pack_count<In>(p.features), per_block)), unsigned(std::min(p.rows, kMaxGridY)));
  combine_kernel<In, Acc><<<grid, kThreads, 0, stream>>>(p, vector);
  check_launch("combine_kernel");
}

}  // namespace

void combine(const CombineProblem& problem, uintptr_t stream) {
  check(problem);
  const DeviceOf device(problem.src[0].data);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) {
    run<decltype(in), decltype(acc)>(problem, as_stream(stream));
  });
}

}  // namespace imm::cuda::next

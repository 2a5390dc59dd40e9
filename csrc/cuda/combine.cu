// Per-sample linear combinations on NVIDIA GPUs: interpolate / interpolate_pair / ddim / imm_output, forward
// (out_o = a_o in0 + b_o in1) and backward (the transpose). One launch: blocks over (feature range, row), each
// thread computing its row's coefficients from the row's times (common/schedule_math.h) and streaming 16-byte
// packs.
#include <algorithm>

#include "common/schedule_math.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace imm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y: rows past it are looped over

template <class In>
struct CombineRows {
  const In* src[2];  // src[1] may be null
  In* dst[2];        // either may be null
};

template <class In, class Acc>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CombineProblem p, const CombineRows<In> io,
                                                           bool transpose, bool vector) {
  const int64_t packs = pack_count<In>(p.features);
  const Acc* t0 = static_cast<const Acc*>(p.time0);
  const Acc* t1 = static_cast<const Acc*>(p.time1);
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    Acc mix[2][2] = {{0, 0}, {0, 0}};  // mix[output][input]
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      if (o >= p.outputs) break;
      const Mix<Acc> m = combine_coefficients(p.kind, p.schedule, p.param, Acc(p.sigma_data),
                                              t0[row * p.time0_stride], t1[row * p.time1_stride], o);
      mix[o][0] = m.a;
      mix[o][1] = m.b;
    }
    Acc coef[2][2];  // coef[dst][src]
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) coef[i][j] = transpose ? mix[j][i] : mix[i][j];
    const int64_t offset = row * p.features;
    for (int64_t pk = int64_t(blockIdx.x) * kThreads + threadIdx.x; pk < packs; pk += int64_t(gridDim.x) * kThreads) {
      const Pack<In> a = load_pack(io.src[0] + offset, pk, p.features, vector);
      Pack<In> b{};
      if (io.src[1]) b = load_pack(io.src[1] + offset, pk, p.features, vector);
#pragma unroll
      for (int o = 0; o < 2; ++o) {
        if (!io.dst[o]) continue;
        Pack<In> out;
#pragma unroll
        for (int f = 0; f < Pack<In>::kSize; ++f) {
          const Acc value = io.src[1] ? coef[o][0] * a.template get<Acc>(f) + coef[o][1] * b.template get<Acc>(f)
                                      : coef[o][0] * a.template get<Acc>(f);
          out.template set<Acc>(f, value);
        }
        store_pack(io.dst[o] + offset, pk, p.features, vector, out);
      }
    }
  }
}

template <class In, class Acc>
void run(const CombineProblem& p, const void* const src[2], void* const dst[2], bool transpose, cudaStream_t stream) {
  const CombineRows<In> io{{static_cast<const In*>(src[0]), static_cast<const In*>(src[1])},
                           {static_cast<In*>(dst[0]), static_cast<In*>(dst[1])}};
  bool vector = true;  // every row of every operand starts on a 16-byte boundary
  for (const void* base : {src[0], src[1], static_cast<const void*>(dst[0]), static_cast<const void*>(dst[1])})
    vector = vector && (!base || rows_aligned<In>(base, p.features));
  const dim3 grid(unsigned(ceil_div(pack_count<In>(p.features), kThreads)), unsigned(std::min(p.rows, kMaxGridY)));
  combine_kernel<In, Acc><<<grid, kThreads, 0, stream>>>(p, io, transpose, vector);
  check_launch("combine_kernel");
}

}  // namespace

void combine(const CombineProblem& problem, const void* const src[2], void* const dst[2], bool transpose,
             uintptr_t stream) {
  check(problem);
  require(src[0] != nullptr, "combine: null first source");
  const DeviceOf device(src[0]);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) {
    run<decltype(in), decltype(acc)>(problem, src, dst, transpose, as_stream(stream));
  });
}

}  // namespace imm::cuda

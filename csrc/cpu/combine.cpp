// Per-sample linear combinations on the CPU: interpolate / interpolate_pair / ddim / imm_output, forward
// (out_o = a_o in0 + b_o in1) and backward (the transpose). Coefficients come from the row's times.
#include <omp.h>

#include <algorithm>
#include <type_traits>

#include "common/schedule_math.h"
#include "cpu/kernels.h"
#include "cpu/storage.h"

namespace imm::cpu {
namespace {

constexpr int64_t kBlock = 16384;  // features per task: rows are split so large images still spread over threads

// One pass over the sources for every destination; the presence of src1 / dst0 / dst1 is a compile-time
// choice so the loop stays branch-free and vectorized.
template <class In, class Acc, bool kSrc1, bool kDst0, bool kDst1>
inline void combine_pass(const In* src0, const In* src1, In* dst0, In* dst1, const Acc (&coef)[2][2], int64_t n) {
#pragma omp simd
  for (int64_t f = 0; f < n; ++f) {
    const Acc a = load<Acc>(src0[f]);
    const Acc b = kSrc1 ? load<Acc>(src1[f]) : Acc(0);
    if constexpr (kDst0) dst0[f] = store<In>(coef[0][0] * a + coef[0][1] * b);
    if constexpr (kDst1) dst1[f] = store<In>(coef[1][0] * a + coef[1][1] * b);
  }
}

template <class In, class Acc>
IMM_CPU_CLONES void combine_block(const In* src0, const In* src1, In* dst0, In* dst1, const Acc (&coef)[2][2],
                                  int64_t n) {
  auto pass = [&](auto src1_set, auto dst0_set, auto dst1_set) {
    combine_pass<In, Acc, decltype(src1_set)::value, decltype(dst0_set)::value, decltype(dst1_set)::value>(
        src0, src1, dst0, dst1, coef, n);
  };
  using yes = std::true_type;
  using no = std::false_type;
  auto with_dsts = [&](auto src1_set) {
    if (dst0 && dst1) return pass(src1_set, yes{}, yes{});
    if (dst0) return pass(src1_set, yes{}, no{});
    if (dst1) return pass(src1_set, no{}, yes{});
  };
  if (src1) return with_dsts(yes{});
  with_dsts(no{});
}

template <class In, class Acc>
void run(const CombineProblem& p, const void* const src[2], void* const dst[2], bool transpose, int threads) {
  const int64_t f_count = p.features, blocks = ceil_div(f_count, kBlock), tasks = p.rows * blocks;
  const Acc* t0 = static_cast<const Acc*>(p.time0);
  const Acc* t1 = static_cast<const Acc*>(p.time1);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < tasks; ++k) {
    const int64_t b = k / blocks, f0 = (k % blocks) * kBlock, n = std::min(kBlock, f_count - f0);
    Acc mix[2][2] = {{0, 0}, {0, 0}};  // mix[output][input]
    for (int o = 0; o < p.outputs; ++o) {
      const Mix<Acc> m = combine_coefficients(p.kind, p.schedule, p.param, Acc(p.sigma_data),
                                              t0[b * p.time0_stride], t1[b * p.time1_stride], o);
      mix[o][0] = m.a;
      mix[o][1] = m.b;
    }
    Acc coef[2][2];  // coef[dst][src]
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) coef[i][j] = transpose ? mix[j][i] : mix[i][j];
    const int64_t offset = b * f_count + f0;
    auto at = [&](const void* base) { return base ? static_cast<const In*>(base) + offset : nullptr; };
    auto at_mut = [&](void* base) { return base ? static_cast<In*>(base) + offset : nullptr; };
    combine_block<In, Acc>(at(src[0]), at(src[1]), at_mut(dst[0]), at_mut(dst[1]), coef, n);
  }
}

}  // namespace

void combine(const CombineProblem& problem, const void* const src[2], void* const dst[2], bool transpose,
             int num_threads) {
  check(problem);
  require(src[0] != nullptr, "combine: null first source");
  const int threads = std::max(1, num_threads);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) {
    run<decltype(in), decltype(acc)>(problem, src, dst, transpose, threads);
  });
}

}  // namespace imm::cpu

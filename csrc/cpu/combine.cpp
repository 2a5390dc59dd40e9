// Per-sample linear combinations on the CPU: interpolate / interpolate_pair / ddim / imm_output, forward
// (out_o = a_o in0 + b_o in1) and backward (the transpose). Coefficients come from the row's times
// (common/schedule_math.h); the sources may be strided views (expanded gradients included), the destinations
// are contiguous.
#include <algorithm>
#include <string>
#include <type_traits>

#include "common/schedule_math.h"
#include "cpu/kernels.h"
#include "cpu/storage.h"

namespace imm::cpu {
namespace {

constexpr int64_t kBlock = 16384;  // features per task: rows are split so large images still spread over threads

// One pass over the sources for every destination; which of src1 / dst0 / dst1 are present and whether the
// sources' features are unit-stride are compile-time choices, so the common loop stays branch-free and vectorized.
// Cloned itself: gcc does not inline all sixteen instantiations into a cloned caller, and a loop left in the
// default (SSE2) build converts bfloat16 one element at a time.
template <class In, class Acc, bool kSrc1, bool kDst0, bool kDst1, bool kUnitStride>
IMM_CPU_CLONES void combine_pass(const In* src0, int64_t stride0, const In* src1, int64_t stride1, In* dst0, In* dst1,
                         const Acc (&coef)[2][2], int64_t n) {
#pragma omp simd
  for (int64_t f = 0; f < n; ++f) {
    const Acc a = load<Acc>(src0[kUnitStride ? f : f * stride0]);
    const Acc b = kSrc1 ? load<Acc>(src1[kUnitStride ? f : f * stride1]) : Acc(0);
    if constexpr (kDst0) dst0[f] = store<In>(coef[0][0] * a + coef[0][1] * b);
    if constexpr (kDst1) dst1[f] = store<In>(coef[1][0] * a + coef[1][1] * b);
  }
}

template <class In, class Acc>
void combine_block(const In* src0, int64_t stride0, const In* src1, int64_t stride1, In* dst0,
                                  In* dst1, const Acc (&coef)[2][2], int64_t n) {
  using yes = std::true_type;
  using no = std::false_type;
  auto pass = [&](auto src1_set, auto dst0_set, auto dst1_set, auto unit) {
    combine_pass<In, Acc, decltype(src1_set)::value, decltype(dst0_set)::value, decltype(dst1_set)::value,
                 decltype(unit)::value>(src0, stride0, src1, stride1, dst0, dst1, coef, n);
  };
  auto with_dsts = [&](auto src1_set, auto unit) {
    if (dst0 && dst1) return pass(src1_set, yes{}, yes{}, unit);
    if (dst0) return pass(src1_set, yes{}, no{}, unit);
    if (dst1) return pass(src1_set, no{}, yes{}, unit);
  };
  auto with_src1 = [&](auto unit) {
    if (src1) return with_dsts(yes{}, unit);
    with_dsts(no{}, unit);
  };
  if (stride0 == 1 && (!src1 || stride1 == 1)) return with_src1(yes{});
  with_src1(no{});
}

// The names the public API gives the two times of a kind (for messages).
const char* time_name(CombineKind kind, int which) {
  if (kind == CombineKind::interpolate) return which == 0 ? "t" : "r";
  return which == 0 ? "s" : "t";
}

// Times in [0, 1] (NaN refused), and s <= t for imm_output; a ValueError naming the time and the sample.
void check_times(const CombineProblem& p) {
  const bool both = p.kind == CombineKind::imm_output || p.outputs == 2;
  for (int64_t b = 0; b < p.rows; ++b) {
    const double times[2] = {p.time0.at(b), p.time1.at(b)};
    for (int k = 0; k < (both ? 2 : 1); ++k)
      if (!(times[k] >= 0 && times[k] <= 1))
        fail(std::string(time_name(p.kind, k)) + " must lie in [0, 1]; got " + std::to_string(times[k]) +
             " for sample " + std::to_string(b));
    if (p.kind == CombineKind::imm_output && !(times[0] <= times[1]))
      fail("s must be <= t (the target time comes before the source time); got s = " + std::to_string(times[0]) +
           " > t = " + std::to_string(times[1]) + " for sample " + std::to_string(b));
  }
}

template <class In, class Acc>
void run(const CombineProblem& p, int threads) {
  if (p.check_values) check_times(p);
  const int64_t f_count = p.features, blocks = ceil_div(f_count, kBlock), tasks = p.rows * blocks;
  parallel(threads, [&](int) {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t b = k / blocks, f0 = (k % blocks) * kBlock, n = std::min(kBlock, f_count - f0);
      Acc coef[2][2];  // coef[dst][src]
      combine_matrix(p.kind, p.schedule, p.param, Acc(p.sigma_data), Acc(p.time0.at(b)), Acc(p.time1.at(b)),
                     p.outputs, p.transpose, coef);
      auto source = [&](const Operand& s) {
        return s.data ? static_cast<const In*>(s.data) + b * s.row_stride + f0 * s.feature_stride : nullptr;
      };
      auto destination = [&](void* base) { return base ? static_cast<In*>(base) + b * f_count + f0 : nullptr; };
      combine_block<In, Acc>(source(p.src[0]), p.src[0].feature_stride, source(p.src[1]), p.src[1].feature_stride,
                             destination(p.dst[0]), destination(p.dst[1]), coef, n);
    }
  });
}

}  // namespace

void combine(const CombineProblem& problem, int num_threads) {
  check(problem);
  const int threads = std::max(1, num_threads);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) { run<decltype(in), decltype(acc)>(problem, threads); });
}

}  // namespace imm::cpu

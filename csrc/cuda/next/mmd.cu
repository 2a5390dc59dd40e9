// Grouped MMD on NVIDIA GPUs, the current contract (common/problems.h), opt-in (IMM_CUDA_KERNELS=next) until a
// GPU run passes the test suite with it; the verified kernels (../mmd.cu) stay the default until then.
//
// Forward: pass 1 as the verified kernels do it (cuda/pair_sums.cuh: warp tiles of pairs, each reduced once per
// team), then a finalize in double into the group's loss share and, when a gradient will be wanted, the
// coefficients (own, cross, gap: common/mmd_math.h); the last block to finish adds the groups' losses up in
// group order (a counter the caller keeps at zero between launches; this block resets it). Many groups: one
// launch, a team of warps per group. Few large groups: chunks of features, a block per (group, chunk) for pass 1,
// then a block per group for the finalize. Unlike the verified kernels, no pass 2 here.
// Backward: one launch, a thread per 16-byte pack of a group's features; it makes that pack of the gradient rows
// from the partner rows and the coefficients, scaled by the output's gradient (read from device memory): the
// inputs read once more, the gradient written once.
#include <algorithm>

#include "common/mmd_math.h"
#include "cuda/device.cuh"
#include "cuda/next/kernels.h"
#include "cuda/pair_sums.cuh"

namespace imm::cuda::next {
namespace {

enum NextCoefBlock : int { kOwn = 0, kCross = 1, kGap = 2, kSideBlocks = 3, kNextCoefBlocks = 6 };
constexpr int kBackwardThreads = 256;
constexpr int kBackwardRows = 4;     // gradient rows a thread makes at once (their packs held in registers)
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y: groups past it are looped over

// Where the forward's scratch puts the groups' losses: after the pass-1 sums [G][chunks][kStatBlocks][M][M].
template <class Acc>
double* group_losses(const MmdLayout& layout, int64_t groups, int64_t m) {
  return reinterpret_cast<double*>(static_cast<Acc*>(layout.stats) +
                                   ceil_div(stats_elements(groups, m, layout) * int64_t(sizeof(Acc)), 8) * 8 /
                                       int64_t(sizeof(Acc)));
}

// Group g's finalize by its team (every thread of the block calls it: it synchronizes the block): the pair
// sums added over `chunks` chunks, in double, into the coefficients (where wanted) and the weighted loss, which
// goes to out[g] (reduction "none") or losses[g].
template <class In, class Acc>
__device__ void finalize_group(const MmdForwardProblem& p, int64_t g, bool active, const Acc* stats, int64_t chunks,
                               double* losses, const Team& team, double (&loss_slots)[kWarps]) {
  const int64_t m = p.group_size, mm = m * m;
  double loss = 0;
  if (active) {
    const double c = kernel_scale(p.kernel, p.bandwidth.at(g), p.features);
    const double grad_w = 2.0 * p.weight.at(g) / (p.reduction == Reduction::mean ? double(p.groups) : 1.0);
    Acc* coef = static_cast<Acc*>(p.coefficients);
    for (int64_t e = team.thread; e < 2 * mm; e += team.size) {
      const int side = int(e / mm);  // 0: X = y_t, Y = y_r; 1: X = y_r, Y = y_t
      const int64_t ij = e % mm, i = ij / m, j = ij % m;
      const int64_t a2_at = (side == 0 ? kTT : kRR) * mm + ij;
      const int64_t b2_at = kTR * mm + (side == 0 ? ij : j * m + i);  // |t_i - r_j|^2, or |r_i - t_j|^2
      const int64_t delta_at = (side == 0 ? kDT : kDR) * mm + ij;
      const int64_t e2_at = kTR * mm + j * m + j;  // |t_j - r_j|^2
      double a2 = 0, b2 = 0, delta = 0, e2 = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        const Acc* chunk = stats + k * kStatBlocks * mm;
        a2 += chunk[a2_at];
        b2 += chunk[b2_at];
        delta += chunk[delta_at];
        e2 += chunk[e2_at];
      }
      const double self_w = self_weight<double>(p.estimator, m, i == j);
      const double cross_w = cross_weight<double>(p.estimator, m, i == j);
      if (coef) {
        const PairCoefficients<double> r =
            pair_coefficients<double, true>(p.kernel, self_w, cross_w, grad_w, a2, b2, delta, e2, c, p.eps, i == j);
        Acc* side_coef = coef + (g * kNextCoefBlocks + side * kSideBlocks) * mm + ij;
        side_coef[kOwn * mm] = Acc(r.own);
        side_coef[kCross * mm] = Acc(r.cross);
        side_coef[kGap * mm] = Acc(r.gap);
        loss += r.loss;
      } else {
        loss += pair_coefficients<double, false>(p.kernel, self_w, cross_w, grad_w, a2, b2, delta, e2, c, p.eps,
                                                 i == j).loss;
      }
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) loss += __shfl_xor_sync(0xffffffffu, loss, offset);
  if (team.lane == 0) loss_slots[team.first_warp + team.warp] = loss;
  __syncthreads();
  if (active && team.thread == 0) {
    double total = 0;
    for (int w = 0; w < team.warps; ++w) total += loss_slots[team.first_warp + w];
    total *= p.weight.at(g);
    if (p.reduction == Reduction::none) static_cast<In*>(p.out)[g] = from_acc<In>(Acc(total));
    else losses[g] = total;
  }
}

// For a reduced loss: the last block to get here adds the groups' losses up, in group order whatever the block
// order was, writes the mean or sum, and resets the counter for the next launch.
template <class In, class Acc>
__device__ void reduce_losses(const MmdForwardProblem& p, const double* losses) {
  if (p.reduction == Reduction::none) return;
  __shared__ bool last;
  __shared__ double warp_sums[kThreads / kWarpSize];
  __syncthreads();  // this block's losses are written
  if (threadIdx.x == 0) {
    __threadfence();  // ... and visible to the block that arrives last
    last = atomicAdd(static_cast<unsigned*>(p.counter), 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double total = 0;
  const volatile double* all = losses;  // written by other blocks: not from a stale cache line
  for (int64_t g = threadIdx.x; g < p.groups; g += blockDim.x) total += all[g];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = total;
  __syncthreads();
  if (threadIdx.x != 0) return;
  total = 0;
  for (int w = 0; w < int(blockDim.x) / kWarpSize; ++w) total += warp_sums[w];
  if (p.reduction == Reduction::mean) total /= double(p.groups);
  *static_cast<In*>(p.out) = from_acc<In>(Acc(total));
  *static_cast<unsigned*>(p.counter) = 0;
}

// Single-launch forward: a team per group runs pass 1 and the finalize.
template <class In, class Acc, int kEdge>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) next_forward_kernel(const MmdForwardProblem p,
                                                                                 const MmdLayout layout,
                                                                                 double* losses) {
  __shared__ StatSlots<Acc> slots;
  __shared__ double loss_slots[kWarps];
  {
    const TeamGroup tg = team_group(p, layout);
    pair_sums<In, Acc, kEdge>(group_view<In>(p, layout, tg.g, 0), tg.team, tg.active, layout.vector_inputs,
                              group_stats<Acc>(layout, tg.g, p.group_size), slots);
  }
  const TeamGroup tg = team_group(p, layout);  // again rather than held across pass 1, which needs every register
  finalize_group<In, Acc>(p, tg.g, tg.active, group_stats<Acc>(layout, tg.g, p.group_size), 1, losses, tg.team,
                          loss_slots);
  reduce_losses<In, Acc>(p, losses);
}

// Split forward, pass 1: block (g, chunk) = blockIdx.x / chunks, blockIdx.x % chunks.
template <class In, class Acc, int kEdge>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) next_partial_sums_kernel(const MmdForwardProblem p,
                                                                                      const MmdLayout layout) {
  __shared__ StatSlots<Acc> slots;
  const int64_t g = blockIdx.x / layout.chunks, chunk = blockIdx.x % layout.chunks;
  Acc* out = group_stats<Acc>(layout, g, p.group_size) + chunk * kStatBlocks * p.group_size * p.group_size;
  pair_sums<In, Acc, kEdge>(group_view<In>(p, layout, g, chunk), team_of(kWarps), true, layout.vector_inputs, out,
                            slots);
}

// Split forward: a block per group adds up its chunks' sums, finalizes, and takes part in the reduction.
template <class In, class Acc>
__global__ void __launch_bounds__(kThreads) next_finalize_kernel(const MmdForwardProblem p, const MmdLayout layout,
                                                                 double* losses) {
  __shared__ double loss_slots[kWarps];
  finalize_group<In, Acc>(p, blockIdx.x, true, group_stats<Acc>(layout, blockIdx.x, p.group_size), layout.chunks,
                          losses, team_of(kWarps), loss_slots);
  reduce_losses<In, Acc>(p, losses);
}

// The gradients of one pack of one group's rows: grid (pack blocks, groups), a thread per pack, the rows in
// blocks of kBackwardRows; y_t side X = y_t, Y = y_r, y_r side the reverse, X_j - Y_j = +-(t_j - r_j).
template <class In, class Acc>
__global__ void __launch_bounds__(kBackwardThreads) next_backward_kernel(const MmdBackwardProblem p,
                                                                         bool vector_inputs, bool vector_grads) {
  constexpr int n = Pack<In>::kSize;
  const int64_t m = p.group_size, mm = m * m, packs = pack_count<In>(p.features);
  const int64_t pk = int64_t(blockIdx.x) * kBackwardThreads + threadIdx.x;
  if (pk >= packs) return;
  for (int64_t g = blockIdx.y; g < p.groups; g += gridDim.y) {
    const In* t = static_cast<const In*>(p.y_t) + g * m * p.stride_t;
    const In* r = static_cast<const In*>(p.y_r) + g * m * p.stride_r;
    const Acc scale = to_acc<Acc>(static_cast<const In*>(p.grad_output)[g * p.grad_output_stride]);
    const Acc* coef = static_cast<const Acc*>(p.coefficients) + g * kNextCoefBlocks * mm;
    for (int side = 0; side < 2; ++side) {
      In* grad = static_cast<In*>(side == 0 ? p.grad_t : p.grad_r);
      if (!grad) continue;
      const In* own = side == 0 ? t : r;
      const In* other = side == 0 ? r : t;
      const int64_t own_stride = side == 0 ? p.stride_t : p.stride_r;
      const int64_t other_stride = side == 0 ? p.stride_r : p.stride_t;
      const Acc* c = coef + side * kSideBlocks * mm;
      for (int64_t row0 = 0; row0 < m; row0 += kBackwardRows) {
        Pack<In> x_i[kBackwardRows];
        Acc out[kBackwardRows][n];
#pragma unroll
        for (int a = 0; a < kBackwardRows; ++a) {
          x_i[a] = load_pack(own + min(row0 + a, m - 1) * own_stride, pk, p.features, vector_inputs);
#pragma unroll
          for (int f = 0; f < n; ++f) out[a][f] = Acc(0);
        }
        for (int64_t j = 0; j < m; ++j) {
          const Pack<In> x_j = load_pack(own + j * own_stride, pk, p.features, vector_inputs);
          const Pack<In> y_j = load_pack(other + j * other_stride, pk, p.features, vector_inputs);
          Acc c_own[kBackwardRows], c_cross[kBackwardRows], c_gap[kBackwardRows];
#pragma unroll
          for (int a = 0; a < kBackwardRows; ++a) {
            const int64_t ij = min(row0 + a, m - 1) * m + j;
            c_own[a] = scale * __ldg(c + kOwn * mm + ij);
            c_cross[a] = scale * __ldg(c + kCross * mm + ij);
            c_gap[a] = scale * __ldg(c + kGap * mm + ij);
          }
#pragma unroll
          for (int f = 0; f < n; ++f) {
            const Acc xj = x_j.template get<Acc>(f), yj = y_j.template get<Acc>(f);
#pragma unroll
            for (int a = 0; a < kBackwardRows; ++a) {
              const Acc xi = x_i[a].template get<Acc>(f);
              out[a][f] += c_own[a] * (xi - xj) + c_cross[a] * (xi - yj) + c_gap[a] * (xj - yj);
            }
          }
        }
#pragma unroll
        for (int a = 0; a < kBackwardRows; ++a) {
          if (row0 + a < m) {
            Pack<In> packed;
#pragma unroll
            for (int f = 0; f < n; ++f) packed.template set<Acc>(f, out[a][f]);
            In* row = grad + (g * m + row0 + a) * p.features;
            // A whole aligned pack as one 16-byte store (store_pack's plain assignment came out as four here).
            if (vector_grads && (pk + 1) * n <= p.features) __stwb(reinterpret_cast<uint4*>(row) + pk, packed.bits);
            else store_pack(row, pk, p.features, false, packed);
          }
        }
      }
    }
  }
}

template <class In, class Acc>
MmdLayout next_plan(const MmdForwardProblem& p) {
  MmdLayout layout = plan<In>(p.groups, p.features);
  layout.vector_inputs = rows_aligned<In>(p.y_t, p.stride_t) && rows_aligned<In>(p.y_r, p.stride_r);
  layout.stats = p.workspace;
  return layout;
}

template <class In, class Acc>
void forward(const MmdForwardProblem& p, cudaStream_t stream) {
  const MmdLayout layout = next_plan<In, Acc>(p);
  if (layout.chunks == 1) {
    const int64_t groups_per_block = kWarps / layout.team_warps;
    with_tile_edge<Acc>(p.group_size, [&](auto edge) {
      next_forward_kernel<In, Acc, edge><<<ceil_div(p.groups, groups_per_block), kThreads, 0, stream>>>(
          p, layout, group_losses<Acc>(layout, p.groups, p.group_size));
    });
    check_launch("next_forward_kernel");
    return;
  }
  with_tile_edge<Acc>(p.group_size, [&](auto edge) {
    next_partial_sums_kernel<In, Acc, edge><<<p.groups * layout.chunks, kThreads, 0, stream>>>(p, layout);
  });
  check_launch("next_partial_sums_kernel");
  next_finalize_kernel<In, Acc><<<p.groups, kThreads, 0, stream>>>(p, layout,
                                                                   group_losses<Acc>(layout, p.groups, p.group_size));
  check_launch("next_finalize_kernel");
}

template <class In, class Acc>
void backward(const MmdBackwardProblem& p, cudaStream_t stream) {
  const bool vector_inputs = rows_aligned<In>(p.y_t, p.stride_t) && rows_aligned<In>(p.y_r, p.stride_r);
  const bool vector_grads = (!p.grad_t || rows_aligned<In>(p.grad_t, p.features)) &&
                            (!p.grad_r || rows_aligned<In>(p.grad_r, p.features));
  const dim3 grid(unsigned(ceil_div(pack_count<In>(p.features), kBackwardThreads)),
                  unsigned(std::min(p.groups, kMaxGridY)));
  next_backward_kernel<In, Acc><<<grid, kBackwardThreads, 0, stream>>>(p, vector_inputs, vector_grads);
  check_launch("next_backward_kernel");
}

}  // namespace

int64_t mmd_workspace_bytes(int64_t groups, int64_t group_size, int64_t features, DType dtype) {
  int64_t bytes = 0;
  dispatch_dtype(dtype, [&](auto in, auto acc) {
    using Acc = decltype(acc);
    const MmdLayout layout = plan<decltype(in)>(groups, features);
    const int64_t stats = stats_elements(groups, group_size, layout) * int64_t(sizeof(Acc));
    bytes = ceil_div(stats, 8) * 8 + groups * int64_t(sizeof(double));
  });
  return bytes;
}

void mmd_forward(const MmdForwardProblem& problem, uintptr_t stream) {
  check(problem);
  require(!problem.mix.f_t, "mmd: the CUDA backend has no loss-head mix (imm_mmd_loss composes its ops there)");
  require(problem.workspace != nullptr, "mmd: the CUDA backend needs a workspace (see mmd_workspace_bytes)");
  require(problem.reduction == Reduction::none || problem.counter != nullptr, "mmd: a reduced loss needs a counter");
  require(problem.features < (int64_t(1) << 31), "mmd: the CUDA backend takes fewer than 2^31 features");
  const DeviceOf device(problem.y_t);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) {
    forward<decltype(in), decltype(acc)>(problem, as_stream(stream));
  });
}

void mmd_backward(const MmdBackwardProblem& problem, uintptr_t stream) {
  check(problem);
  require(!problem.mix.f_t, "mmd: the CUDA backend has no loss-head mix (imm_mmd_loss composes its ops there)");
  require(problem.features < (int64_t(1) << 31), "mmd: the CUDA backend takes fewer than 2^31 features");
  const DeviceOf device(problem.y_t);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) {
    backward<decltype(in), decltype(acc)>(problem, as_stream(stream));
  });
}

}  // namespace imm::cuda::next

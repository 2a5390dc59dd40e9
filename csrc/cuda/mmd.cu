// Grouped MMD on NVIDIA GPUs, with the per-pair math of common/mmd_math.h.
//
// Pass 1 sums, per ordered pair (i, j) of a group, tt = |t_i - t_j|^2, rr = |r_i - r_j|^2, tr = |t_i - r_j|^2,
// dt = sum (t_j - r_j)((t_i - r_j) + (t_i - t_j)) and dr = -sum (t_j - r_j)((r_i - r_j) + (r_i - t_j)) by
// direct differences; a finalize in double turns them into the loss and the coefficients P, Q per pair and
// side; pass 2 writes grad_X_i = sum_j P_ij (Y_j - X_j) + Q_ij (X_i - Y_j).
//
// Work split: a warp owns a tile of kEdge x kEdge pairs (sums in registers) over a strided slice of the
// features, 16-byte packs at a time. A team of warps owns one (group, feature range):
// - many groups (e.g. G, M, D = 1024, 4, 4096): one launch, a team of 1 to 4 warps per group runs pass 1, the
//   finalize and pass 2 back to back, so pass 2 finds the rows in L1/L2;
// - few large groups (e.g. 8, 8, 196608): the features are cut into chunks, a block per (group, chunk) writes
//   partial sums, a small kernel finalizes each group, and pass 2 runs per (group, chunk).
// Sums and coefficients go through a workspace from the caller (torch's allocator), so M is not bounded by
// shared memory; results do not depend on the GPU model (the split depends on G, M and D only). Pass 1 lives in
// pair_sums.cuh, shared with the kernels of the current contract (next/mmd.cu).
#include <algorithm>
#include <type_traits>

#include "common/mmd_math.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"
#include "cuda/pair_sums.cuh"

namespace imm::cuda {
namespace {

enum CoefBlock : int { kPT = 0, kQT = 1, kPR = 2, kQR = 3, kCoefBlocks = 4 };

constexpr int kGradRows = 4;  // gradient rows per warp in pass 2 (no sums to hold, so always 4)

// Loss of group g and its coefficients, from its pass-1 sums over `chunks` chunks, in double (M^2 scalars per
// group, and the U statistic's loss is a difference of O(1) terms). Synchronizes the block.
template <class Acc>
__device__ void finalize_group(const MmdProblem& p, int64_t g, bool active, const Acc* stats, int64_t chunks,
                               Acc* coef, const Team& team, double (&loss_slots)[kWarps]) {
  const int64_t m = p.group_size, mm = m * m;
  double loss = 0;
  if (active) {
    const double weight = static_cast<const Acc*>(p.weight)[g];
    const double c = kernel_scale(p.kernel, double(static_cast<const Acc*>(p.bandwidth)[g]), p.features);
    const double cross_w = 1.0 / double(mm), grad_w = 2.0 * weight;
    for (int64_t e = team.thread; e < 2 * mm; e += team.size) {
      const int side = int(e / mm);  // 0: X = y_t, Y = y_r; 1: X = y_r, Y = y_t
      const int64_t ij = e % mm, i = ij / m, j = ij % m;
      // a2 = |X_i - X_j|^2, b2 = |X_i - Y_j|^2 (the tr block read transposed for the y_r side), delta = b2 - a2.
      const int64_t a2_at = (side == 0 ? kTT : kRR) * mm + ij;
      const int64_t b2_at = kTR * mm + (side == 0 ? ij : j * m + i);
      const int64_t delta_at = (side == 0 ? kDT : kDR) * mm + ij;
      double a2 = 0, b2 = 0, delta = 0;
#pragma unroll 8  // loads in flight: the split path has tens of chunks, summed by few blocks
      for (int64_t k = 0; k < chunks; ++k) {
        const Acc* chunk = stats + k * kStatBlocks * mm;
        a2 += chunk[a2_at];
        b2 += chunk[b2_at];
        delta += chunk[delta_at];
      }
      const PairCoefficients<double> r = pair_coefficients(p.kernel, self_weight<double>(p.estimator, m, i == j),
                                                           cross_w, grad_w, a2, b2, delta, c, p.eps);
      loss += r.loss;
      coef[(side == 0 ? kPT : kPR) * mm + ij] = Acc(r.p);
      coef[(side == 0 ? kQT : kQR) * mm + ij] = Acc(r.q);
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) loss += __shfl_xor_sync(0xffffffffu, loss, offset);
  if (team.lane == 0) loss_slots[team.first_warp + team.warp] = loss;
  __syncthreads();  // also publishes the coefficients to the block
  if (active && team.thread == 0) {
    double total = 0;
    for (int w = 0; w < team.warps; ++w) total += loss_slots[team.first_warp + w];
    static_cast<Acc*>(p.loss)[g] = Acc(double(static_cast<const Acc*>(p.weight)[g]) * total);
  }
}

// Pass 2 of a team over its chunk: the gradient rows of the wanted sides. A warp owns kGradRows rows of one side
// and a strided slice of the packs; no synchronization.
template <class In, class Acc>
__device__ void write_gradients(const MmdProblem& p, const GroupView<In>& v, int64_t g, const Acc* coef,
                                const Team& team, bool vector_grads, bool vector_inputs) {
  constexpr int T = kGradRows;
  constexpr int n = Pack<In>::kSize;
  const int sides = (p.grad_t != nullptr) + (p.grad_r != nullptr);
  const int row_blocks = (v.m + T - 1) / T;
  const int items = sides * row_blocks;
  const int slices = max(1, team.warps / items);
  const int mm = v.m * v.m;
  for (int item = team.warp / slices; item < items; item += team.warps / slices) {
    const int side = sides == 2 ? item / row_blocks : (p.grad_t != nullptr ? 0 : 1);
    const int row0 = item % row_blocks * T;
    // y_t side: X = y_t, Y = y_r, and Y_j - X_j = -(t_j - r_j); y_r side: X_j - Y_j with X = y_r is +(t_j - r_j).
    const Acc sign = side == 0 ? Acc(1) : Acc(-1);
    const In* own = side == 0 ? v.t : v.r;
    const int64_t own_stride = side == 0 ? v.stride_t : v.stride_r;
    const Acc* pc = coef + (side == 0 ? kPT : kPR) * mm;
    const Acc* qc = coef + (side == 0 ? kQT : kQR) * mm;
    In* grad = static_cast<In*>(side == 0 ? p.grad_t : p.grad_r) + g * p.group_size * p.features;
    const int step = slices * kWarpSize;
    for (int pk = v.first + team.warp % slices * kWarpSize + team.lane; pk < v.end; pk += step) {
      Pack<In> own_i[T];
      Acc out[T][n];
#pragma unroll
      for (int a = 0; a < T; ++a) {
        own_i[a] = load_pack(own + min(row0 + a, v.m - 1) * own_stride, pk, v.features, vector_inputs);
#pragma unroll
        for (int f = 0; f < n; ++f) out[a][f] = Acc(0);
      }
      for (int j = 0; j < v.m; ++j) {
        const Pack<In> tj = load_pack(v.t + j * v.stride_t, pk, v.features, vector_inputs);
        const Pack<In> rj = load_pack(v.r + j * v.stride_r, pk, v.features, vector_inputs);
        Acc pj[T], qj[T];
#pragma unroll
        for (int a = 0; a < T; ++a) {
          const int i = min(row0 + a, v.m - 1);
          pj[a] = sign * pc[i * v.m + j];
          qj[a] = qc[i * v.m + j];
        }
#pragma unroll
        for (int f = 0; f < n; ++f) {
          const Acc x = tj.template get<Acc>(f), y = rj.template get<Acc>(f);
          const Acc dl = x - y, other = side == 0 ? y : x;
#pragma unroll
          for (int a = 0; a < T; ++a) out[a][f] += qj[a] * (own_i[a].template get<Acc>(f) - other) - pj[a] * dl;
        }
      }
#pragma unroll
      for (int a = 0; a < T; ++a) {
        if (row0 + a >= v.m) break;
        Pack<In> packed;
#pragma unroll
        for (int f = 0; f < n; ++f) packed.template set<Acc>(f, out[a][f]);
        store_pack(grad + (row0 + a) * p.features, pk, p.features, vector_grads, packed);
      }
    }
  }
}

template <class Acc>
__device__ Acc* group_coef(const MmdLayout& layout, int64_t g, int64_t m) {
  return static_cast<Acc*>(layout.coef) + g * kCoefBlocks * m * m;
}

// Single-launch path: a team per group runs pass 1, the finalize and pass 2.
template <class In, class Acc, int kEdge>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mmd_group_kernel(const MmdProblem p,
                                                                              const MmdLayout layout) {
  __shared__ StatSlots<Acc> slots;
  __shared__ double loss_slots[kWarps];
  {
    const TeamGroup tg = team_group(p, layout);
    pair_sums<In, Acc, kEdge>(group_view<In>(p, layout, tg.g, 0), tg.team, tg.active, layout.vector_inputs,
                              group_stats<Acc>(layout, tg.g, p.group_size), slots);
  }
  // Computed again rather than held across pass 1, which needs every register.
  const TeamGroup tg = team_group(p, layout);
  Acc* coef = group_coef<Acc>(layout, tg.g, p.group_size);
  finalize_group<Acc>(p, tg.g, tg.active, group_stats<Acc>(layout, tg.g, p.group_size), 1, coef, tg.team,
                      loss_slots);
  if (tg.active && (p.grad_t || p.grad_r))
    write_gradients<In, Acc>(p, group_view<In>(p, layout, tg.g, 0), tg.g, coef, tg.team, layout.vector_grads,
                             layout.vector_inputs);
}

// Split path, pass 1: block (g, chunk) = blockIdx.x / chunks, blockIdx.x % chunks.
template <class In, class Acc, int kEdge>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mmd_partial_sums_kernel(const MmdProblem p,
                                                                                     const MmdLayout layout) {
  __shared__ StatSlots<Acc> slots;
  const int64_t g = blockIdx.x / layout.chunks, chunk = blockIdx.x % layout.chunks;
  const GroupView<In> v = group_view<In>(p, layout, g, chunk);
  Acc* out = group_stats<Acc>(layout, g, p.group_size) + chunk * kStatBlocks * p.group_size * p.group_size;
  pair_sums<In, Acc, kEdge>(v, team_of(kWarps), true, layout.vector_inputs, out, slots);
}

// Split path: a block per group adds up its chunks' sums and writes the loss and coefficients.
template <class Acc>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mmd_finalize_kernel(const MmdProblem p,
                                                                                 const MmdLayout layout) {
  __shared__ double loss_slots[kWarps];
  const int64_t g = blockIdx.x;
  finalize_group<Acc>(p, g, true, group_stats<Acc>(layout, g, p.group_size), layout.chunks,
                      group_coef<Acc>(layout, g, p.group_size), team_of(kWarps), loss_slots);
}

// Split path, pass 2: block (g, chunk) as in pass 1.
template <class In, class Acc>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) mmd_gradient_kernel(const MmdProblem p,
                                                                                 const MmdLayout layout) {
  const int64_t g = blockIdx.x / layout.chunks, chunk = blockIdx.x % layout.chunks;
  write_gradients<In, Acc>(p, group_view<In>(p, layout, g, chunk), g, group_coef<Acc>(layout, g, p.group_size),
                           team_of(kWarps), layout.vector_grads, layout.vector_inputs);
}

template <class In, class Acc>
int64_t workspace_bytes(int64_t groups, int64_t m, int64_t features) {
  const MmdLayout layout = plan<In>(groups, features);
  return (stats_elements(groups, m, layout) + groups * kCoefBlocks * m * m) * int64_t(sizeof(Acc));
}

template <class In, class Acc>
void run(const MmdProblem& p, cudaStream_t stream) {
  const int64_t g_count = p.groups, m = p.group_size;
  MmdLayout layout = plan<In>(g_count, p.features);
  layout.vector_inputs = rows_aligned<In>(p.y_t, p.stride_t) && rows_aligned<In>(p.y_r, p.stride_r);
  layout.vector_grads = (!p.grad_t || rows_aligned<In>(p.grad_t, p.features)) &&
                        (!p.grad_r || rows_aligned<In>(p.grad_r, p.features));
  layout.stats = p.workspace;
  layout.coef = static_cast<Acc*>(p.workspace) + stats_elements(g_count, m, layout);
  if (layout.chunks == 1) {
    const int64_t groups_per_block = kWarps / layout.team_warps;
    with_tile_edge<Acc>(m, [&](auto edge) {
      mmd_group_kernel<In, Acc, edge><<<ceil_div(g_count, groups_per_block), kThreads, 0, stream>>>(p, layout);
    });
    check_launch("mmd_group_kernel");
    return;
  }
  with_tile_edge<Acc>(m, [&](auto edge) {
    mmd_partial_sums_kernel<In, Acc, edge><<<g_count * layout.chunks, kThreads, 0, stream>>>(p, layout);
  });
  check_launch("mmd_partial_sums_kernel");
  mmd_finalize_kernel<Acc><<<g_count, kThreads, 0, stream>>>(p, layout);
  check_launch("mmd_finalize_kernel");
  if (p.grad_t || p.grad_r) {
    mmd_gradient_kernel<In, Acc><<<g_count * layout.chunks, kThreads, 0, stream>>>(p, layout);
    check_launch("mmd_gradient_kernel");
  }
}

}  // namespace

int64_t mmd_workspace_bytes(int64_t groups, int64_t group_size, int64_t features, DType dtype) {
  int64_t bytes = 0;
  dispatch_dtype(dtype, [&](auto in, auto acc) {
    bytes = workspace_bytes<decltype(in), decltype(acc)>(groups, group_size, features);
  });
  return bytes;
}

void mmd_fused(const MmdProblem& problem, uintptr_t stream) {
  check(problem);
  require(problem.workspace != nullptr, "mmd: the CUDA backend needs a workspace (see mmd_workspace_bytes)");
  require(problem.features < (int64_t(1) << 31), "mmd: the CUDA backend takes fewer than 2^31 features");
  const DeviceOf device(problem.y_t);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) {
    run<decltype(in), decltype(acc)>(problem, as_stream(stream));
  });
}

}  // namespace imm::cuda

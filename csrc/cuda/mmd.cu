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
// shared memory; results do not depend on the GPU model (the split depends on G, M and D only).
#include <algorithm>
#include <type_traits>

#include "common/mmd_math.h"
#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace imm::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMinBlocksPerSM = 3;  // at most 168 registers a thread (the 4 x 4 tile's sums and packs)
constexpr int64_t kTargetWarps = 4096;     // 2 to 3 waves at 12 warps per SM on an H100 (132 SMs)
constexpr int64_t kMinWarpFeatures = 512;  // a warp's share of a group's features: amortizes its reductions

// Workspace of one group: per feature chunk, kStatBlocks blocks of M x M pass-1 sums (pair (i, j) at i * M + j),
// and then kCoefBlocks blocks of M x M coefficients: P and Q of the y_t side, then of the y_r side.
enum StatBlock : int { kTT = 0, kRR = 1, kTR = 2, kDT = 3, kDR = 4, kStatBlocks = 5 };
enum CoefBlock : int { kPT = 0, kQT = 1, kPR = 2, kQR = 3, kCoefBlocks = 4 };

// A warp's tile of pairs is kEdge x kEdge, its 5 kEdge^2 sums in registers. kEdge = 4 only where the whole
// group is one diagonal tile (M <= 4, 4-byte sums), whose symmetric sums fit the register budget; 2 elsewhere
// (an off-diagonal 4 x 4 tile, or double sums, would spill).
constexpr int kMaxEdge = 4;

// Calls fn(std::integral_constant<int, kEdge>) with the tile edge for groups of m rows.
template <class Acc, class Fn>
void with_tile_edge(int64_t m, Fn&& fn) {
  if constexpr (sizeof(Acc) == 4) {
    if (m <= 4) return fn(std::integral_constant<int, 4>{});
  }
  fn(std::integral_constant<int, 2>{});
}

constexpr int kGradRows = 4;  // gradient rows per warp in pass 2 (no sums to hold, so always 4)

// How a launch divides the work. A team of team_warps warps owns one (group, chunk); each group's packs are
// cut into `chunks` ranges of chunk_packs (one range in the single-launch path).
struct MmdLayout {
  int team_warps;
  int64_t chunks, chunk_packs;
  bool vector_inputs, vector_grads;  // row starts are 16-byte aligned
  void* stats;                       // [G][chunks][kStatBlocks][M][M], accumulation type
  void* coef;                        // [G][kCoefBlocks][M][M]
};

template <class In>
MmdLayout plan(int64_t groups, int64_t features) {
  MmdLayout layout{};
  const int64_t packs = pack_count<In>(features);
  const int64_t warps_per_group =
      std::min(ceil_div(kTargetWarps, groups), std::max<int64_t>(1, features / kMinWarpFeatures));
  layout.chunks = 1;
  layout.team_warps = kWarps;
  if (warps_per_group <= kWarps) {
    while (layout.team_warps / 2 >= warps_per_group) layout.team_warps /= 2;  // a power of two dividing kWarps
  } else {
    layout.chunks = ceil_div(warps_per_group, kWarps);
  }
  layout.chunk_packs = ceil_div(packs, layout.chunks);
  layout.chunks = ceil_div(packs, layout.chunk_packs);
  return layout;
}

int64_t stats_elements(int64_t groups, int64_t m, const MmdLayout& layout) {
  return groups * layout.chunks * kStatBlocks * m * m;
}

// The part of the launch a team sees: its group's rows and the packs [first, end) of its chunk (32-bit
// pack indices: fewer registers in the hot loops; features < 2^31 is checked on the host).
template <class In>
struct GroupView {
  const In* t;  // row 0 of the group in y_t
  const In* r;
  int64_t stride_t, stride_r, features;
  int first, end, m;
};

template <class In>
__device__ GroupView<In> group_view(const MmdProblem& p, const MmdLayout& layout, int64_t g, int64_t chunk) {
  const int64_t first = chunk * layout.chunk_packs;
  return {static_cast<const In*>(p.y_t) + g * p.group_size * p.stride_t,
          static_cast<const In*>(p.y_r) + g * p.group_size * p.stride_r,
          p.stride_t,
          p.stride_r,
          p.features,
          int(first),
          int(min(first + layout.chunk_packs, pack_count<In>(p.features))),
          int(p.group_size)};
}

// This thread's place in its team (the team_warps consecutive warps that share a group).
struct Team {
  int warps, warp, first_warp, lane, thread, size;
};

__device__ Team team_of(int team_warps) {
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int in_team = warp % team_warps;
  return {team_warps, in_team, warp - in_team, lane, in_team * kWarpSize + lane, team_warps * kWarpSize};
}

template <class Acc, int kEdge>
using TileSums = Acc[kStatBlocks][kEdge][kEdge];

// Pass 1 over one tile of pairs: rows row0 + a and columns col0 + b (a, b < T; indices past M are clamped
// to M - 1 and their sums dropped later), packs first, first + step, ... below end.
// On the diagonal (row0 == col0) each unordered pair {a, b} is done once from four exact differences, which
// gives both orders; tt is then kept for a <= b, rr for a < b (rr = tt on a == b) and dt, dr for a != b
// (dt = dr = tr on a == b).
template <class In, class Acc, int T, bool kDiagonal>
__device__ void accumulate_tile(const GroupView<In>& v, int row0, int col0, int first, int step,
                                bool vector, TileSums<Acc, T>& s) {
  constexpr int n = Pack<In>::kSize;
  auto t_row = [&](int i) { return v.t + min(i, v.m - 1) * v.stride_t; };
  auto r_row = [&](int i) { return v.r + min(i, v.m - 1) * v.stride_r; };
  for (int pk = first; pk < v.end; pk += step) {
    Pack<In> xi[T], yi[T];
#pragma unroll
    for (int a = 0; a < T; ++a) {
      xi[a] = load_pack(t_row(row0 + a), pk, v.features, vector);
      yi[a] = load_pack(r_row(row0 + a), pk, v.features, vector);
    }
    if constexpr (kDiagonal) {
#pragma unroll
      for (int f = 0; f < n; ++f) {
        Acc x[T], y[T], dl[T];
#pragma unroll
        for (int a = 0; a < T; ++a) {
          x[a] = xi[a].template get<Acc>(f);
          y[a] = yi[a].template get<Acc>(f);
          dl[a] = x[a] - y[a];
        }
#pragma unroll
        for (int a = 0; a < T; ++a) {
          // The self-distances |t_a - t_a|, |r_a - r_a| are 0, computed all the same so that a non-finite
          // feature gives NaN as in the reference (one sum for both: such a row makes the whole group NaN).
          const Acc self = (x[a] - x[a]) + (y[a] - y[a]);
          s[kTT][a][a] += self * self;
          s[kTR][a][a] += dl[a] * dl[a];
#pragma unroll
          for (int b = a + 1; b < T; ++b) {
            const Acc vv = x[a] - x[b], w = y[a] - y[b];        // t_a - t_b, r_a - r_b
            const Acc u_ab = x[a] - y[b], u_ba = x[b] - y[a];  // t_a - r_b, t_b - r_a
            s[kTT][a][b] += vv * vv;
            s[kRR][a][b] += w * w;
            s[kTR][a][b] += u_ab * u_ab;
            s[kTR][b][a] += u_ba * u_ba;
            s[kDT][a][b] += dl[b] * (u_ab + vv);
            s[kDT][b][a] += dl[a] * (u_ba - vv);
            s[kDR][a][b] -= dl[b] * (w - u_ba);
            s[kDR][b][a] += dl[a] * (w + u_ab);
          }
        }
      }
    } else {
      // Off the diagonal the rows stream past the held column packs, one at a time (fewer live registers).
      Pack<In> xj[T], yj[T];
#pragma unroll
      for (int b = 0; b < T; ++b) {
        xj[b] = load_pack(t_row(col0 + b), pk, v.features, vector);
        yj[b] = load_pack(r_row(col0 + b), pk, v.features, vector);
      }
#pragma unroll
      for (int a = 0; a < T; ++a) {
#pragma unroll
        for (int f = 0; f < n; ++f) {
          const Acc x = xi[a].template get<Acc>(f), y = yi[a].template get<Acc>(f);
#pragma unroll
          for (int b = 0; b < T; ++b) {
            const Acc xc = xj[b].template get<Acc>(f), yc = yj[b].template get<Acc>(f);
            const Acc u = x - yc, vv = x - xc;  // t_i - r_j, t_i - t_j
            const Acc w = y - yc, z = y - xc;   // r_i - r_j, r_i - t_j
            const Acc dc = xc - yc;
            s[kTR][a][b] += u * u;
            s[kTT][a][b] += vv * vv;
            s[kRR][a][b] += w * w;
            s[kDT][a][b] += dc * (u + vv);
            s[kDR][a][b] -= dc * (w + z);
          }
        }
      }
    }
  }
}

// Whether sum (block, a, b) of a diagonal tile is a copy of another one (see accumulate_tile).
template <bool kDiagonal>
__device__ constexpr bool mirrored(int block, int a, int b) {
  return kDiagonal &&
         ((block == kTT && a > b) || (block == kRR && a >= b) || ((block == kDT || block == kDR) && a == b));
}

// Sums the tile over the warp's lanes into `slot` (shared memory), filling in the mirrored entries.
template <class Acc, int T, bool kDiagonal>
__device__ void reduce_tile_to(TileSums<Acc, T>& s, Acc* slot, int lane) {
#pragma unroll
  for (int block = 0; block < kStatBlocks; ++block)
#pragma unroll
    for (int a = 0; a < T; ++a)
#pragma unroll
      for (int b = 0; b < T; ++b) {
        if (mirrored<kDiagonal>(block, a, b)) continue;
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
          s[block][a][b] += __shfl_xor_sync(0xffffffffu, s[block][a][b], offset);
      }
  if (lane != 0) return;
#pragma unroll
  for (int block = 0; block < kStatBlocks; ++block)
#pragma unroll
    for (int a = 0; a < T; ++a)
#pragma unroll
      for (int b = 0; b < T; ++b) {
        Acc value = s[block][a][b];
        if (mirrored<kDiagonal>(block, a, b)) {
          if (block == kTT || block == kRR) value = a == b ? s[kTT][a][a] : s[block][b][a];
          else value = s[kTR][a][a];
        }
        slot[(block * T + a) * T + b] = value;
      }
}

template <class Acc>
struct StatSlots {
  Acc values[kWarps][kStatBlocks * kMaxEdge * kMaxEdge];
};

// Pass 1 of a team over its chunk: writes the chunk's kStatBlocks x M x M sums to `out`. Every thread of the
// block calls this with the same M and team size (it synchronizes the block); `active` is false for teams
// past the last group, which only take part in the barriers.
template <class In, class Acc, int T>
__device__ void pair_sums(const GroupView<In>& v, const Team& team, bool active, bool vector, Acc* out,
                          StatSlots<Acc>& slots) {
  constexpr int kValues = kStatBlocks * T * T;
  const int edge = (v.m + T - 1) / T;  // tiles per side of the M x M pairs
  const int tiles = edge * edge;
  const int slices = max(1, team.warps / tiles);       // warps that share one tile's features
  const int tiles_per_round = team.warps / slices;
  const int mm = v.m * v.m;
  for (int round_first = 0; round_first < tiles; round_first += tiles_per_round) {
    const int tile = round_first + team.warp / slices;
    const int slice = team.warp % slices;
    if (active && tile < tiles) {
      TileSums<Acc, T> s;
#pragma unroll
      for (int block = 0; block < kStatBlocks; ++block)
#pragma unroll
        for (int a = 0; a < T; ++a)
#pragma unroll
          for (int b = 0; b < T; ++b) s[block][a][b] = Acc(0);
      const int row0 = tile / edge * T, col0 = tile % edge * T;
      const int first = v.first + slice * kWarpSize + team.lane, step = slices * kWarpSize;
      Acc* slot = slots.values[team.first_warp + team.warp];
      if (T == kMaxEdge || row0 == col0) {  // with the largest edge a group is a single, diagonal tile
        accumulate_tile<In, Acc, T, true>(v, row0, col0, first, step, vector, s);
        reduce_tile_to<Acc, T, true>(s, slot, team.lane);
      } else if constexpr (T < kMaxEdge) {
        accumulate_tile<In, Acc, T, false>(v, row0, col0, first, step, vector, s);
        reduce_tile_to<Acc, T, false>(s, slot, team.lane);
      }
    }
    __syncthreads();
    // Add up the slices of each tile of this round, in a fixed order, into the M x M blocks.
    const int round_tiles = min(tiles_per_round, tiles - round_first);
    for (int k = team.thread; active && k < round_tiles * kValues; k += team.size) {
      const int local = k / kValues, value = k % kValues;
      const int tile = round_first + local;
      const int block = value / (T * T), a = value / T % T, b = value % T;
      const int i = tile / edge * T + a, j = tile % edge * T + b;
      if (i >= v.m || j >= v.m) continue;
      Acc sum = 0;
#pragma unroll 1  // at most kWarps terms; unrolling would hoist its trip count into a register held across pass 1
      for (int sl = 0; sl < slices; ++sl) sum += slots.values[team.first_warp + local * slices + sl][value];
      out[block * mm + i * v.m + j] = sum;
    }
    __syncthreads();  // the slots are reused by the next round; the sums are visible to the whole block
  }
}

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
__device__ Acc* group_stats(const MmdLayout& layout, int64_t g, int64_t m) {
  return static_cast<Acc*>(layout.stats) + g * layout.chunks * kStatBlocks * m * m;
}

template <class Acc>
__device__ Acc* group_coef(const MmdLayout& layout, int64_t g, int64_t m) {
  return static_cast<Acc*>(layout.coef) + g * kCoefBlocks * m * m;
}

// A team's group in the single-launch path. Teams past the last group work on group 0 without writing, only
// to take part in the block's barriers.
struct TeamGroup {
  Team team;
  int64_t g;
  bool active;
};

__device__ TeamGroup team_group(const MmdProblem& p, const MmdLayout& layout) {
  const Team team = team_of(layout.team_warps);
  const int64_t g = int64_t(blockIdx.x) * (kWarps / team.warps) + threadIdx.x / team.size;
  return {team, g < p.groups ? g : 0, g < p.groups};
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

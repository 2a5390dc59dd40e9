// Pass 1 of the grouped MMD on NVIDIA GPUs, shared by the GPU-verified kernels (mmd.cu) and those of the current
// contract (next/mmd.cu): per ordered pair (i, j) of a group, tt = |t_i - t_j|^2, rr = |r_i - r_j|^2,
// tr = |t_i - r_j|^2, dt = sum (t_j - r_j)((t_i - r_j) + (t_i - t_j)) and dr = -sum (t_j - r_j)((r_i - r_j) + (r_i - t_j))
// by direct differences. A warp owns a tile of kEdge x kEdge pairs (sums in registers) over a strided slice of the
// features, 16-byte packs at a time; a team of warps owns one (group, feature range) and reduces each tile once.
// Moved here unchanged from mmd.cu: tests/test_cuda_build.py checks that the verified kernels' machine code is too.
#pragma once
#include <algorithm>
#include <type_traits>

#include "cuda/device.cuh"

namespace imm::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMinBlocksPerSM = 3;  // at most 168 registers a thread (the 4 x 4 tile's sums and packs)
constexpr int64_t kTargetWarps = 4096;     // 2 to 3 waves at 12 warps per SM on an H100 (132 SMs)
constexpr int64_t kMinWarpFeatures = 512;  // a warp's share of a group's features: amortizes its reductions

// Workspace of one group: per feature chunk, kStatBlocks blocks of M x M pass-1 sums (pair (i, j) at i * M + j),
// and then the coefficients of the kernels' contract.
enum StatBlock : int { kTT = 0, kRR = 1, kTR = 2, kDT = 3, kDR = 4, kStatBlocks = 5 };

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

// How a launch divides the work. A team of team_warps warps owns one (group, chunk); each group's packs are
// cut into `chunks` ranges of chunk_packs (one range in the single-launch path).
struct MmdLayout {
  int team_warps;
  int64_t chunks, chunk_packs;
  bool vector_inputs, vector_grads;  // row starts are 16-byte aligned
  void* stats;                       // [G][chunks][kStatBlocks][M][M], accumulation type
  void* coef;                        // [G][coefficient blocks][M][M], in the layout of the kernels' contract
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

template <class In, class Problem>
__device__ GroupView<In> group_view(const Problem& p, const MmdLayout& layout, int64_t g, int64_t chunk) {
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

template <class Acc>
__device__ Acc* group_stats(const MmdLayout& layout, int64_t g, int64_t m) {
  return static_cast<Acc*>(layout.stats) + g * layout.chunks * kStatBlocks * m * m;
}

// A team's group in the single-launch path. Teams past the last group work on group 0 without writing, only
// to take part in the block's barriers.
struct TeamGroup {
  Team team;
  int64_t g;
  bool active;
};

template <class Problem>
__device__ TeamGroup team_group(const Problem& p, const MmdLayout& layout) {
  const Team team = team_of(layout.team_warps);
  const int64_t g = int64_t(blockIdx.x) * (kWarps / team.warps) + threadIdx.x / team.size;
  return {team, g < p.groups ? g : 0, g < p.groups};
}

}  // namespace
}  // namespace imm::cuda

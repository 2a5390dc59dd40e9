// Grouped MMD on the CPU: pass 1 accumulates the pair sums of mmd_math.h over feature tiles by direct
// differences, a small step turns them into the loss and the per-pair gradient coefficients, and pass 2
// writes grad_i = sum_j P_ij (Y_j - X_j) + Q_ij (X_i - Y_j). With enough groups a thread does all three for
// one group while its 2M rows are still in cache; with few groups the features are split across threads.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common/mmd_math.h"
#include "cpu/kernels.h"
#include "cpu/storage.h"

namespace imm::cpu {
namespace {

constexpr int64_t kTile = 256;               // features per tile: 3 x M rows of it stay in L1 or L2
constexpr int64_t kMinSplitFeatures = 4096;  // a thread's share of D is never smaller than this
constexpr int64_t kLanes = 16;               // partial sums per pair statistic: one AVX-512 register of floats

// Stats of one group over a feature range, 5 blocks of M*M, per ordered pair (i, j):
enum StatBlock : int64_t { kTT = 0, kRR = 1, kTR = 2, kDT = 3, kDR = 4, kStatBlocks = 5 };
// Coefficient blocks per group: P and Q of the y_t side, then of the y_r side.
enum CoefBlock : int64_t { kPT = 0, kQT = 1, kPR = 2, kQR = 3, kCoefBlocks = 4 };

// Loads features [d0, d0 + n) of the group's rows into x (y_t), y (y_r), zero padded to kTile, and dl = x - y.
template <class In, class Acc>
inline void load_tile(const MmdProblem& p, int64_t g, int64_t d0, int64_t n, Acc* x, Acc* y, Acc* dl) {
  const int64_t m = p.group_size;
  const In* yt = static_cast<const In*>(p.y_t);
  const In* yr = static_cast<const In*>(p.y_r);
  for (int64_t i = 0; i < m; ++i) {
    const In* rt = yt + (g * m + i) * p.stride_t + d0;
    const In* rr = yr + (g * m + i) * p.stride_r + d0;
    Acc* xi = x + i * kTile;
    Acc* yi = y + i * kTile;
    Acc* di = dl + i * kTile;
    for (int64_t c = 0; c < n; ++c) {
      xi[c] = load<Acc>(rt[c]);
      yi[c] = load<Acc>(rr[c]);
    }
    for (int64_t c = n; c < kTile; ++c) xi[c] = yi[c] = Acc(0);
#pragma omp simd
    for (int64_t c = 0; c < kTile; ++c) di[c] = xi[c] - yi[c];
  }
}

// Adds kLanes partial sums to their slots in `lanes`.
template <class Acc>
inline void add_lanes(Acc* lanes, int64_t slot, const Acc* sums) {
  Acc* out = lanes + slot * kLanes;
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) out[l] += sums[l];
}

template <class In, class Acc>
IMM_CPU_CLONES void accumulate_range(const MmdProblem& p, int64_t g, int64_t d_begin, int64_t d_end, Acc* tile,
                                     Acc* lanes, Acc* stats) {
  const int64_t m = p.group_size, mm = m * m;
  Acc* x = tile;
  Acc* y = tile + m * kTile;
  Acc* dl = tile + 2 * m * kTile;
  // Per-lane partial sums over the whole range (kept in registers within a tile): one horizontal reduction
  // per group instead of one per tile and pair.
  std::fill(lanes, lanes + kStatBlocks * mm * kLanes, Acc(0));
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kTile) {
    load_tile<In>(p, g, d0, std::min(kTile, d_end - d0), x, y, dl);
    for (int64_t i = 0; i < m; ++i) {
      const Acc* xi = x + i * kTile;
      const Acc* yi = y + i * kTile;
      const Acc* di = dl + i * kTile;
      // The pair (i, i): |t_i - r_i|^2 is also both of its deltas; the self-distances are 0, computed all the
      // same so that an infinite feature gives NaN as in the reference.
      Acc own[kLanes] = {}, self_t[kLanes] = {}, self_r[kLanes] = {};
      for (int64_t c0 = 0; c0 < kTile; c0 += kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t c = c0 + l;
          const Acc st = xi[c] - xi[c], sr = yi[c] - yi[c];
          own[l] += di[c] * di[c];
          self_t[l] += st * st;
          self_r[l] += sr * sr;
        }
      }
      for (const StatBlock b : {kTR, kDT, kDR}) add_lanes(lanes, b * mm + i * m + i, own);
      add_lanes(lanes, kTT * mm + i * m + i, self_t);
      add_lanes(lanes, kRR * mm + i * m + i, self_r);
      // Both orders of each pair i < j from the same four exact differences.
      for (int64_t j = i + 1; j < m; ++j) {
        const Acc* xj = x + j * kTile;
        const Acc* yj = y + j * kTile;
        const Acc* dj = dl + j * kTile;
        Acc tt[kLanes] = {}, rr[kLanes] = {}, tr_ij[kLanes] = {}, tr_ji[kLanes] = {};
        Acc dt_ij[kLanes] = {}, dt_ji[kLanes] = {}, dr_ij[kLanes] = {}, dr_ji[kLanes] = {};
        for (int64_t c0 = 0; c0 < kTile; c0 += kLanes) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const int64_t c = c0 + l;
            const Acc v = xi[c] - xj[c], w = yi[c] - yj[c];      // t_i - t_j, r_i - r_j
            const Acc u_ij = xi[c] - yj[c], u_ji = xj[c] - yi[c];  // t_i - r_j, t_j - r_i
            tt[l] += v * v;
            rr[l] += w * w;
            tr_ij[l] += u_ij * u_ij;
            tr_ji[l] += u_ji * u_ji;
            dt_ij[l] += dj[c] * (u_ij + v);
            dt_ji[l] += di[c] * (u_ji - v);
            dr_ij[l] -= dj[c] * (w - u_ji);
            dr_ji[l] += di[c] * (w + u_ij);
          }
        }
        const int64_t ij = i * m + j, ji = j * m + i;
        add_lanes(lanes, kTT * mm + ij, tt);
        add_lanes(lanes, kTT * mm + ji, tt);
        add_lanes(lanes, kRR * mm + ij, rr);
        add_lanes(lanes, kRR * mm + ji, rr);
        add_lanes(lanes, kTR * mm + ij, tr_ij);
        add_lanes(lanes, kTR * mm + ji, tr_ji);
        add_lanes(lanes, kDT * mm + ij, dt_ij);
        add_lanes(lanes, kDT * mm + ji, dt_ji);
        add_lanes(lanes, kDR * mm + ij, dr_ij);
        add_lanes(lanes, kDR * mm + ji, dr_ji);
      }
    }
  }
  for (int64_t k = 0; k < kStatBlocks * mm; ++k) {
    Acc total = 0;
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[k * kLanes + l];
    stats[k] = total;
  }
}

// Turns the group's stats (summed over `splits` consecutive blocks) into its loss and coefficients.
// In double: it is M^2 scalars per group, and the U statistic's loss is a difference of O(1) terms.
template <class Acc>
void finalize_group(const MmdProblem& p, int64_t g, int64_t splits, const Acc* stats, Acc* coef) {
  const int64_t m = p.group_size, mm = m * m;
  std::vector<double> sum(stats, stats + kStatBlocks * mm);
  for (int64_t s = 1; s < splits; ++s)
    for (int64_t k = 0; k < kStatBlocks * mm; ++k) sum[k] += stats[s * kStatBlocks * mm + k];
  const double weight = static_cast<const Acc*>(p.weight)[g];
  const double c = kernel_scale(p.kernel, double(static_cast<const Acc*>(p.bandwidth)[g]), p.features);
  const double cross_w = 1.0 / double(mm), grad_w = 2.0 * weight;
  double total = 0;
  for (int side = 0; side < 2; ++side) {
    const double* a2 = &sum[(side == 0 ? kTT : kRR) * mm];
    const double* delta = &sum[(side == 0 ? kDT : kDR) * mm];
    const double* tr = &sum[kTR * mm];
    Acc* pc = coef + (side == 0 ? kPT : kPR) * mm;
    Acc* qc = coef + (side == 0 ? kQT : kQR) * mm;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        const int64_t ij = i * m + j;
        const double b2 = side == 0 ? tr[ij] : tr[j * m + i];  // |t_i - r_j|^2, or |r_i - t_j|^2
        const PairCoefficients<double> r = pair_coefficients(p.kernel, self_weight<double>(p.estimator, m, i == j),
                                                             cross_w, grad_w, a2[ij], b2, delta[ij], c, p.eps);
        total += r.loss;
        pc[ij] = Acc(r.p);
        qc[ij] = Acc(r.q);
      }
    }
  }
  static_cast<Acc*>(p.loss)[g] = Acc(weight * total);
}

// grad of one side's row i: sum_j P_ij (other_j - own_j) + Q_ij (own_i - other_j); dl = y_t - y_r.
template <class Acc>
inline void side_gradient_row(int64_t m, int64_t i, const Acc* own, const Acc* other, const Acc* dl, Acc sign,
                              const Acc* pc, const Acc* qc, Acc* out) {
  const Acc* oi = own + i * kTile;
  std::fill(out, out + kTile, Acc(0));
  for (int64_t j = 0; j < m; ++j) {
    const Acc pj = sign * pc[i * m + j], qj = qc[i * m + j];
    const Acc* xj = other + j * kTile;
    const Acc* dj = dl + j * kTile;
#pragma omp simd
    for (int64_t c = 0; c < kTile; ++c) out[c] += qj * (oi[c] - xj[c]) - pj * dj[c];
  }
}

template <class In, class Acc>
IMM_CPU_CLONES void write_grad_range(const MmdProblem& p, int64_t g, int64_t d_begin, int64_t d_end, const Acc* coef,
                                     Acc* tile) {
  const int64_t m = p.group_size, mm = m * m, d = p.features;
  Acc* x = tile;
  Acc* y = tile + m * kTile;
  Acc* dl = tile + 2 * m * kTile;
  Acc* out = tile + 3 * m * kTile;
  In* grads[2] = {static_cast<In*>(p.grad_t), static_cast<In*>(p.grad_r)};
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kTile) {
    const int64_t n = std::min(kTile, d_end - d0);
    load_tile<In>(p, g, d0, n, x, y, dl);
    for (int side = 0; side < 2; ++side) {
      if (!grads[side]) continue;
      // y_t side: Y_j - X_j = -dl_j; y_r side: X_j - Y_j with X = y_r is +dl_j.
      const Acc* own = side == 0 ? x : y;
      const Acc* other = side == 0 ? y : x;
      const Acc sign = side == 0 ? Acc(1) : Acc(-1);
      const Acc* pc = coef + (side == 0 ? kPT : kPR) * mm;
      const Acc* qc = coef + (side == 0 ? kQT : kQR) * mm;
      for (int64_t i = 0; i < m; ++i) {
        side_gradient_row(m, i, own, other, dl, sign, pc, qc, out);
        In* row = grads[side] + (g * m + i) * d + d0;
        for (int64_t c = 0; c < n; ++c) row[c] = store<In>(out[c]);
      }
    }
  }
}

// How many threads share one group's features: enough to occupy the threads when groups are few.
int64_t feature_splits(int64_t groups, int64_t features, int threads) {
  if (groups >= threads) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(threads, groups), features / kMinSplitFeatures));
}

template <class In, class Acc>
void run(const MmdProblem& p, int threads) {
  const int64_t g_count = p.groups, m = p.group_size, mm = m * m, d = p.features;
  const bool want_grad = p.grad_t || p.grad_r;
  const int64_t span = ceil_div(ceil_div(d, feature_splits(g_count, d, threads)), kTile) * kTile;
  const int64_t splits = ceil_div(d, span);
  const int64_t stat_size = kStatBlocks * mm, coef_size = kCoefBlocks * mm, tile_size = (3 * m + 1) * kTile;
  const int64_t lanes_size = stat_size * kLanes;
  std::vector<Acc> stats(g_count * splits * stat_size), coef(g_count * coef_size);

  if (splits == 1) {  // one thread per group, all passes while its rows are in cache
#pragma omp parallel num_threads(threads)
    {
      std::vector<Acc> tile(tile_size), lanes(lanes_size);
#pragma omp for schedule(static)
      for (int64_t g = 0; g < g_count; ++g) {
        accumulate_range<In>(p, g, 0, d, tile.data(), lanes.data(), &stats[g * stat_size]);
        finalize_group(p, g, 1, &stats[g * stat_size], &coef[g * coef_size]);
        if (want_grad) write_grad_range<In>(p, g, 0, d, &coef[g * coef_size], tile.data());
      }
    }
    return;
  }
  const int64_t tasks = g_count * splits;
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc> tile(tile_size), lanes(lanes_size);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t g = k / splits, s = k % splits;
      accumulate_range<In>(p, g, s * span, std::min(d, (s + 1) * span), tile.data(), lanes.data(),
                           &stats[k * stat_size]);
    }
#pragma omp for schedule(static)
    for (int64_t g = 0; g < g_count; ++g)
      finalize_group(p, g, splits, &stats[g * splits * stat_size], &coef[g * coef_size]);
    if (want_grad) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < tasks; ++k) {
        const int64_t g = k / splits, s = k % splits;
        write_grad_range<In>(p, g, s * span, std::min(d, (s + 1) * span), &coef[g * coef_size], tile.data());
      }
    }
  }
}

}  // namespace

void mmd_fused(const MmdProblem& problem, int num_threads) {
  check(problem);
  const int threads = std::max(1, num_threads);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) { run<decltype(in), decltype(acc)>(problem, threads); });
}

}  // namespace imm::cpu

// Grouped MMD on the CPU (docs/math.md section 4, the pair math in common/mmd_math.h).
//
// Forward: pass 1 accumulates the five pair sums of mmd_math.h over feature tiles by direct differences, one
// block of pairs at a time; a finalize step in double turns a block's sums into its share of the group's loss
// and, when a gradient will be wanted, its gradient coefficients; the loss is then reduced (mean, sum, per group).
// Backward: pass 2 writes grad_X_i = go_g sum_j c_own (X_i - X_j) + c_cross (X_i - Y_j) + c_gap (X_j - Y_j) from
// those coefficients (two of the three per pair, mmd_math.h).
// With a loss-head mix (problems.h) both passes form each side's rows as skip * y + out * f where they load them,
// and pass 2's gradient is f's (go_g times out).
//
// Tasks are (group, pair block, feature split), so one huge group spreads over the threads as well as many
// small groups do, and a thread's scratch is O(kBlockRows^2) whatever M is. Sums that overflow float (inputs
// near 1e19 and beyond) are summed again in double for that block: finite inputs give the float64 answer.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/mmd_math.h"
#include "cpu/kernels.h"
#include "cpu/storage.h"

namespace imm::cpu {
namespace {

constexpr int64_t kTile = 256;               // features per tile: the tile's rows stay in L1 or L2
constexpr int64_t kLanes = 16;               // partial sums per pair statistic: one AVX-512 register of floats
constexpr int64_t kBlockRows = 16;           // rows of a pair block (a group of M <= 16 is one block)
constexpr int64_t kMinSplitFeatures = 4096;  // a thread's share of D is never smaller than this

// Pair sums of a block, per ordered local pair (a, b): |t_a - t_b|^2, |r_a - r_b|^2, |t_a - r_b|^2 and the
// deltas of both sides (mmd_math.h).
enum StatBlock : int64_t { kTT = 0, kRR = 1, kTR = 2, kDT = 3, kDR = 4, kStatBlocks = 5 };
// Coefficients of a group, [kCoefBlocks][M][M]: own, cross and gap (mmd_math.h) of the y_t side, then of the y_r side.
enum CoefBlock : int64_t { kOwn = 0, kCross = 1, kGap = 2, kSideBlocks = 3, kCoefBlocks = 6 };

// Rows I of a group on the diagonal (pairs I x I), or rows I then J off it (pairs I x J and J x I); local row a
// is group row first_i + a for a < size_i, else first_j + a - size_i.
struct PairBlock {
  int64_t first_i, size_i, first_j, size_j;
  bool diagonal;

  int64_t rows() const { return diagonal ? size_i : size_i + size_j; }
  int64_t global(int64_t a) const { return a < size_i ? first_i + a : first_j + (a - size_i); }
  bool owns(int64_t a, int64_t b) const { return diagonal || ((a < size_i) != (b < size_i)); }
};

// Features per tile: kTile, or all of a narrower D rounded up to whole lanes (tiny problems pay for no padding).
int64_t tile_width(int64_t features) { return std::min(kTile, ceil_div(features, kLanes) * kLanes); }

int64_t row_blocks(int64_t m) { return ceil_div(m, kBlockRows); }
int64_t pair_blocks(int64_t m) { return row_blocks(m) * (row_blocks(m) + 1) / 2; }

// Block pair `index` of the upper triangle of the row-block grid, row by row.
PairBlock pair_block(int64_t m, int64_t index) {
  const int64_t blocks = row_blocks(m);
  int64_t i = 0;
  while (index >= blocks - i) index -= blocks - i++;
  const int64_t j = i + index;
  auto size = [&](int64_t block) { return std::min(kBlockRows, m - block * kBlockRows); };
  return {i * kBlockRows, size(i), j * kBlockRows, size(j), i == j};
}

// The largest block's rows: the scratch size.
int64_t max_block_rows(int64_t m) { return m <= kBlockRows ? m : std::min(m, 2 * kBlockRows); }

// How many threads share one task's features: enough to occupy the threads when tasks are few.
int64_t feature_splits(int64_t tasks, int64_t features, int threads) {
  if (tasks >= threads) return 1;
  return std::max<int64_t>(1, std::min(ceil_div(threads, tasks), features / kMinSplitFeatures));
}

// One side's rows of a group as both passes read them: y itself, or with a loss-head mix (problems.h) the
// output skip * y + out * f, formed in registers.
template <class In, class Acc>
struct SideRows {
  const In* y;
  int64_t stride;
  const In* f;  // null: no mix
  int64_t stride_f;
  Acc skip, out;
};

// Side 0 (y_t) or 1 (y_r) of group g of a forward or backward problem.
template <class In, class Acc, class Problem>
SideRows<In, Acc> group_rows(const Problem& p, int64_t g, int side) {
  const int64_t first = g * p.group_size, stride = side == 0 ? p.stride_t : p.stride_r;
  SideRows<In, Acc> rows{static_cast<const In*>(side == 0 ? p.y_t : p.y_r) + first * stride, stride, nullptr, 0,
                         Acc(1), Acc(0)};
  if (p.mix.f_t) {
    rows.stride_f = side == 0 ? p.mix.stride_ft : p.mix.stride_fr;
    rows.f = static_cast<const In*>(side == 0 ? p.mix.f_t : p.mix.f_r) + first * rows.stride_f;
    rows.skip = Acc(p.mix.coefficients[4 * g + 2 * side]);
    rows.out = Acc(p.mix.coefficients[4 * g + 2 * side + 1]);
  }
  return rows;
}

// Features [d0, d0 + n) of `count` rows into dst (count x width), zero padded: rows first.. of src, or the
// block's rows.
template <class In, class Acc>
IMM_CPU_INLINE void load_rows(const SideRows<In, Acc>& src, int64_t first, int64_t count, int64_t d0, int64_t n,
                              int64_t width, Acc* dst, const PairBlock* block = nullptr) {
  for (int64_t a = 0; a < count; ++a) {
    const int64_t index = block ? block->global(a) : first + a;
    const In* row = src.y + index * src.stride + d0;
    Acc* out = dst + a * width;
    if (src.f) {
      const In* f = src.f + index * src.stride_f + d0;
      const Acc skip = src.skip, scale = src.out;  // locals: stores to out[] cannot change them (vectorizes)
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) out[c] = skip * load<Acc>(row[c]) + scale * load<Acc>(f[c]);
    } else {
      for (int64_t c = 0; c < n; ++c) out[c] = load<Acc>(row[c]);
    }
    for (int64_t c = n; c < width; ++c) out[c] = Acc(0);
  }
}

// Adds kLanes partial sums to their slots in `lanes`.
template <class Acc>
IMM_CPU_INLINE void add_lanes(Acc* lanes, int64_t slot, const Acc* sums) {
  Acc* out = lanes + slot * kLanes;
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) out[l] += sums[l];
}

// Pass 1 of one block over features [d_begin, d_end): stats[kStatBlocks][L][L] for the pairs it owns.
template <class In, class Acc>
IMM_CPU_CLONES void accumulate_block(const MmdForwardProblem& p, int64_t g, const PairBlock& block, int64_t d_begin,
                                     int64_t d_end, Acc* tile, Acc* lanes, Acc* stats) {
  const int64_t rows = block.rows(), ll = rows * rows, width = tile_width(p.features);
  Acc* x = tile;
  Acc* y = tile + rows * width;
  Acc* dl = tile + 2 * rows * width;
  const SideRows<In, Acc> yt = group_rows<In, Acc>(p, g, 0), yr = group_rows<In, Acc>(p, g, 1);
  // Per-lane partial sums over the whole range (kept in registers within a tile): one horizontal reduction per
  // pair instead of one per tile and pair.
  std::fill(lanes, lanes + kStatBlocks * ll * kLanes, Acc(0));
  for (int64_t d0 = d_begin; d0 < d_end; d0 += width) {
    const int64_t n = std::min(width, d_end - d0);
    load_rows(yt, 0, rows, d0, n, width, x, &block);
    load_rows(yr, 0, rows, d0, n, width, y, &block);
    for (int64_t c = 0; c < rows * width; ++c) dl[c] = x[c] - y[c];
    // |t_a - r_a|^2 of every row (for the gradient's form, mmd_math.h); on the diagonal the pair (a, a), whose
    // deltas it also is, and the self-distances, 0 but computed all the same so that an infinite feature gives
    // NaN as in the reference.
    for (int64_t a = 0; a < rows; ++a) {
      const Acc* xa = x + a * width;
      const Acc* ya = y + a * width;
      const Acc* da = dl + a * width;
      Acc own[kLanes] = {}, self_t[kLanes] = {}, self_r[kLanes] = {};
      for (int64_t c0 = 0; c0 < width; c0 += kLanes) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t c = c0 + l;
          const Acc st = xa[c] - xa[c], sr = ya[c] - ya[c];
          own[l] += da[c] * da[c];
          self_t[l] += st * st;
          self_r[l] += sr * sr;
        }
      }
      const int64_t aa = a * rows + a;
      add_lanes(lanes, kTR * ll + aa, own);
      if (block.diagonal) {
        add_lanes(lanes, kDT * ll + aa, own);
        add_lanes(lanes, kDR * ll + aa, own);
        add_lanes(lanes, kTT * ll + aa, self_t);
        add_lanes(lanes, kRR * ll + aa, self_r);
      }
    }
    for (int64_t a = 0; a < block.size_i; ++a) {
      const Acc* xa = x + a * width;
      const Acc* ya = y + a * width;
      const Acc* da = dl + a * width;
      // Both orders of each pair (a, b) from the same four exact differences.
      for (int64_t b = block.diagonal ? a + 1 : block.size_i; b < rows; ++b) {
        const Acc* xb = x + b * width;
        const Acc* yb = y + b * width;
        const Acc* db = dl + b * width;
        Acc tt[kLanes] = {}, rr[kLanes] = {}, tr_ab[kLanes] = {}, tr_ba[kLanes] = {};
        Acc dt_ab[kLanes] = {}, dt_ba[kLanes] = {}, dr_ab[kLanes] = {}, dr_ba[kLanes] = {};
        for (int64_t c0 = 0; c0 < width; c0 += kLanes) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const int64_t c = c0 + l;
            const Acc v = xa[c] - xb[c], w = ya[c] - yb[c];        // t_a - t_b, r_a - r_b
            const Acc u_ab = xa[c] - yb[c], u_ba = xb[c] - ya[c];  // t_a - r_b, t_b - r_a
            tt[l] += v * v;
            rr[l] += w * w;
            tr_ab[l] += u_ab * u_ab;
            tr_ba[l] += u_ba * u_ba;
            dt_ab[l] += db[c] * (u_ab + v);
            dt_ba[l] += da[c] * (u_ba - v);
            dr_ab[l] -= db[c] * (w - u_ba);
            dr_ba[l] += da[c] * (w + u_ab);
          }
        }
        const int64_t ab = a * rows + b, ba = b * rows + a;
        add_lanes(lanes, kTT * ll + ab, tt);
        add_lanes(lanes, kTT * ll + ba, tt);
        add_lanes(lanes, kRR * ll + ab, rr);
        add_lanes(lanes, kRR * ll + ba, rr);
        add_lanes(lanes, kTR * ll + ab, tr_ab);
        add_lanes(lanes, kTR * ll + ba, tr_ba);
        add_lanes(lanes, kDT * ll + ab, dt_ab);
        add_lanes(lanes, kDT * ll + ba, dt_ba);
        add_lanes(lanes, kDR * ll + ab, dr_ab);
        add_lanes(lanes, kDR * ll + ba, dr_ba);
      }
    }
  }
  for (int64_t k = 0; k < kStatBlocks * ll; ++k) {
    Acc total = 0;
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[k * kLanes + l];
    stats[k] = total;
  }
}

// One thread's scratch, carved from one allocation made before the parallel region: pass 1 sizes its tiles and
// lanes for double (the overflow fallback reuses them); pass 2 sizes its tiles for Acc.
class Scratch {
 public:
  Scratch(int threads, int64_t bytes_per_thread)
      : bytes_(round_up(bytes_per_thread)), storage_(new unsigned char[size_t(threads) * size_t(bytes_)]) {}

  // A typed array of `count` elements at `offset` bytes into thread `thread`'s part.
  template <class T>
  T* at(int thread, int64_t offset) {
    return reinterpret_cast<T*>(storage_.get() + int64_t(thread) * bytes_ + offset);
  }

  static int64_t round_up(int64_t bytes) { return (bytes + 63) / 64 * 64; }

 private:
  int64_t bytes_;
  std::unique_ptr<unsigned char[]> storage_;  // not zeroed: every use writes before it reads
};

// Pass 1's per-thread arrays: tile rows and lanes (sized for double), the block's sums in Acc and in double.
struct Pass1Arrays {
  int64_t tile, lanes, narrow, stats, bytes;  // byte offsets, total

  Pass1Arrays(int64_t m, int64_t features) {
    const int64_t rows = max_block_rows(m), sums = kStatBlocks * rows * rows;
    tile = 0;
    lanes = Scratch::round_up(3 * rows * tile_width(features) * 8);
    narrow = lanes + Scratch::round_up(sums * kLanes * 8);
    stats = narrow + Scratch::round_up(sums * 8);
    bytes = stats + sums * 8;
  }
};

bool all_finite(const double* values, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (!std::isfinite(values[k])) return false;
  return true;
}

// The block's sums over [d_begin, d_end) in double: accumulated in Acc, and again in double where that overflowed
// (or where the inputs are not finite: double then gives the same NaN or inf).
template <class In, class Acc>
const double* block_sums(const MmdForwardProblem& p, int64_t g, const PairBlock& block, int64_t d_begin,
                         int64_t d_end, Scratch& scratch, const Pass1Arrays& arrays, int thread) {
  const int64_t n = kStatBlocks * block.rows() * block.rows();
  double* stats = scratch.at<double>(thread, arrays.stats);
  auto in_double = [&] {
    accumulate_block<In, double>(p, g, block, d_begin, d_end, scratch.at<double>(thread, arrays.tile),
                                 scratch.at<double>(thread, arrays.lanes), stats);
  };
  if constexpr (std::is_same_v<Acc, double>) {
    in_double();
  } else {
    const Acc* narrow = scratch.at<Acc>(thread, arrays.narrow);
    accumulate_block<In, Acc>(p, g, block, d_begin, d_end, scratch.at<Acc>(thread, arrays.tile),
                              scratch.at<Acc>(thread, arrays.lanes), scratch.at<Acc>(thread, arrays.narrow));
    std::copy(narrow, narrow + n, stats);
    if (!all_finite(stats, n)) in_double();
  }
  return stats;
}

// The weight of group g's loss in the output, and the factor of its gradient (2 w, and 1/G for the mean).
struct GroupWeights {
  double loss, grad;
};

GroupWeights group_weights(const MmdForwardProblem& p, int64_t g) {
  const double w = p.weight.at(g);
  return {w, 2.0 * w / (p.reduction == Reduction::mean ? double(p.groups) : 1.0)};
}

// The loss share (before the group weight) of the pairs a block owns, from its sums in double; with kGradient
// also their coefficients, into the group's [kCoefBlocks][M][M]. In double: M^2 scalars per group, and the U
// statistic's loss is a difference of O(1) terms.
template <bool kGradient, class Acc>
double finalize_block(const MmdForwardProblem& p, int64_t g, const PairBlock& block, const double* stats, Acc* coef) {
  const int64_t m = p.group_size, mm = m * m, rows = block.rows(), ll = rows * rows;
  const double c = kernel_scale(p.kernel, p.bandwidth.at(g), p.features);
  const double grad_w = group_weights(p, g).grad;
  double total = 0;
  for (int64_t a = 0; a < rows; ++a) {
    for (int64_t b = 0; b < rows; ++b) {
      if (!block.owns(a, b)) continue;
      const int64_t i = block.global(a), j = block.global(b), ab = a * rows + b, ij = i * m + j;
      const double e2 = stats[kTR * ll + b * rows + b];  // |t_b - r_b|^2
      for (int side = 0; side < 2; ++side) {  // 0: X = y_t, Y = y_r; 1: X = y_r, Y = y_t
        const double a2 = stats[(side == 0 ? kTT : kRR) * ll + ab];
        const double b2 = stats[kTR * ll + (side == 0 ? ab : b * rows + a)];  // |t_a - r_b|^2, or |r_a - t_b|^2
        const double delta = stats[(side == 0 ? kDT : kDR) * ll + ab];
        const PairCoefficients<double> r = pair_coefficients<double, kGradient>(
            p.kernel, self_weight<double>(p.estimator, m, i == j), cross_weight<double>(p.estimator, m, i == j),
            grad_w, a2, b2, delta, e2, c, p.eps, i == j);
        total += r.loss;
        if constexpr (kGradient) {
          Acc* side_coef = coef + side * kSideBlocks * mm + ij;
          side_coef[kOwn * mm] = Acc(r.own);
          side_coef[kCross * mm] = Acc(r.cross);
          side_coef[kGap * mm] = Acc(r.gap);
        }
      }
    }
  }
  return total;
}

// finalize_block for the group g of the problem: with the coefficients where they are wanted.
template <class Acc>
double finalize(const MmdForwardProblem& p, int64_t g, const PairBlock& block, const double* stats) {
  if (!p.coefficients) return finalize_block<false, Acc>(p, g, block, stats, nullptr);
  return finalize_block<true>(p, g, block, stats, static_cast<Acc*>(p.coefficients) + g * kCoefBlocks * p.group_size *
                                                                                        p.group_size);
}

void check_bandwidths(const MmdForwardProblem& p) {
  if (!p.check_values) return;
  for (int64_t g = 0; g < p.groups; ++g) {
    const double bandwidth = p.bandwidth.at(g);
    if (!(bandwidth > 0))
      fail("bandwidth must be > 0 for every group; got " + std::to_string(bandwidth) + " for group " + std::to_string(g));
  }
}

template <class In, class Acc>
void forward(const MmdForwardProblem& p, int threads) {
  check_bandwidths(p);
  const int64_t m = p.group_size, d = p.features, blocks = pair_blocks(m), units = p.groups * blocks;
  const int64_t splits = feature_splits(units, d, threads);
  const int64_t span = ceil_div(ceil_div(d, splits), kTile) * kTile, parts = ceil_div(d, span);
  const int64_t sums = kStatBlocks * max_block_rows(m) * max_block_rows(m);
  const Pass1Arrays arrays(m, d);
  Scratch scratch(threads, arrays.bytes);
  std::vector<double> shares(units);          // each block's loss share
  std::vector<Acc> partial(parts > 1 ? units * parts * sums : 0);  // per feature part, when D is split

  parallel(threads, [&](int thread) {
    if (parts == 1) {  // a thread per block: sums, then the finalize while they are at hand
#pragma omp for schedule(dynamic)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t g = u / blocks;
        const PairBlock block = pair_block(m, u % blocks);
        const double* stats = block_sums<In, Acc>(p, g, block, 0, d, scratch, arrays, thread);
        shares[u] = finalize<Acc>(p, g, block, stats);
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < units * parts; ++k) {
        const int64_t u = k / parts, part = k % parts;
        const PairBlock block = pair_block(m, u % blocks);
        const int64_t n = kStatBlocks * block.rows() * block.rows();
        const double* stats = block_sums<In, Acc>(p, u / blocks, block, part * span, std::min(d, (part + 1) * span),
                                                  scratch, arrays, thread);
        std::copy(stats, stats + n, partial.begin() + k * sums);
      }
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t g = u / blocks;
        const PairBlock block = pair_block(m, u % blocks);
        const int64_t n = kStatBlocks * block.rows() * block.rows();
        double* summed = scratch.at<double>(thread, arrays.stats);
        std::fill(summed, summed + n, 0.0);
        for (int64_t part = 0; part < parts; ++part)
          for (int64_t k = 0; k < n; ++k) summed[k] += double(partial[(u * parts + part) * sums + k]);
        // An overflow in one part: all of D again in double (over the same scratch).
        const double* stats = all_finite(summed, n) ? summed
                                                    : block_sums<In, double>(p, g, block, 0, d, scratch, arrays, thread);
        shares[u] = finalize<Acc>(p, g, block, stats);
      }
    }
  });
  double total = 0;
  In* out = static_cast<In*>(p.out);
  for (int64_t g = 0; g < p.groups; ++g) {
    double share = 0;
    for (int64_t b = 0; b < blocks; ++b) share += shares[g * blocks + b];
    const double loss = group_weights(p, g).loss * share;
    if (p.reduction == Reduction::none) out[g] = store<In>(Acc(loss));
    total += loss;
  }
  if (p.reduction == Reduction::mean) out[0] = store<In>(Acc(total / double(p.groups)));
  if (p.reduction == Reduction::sum) out[0] = store<In>(Acc(total));
}

// Pass 2 for rows [first, first + count) of group g over features [d_begin, d_end): the gradient rows of both
// wanted sides, each from every row block of the group in turn.
template <class In, class Acc>
IMM_CPU_CLONES void gradient_rows(const MmdBackwardProblem& p, int64_t g, int64_t first, int64_t count,
                                  int64_t d_begin, int64_t d_end, Acc* tile) {
  const int64_t m = p.group_size, mm = m * m, rows = std::min(m, kBlockRows), width = tile_width(p.features);
  const SideRows<In, Acc> sides[2] = {group_rows<In, Acc>(p, g, 0), group_rows<In, Acc>(p, g, 1)};
  const Acc* coef = static_cast<const Acc*>(p.coefficients) + g * kCoefBlocks * mm;
  // The output's gradient, and with a mix the out factor of each side's output (the gradient is f's).
  const Acc scale = load<Acc>(static_cast<const In*>(p.grad_output)[g * p.grad_output_stride]);
  const Acc scales[2] = {sides[0].f ? scale * sides[0].out : scale, sides[1].f ? scale * sides[1].out : scale};
  In* grads[2] = {static_cast<In*>(p.grad_t), static_cast<In*>(p.grad_r)};
  Acc* own[2] = {tile, tile + rows * width};  // X_i of each side
  Acc* out[2] = {tile + 2 * rows * width, tile + 3 * rows * width};
  Acc* xj = tile + 4 * rows * width;  // t_j, r_j, t_j - r_j of one row block
  Acc* yj = xj + rows * width;
  Acc* dj = yj + rows * width;
  for (int64_t d0 = d_begin; d0 < d_end; d0 += width) {
    const int64_t n = std::min(width, d_end - d0);
    load_rows(sides[0], first, count, d0, n, width, own[0]);
    load_rows(sides[1], first, count, d0, n, width, own[1]);
    std::fill(out[0], out[0] + 2 * rows * width, Acc(0));
    for (int64_t j0 = 0; j0 < m; j0 += rows) {
      const int64_t size = std::min(rows, m - j0);
      // Partner rows t_j, r_j: the tile's own rows on the diagonal block (a group of M <= kBlockRows has only
      // that one), else loaded.
      const Acc* tj = own[0];
      const Acc* rj = own[1];
      if (j0 != first) {
        load_rows(sides[0], j0, size, d0, n, width, xj);
        load_rows(sides[1], j0, size, d0, n, width, yj);
        tj = xj;
        rj = yj;
      }
      for (int64_t c = 0; c < size * width; ++c) dj[c] = tj[c] - rj[c];
      for (int side = 0; side < 2; ++side) {
        if (!grads[side]) continue;
        // y_t side: X = t, Y = r, X_j - Y_j = t_j - r_j; y_r side: X = r, Y = t, X_j - Y_j = r_j - t_j.
        const Acc* xs = side == 0 ? tj : rj;
        const Acc* ys = side == 0 ? rj : tj;
        const Acc sign = side == 0 ? Acc(1) : Acc(-1), go = scales[side];
        const Acc* side_coef = coef + side * kSideBlocks * mm;
        for (int64_t a = 0; a < count; ++a) {
          const Acc* xi = own[side] + a * width;
          Acc* o = out[side] + a * width;
          for (int64_t b = 0; b < size; ++b) {
            const int64_t ij = (first + a) * m + j0 + b;
            const Acc c_own = go * side_coef[kOwn * mm + ij], c_cross = go * side_coef[kCross * mm + ij];
            const Acc* xb = xs + b * width;
            if (c_cross != Acc(0)) {  // the textbook form (mmd_math.h)
              const Acc* yb = ys + b * width;
#pragma omp simd
              for (int64_t c = 0; c < width; ++c) o[c] += c_own * (xi[c] - xb[c]) + c_cross * (xi[c] - yb[c]);
            } else {  // the near-duplicate form
              const Acc c_gap = sign * go * side_coef[kGap * mm + ij];
              const Acc* db = dj + b * width;
#pragma omp simd
              for (int64_t c = 0; c < width; ++c) o[c] += c_own * (xi[c] - xb[c]) + c_gap * db[c];
            }
          }
        }
      }
    }
    for (int side = 0; side < 2; ++side) {
      if (!grads[side]) continue;
      for (int64_t a = 0; a < count; ++a) {
        In* row = grads[side] + (g * m + first + a) * p.features + d0;
        const Acc* o = out[side] + a * width;
        for (int64_t c = 0; c < n; ++c) row[c] = store<In>(o[c]);
      }
    }
  }
}

template <class In, class Acc>
void backward(const MmdBackwardProblem& p, int threads) {
  const int64_t m = p.group_size, d = p.features, blocks = row_blocks(m), units = p.groups * blocks;
  const int64_t splits = feature_splits(units, d, threads);
  const int64_t span = ceil_div(ceil_div(d, splits), kTile) * kTile, parts = ceil_div(d, span);
  const int64_t rows = std::min(m, kBlockRows);
  Scratch scratch(threads, 7 * rows * tile_width(d) * int64_t(sizeof(Acc)));
  parallel(threads, [&](int thread) {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < units * parts; ++k) {
      const int64_t u = k / parts, part = k % parts, first = u % blocks * kBlockRows;
      gradient_rows<In, Acc>(p, u / blocks, first, std::min(kBlockRows, m - first), part * span,
                             std::min(d, (part + 1) * span), scratch.at<Acc>(thread, 0));
    }
  });
}

}  // namespace

void mmd_forward(const MmdForwardProblem& problem, int num_threads) {
  check(problem);
  const int threads = std::max(1, num_threads);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) { forward<decltype(in), decltype(acc)>(problem, threads); });
}

void mmd_backward(const MmdBackwardProblem& problem, int num_threads) {
  check(problem);
  const int threads = std::max(1, num_threads);
  dispatch_dtype(problem.dtype, [&](auto in, auto acc) { backward<decltype(in), decltype(acc)>(problem, threads); });
}

}  // namespace imm::cpu

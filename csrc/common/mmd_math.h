// Per-pair math of the grouped MMD, shared by every native backend (docs/math.md section 4).
//
// For one side X of a group (X = y_t with partner Y = y_r, or the reverse) and rows i, j:
//   a = |X_i - X_j|,  b = |X_i - Y_j|,  e_j = |X_j - Y_j|,  delta = b^2 - a^2 = sum_d (X_j - Y_j)(2 X_i - X_j - Y_j)
// delta is accumulated from the differences themselves, so when y_r ~ y_t the small quantities
// phi(a) - phi(b) and psi(a) - psi(b) come out to full relative precision instead of as the
// difference of two nearly equal kernel values.
//
// Per group, with self weights s_ij (V: 1/M^2; U: 0 on i = j, else 1/(M(M-1))) and cross weight x = 1/M^2:
//   loss = sum_sides sum_ij [ x (phi(a) - phi(b)) + (s_ij - x) phi(a) ]
//   grad_{X_i} = sum_j 2 w [ s_ij psi(a) (X_i - X_j) - x psi(b) (X_i - Y_j) ],   psi(d) = phi'(d) / d
// the textbook gradient of sum_ij s k(X_i, X_j) - 2 x k(X_i, Y_j). Per pair it is evaluated in one of two
// forms, c_own (X_i - X_j) + c_cross (X_i - Y_j) + c_gap (X_j - Y_j), with two of the three coefficients set:
// - near duplicates (e_j < a / 2): c_own = 2 w (x (psi(a) - psi(b)) + (s - x) psi(a)), c_gap = -2 w x psi(b).
//   The textbook terms nearly cancel; these two are small by themselves and nothing cancels.
// - otherwise (also on the diagonal, and for a far-away X_j or Y_j): the textbook form, c_own = 2 w s psi(a)
//   (0 for i = j: psi(0) of the RBF kernel is -2c, as large as the bandwidth), c_cross = -2 w x psi(b). A far
//   point's psi vanishes and multiplies only its own large difference; the other form would add two huge
//   terms that cancel.
#pragma once
#include "platform.h"

namespace imm {

template <class T>
struct PairTerms {
  T phi_a, dphi, psi_a, dpsi, psi_b;  // phi(a), phi(a) - phi(b), psi(a), psi(a) - psi(b), psi(b)
};

// exp(-xa) - exp(-xb), given gap = xb - xa accurately: expm1 where the two are close (the difference would
// cancel), the plain difference elsewhere (where expm1 could overflow against an underflowed exp).
template <class T>
IMM_HD T exp_difference(T xa, T xb, T gap) {
  return (gap < T(0.5) && gap > T(-0.5)) ? -exp_(-xa) * expm1_(-gap) : exp_(-xa) - exp_(-xb);
}

// The terms of one pair; without kGradient only phi(a) and phi(a) - phi(b) (the loss), at fewer exp calls.
template <class T, bool kGradient = true>
IMM_HD PairTerms<T> pair_terms(Kernel kernel, T a2, T b2, T delta, T c, T eps) {
  PairTerms<T> r{};
  if (kernel == Kernel::rbf) {  // phi = exp(-c d^2)
    r.phi_a = exp_(-c * a2);
    r.dphi = exp_difference(c * a2, c * b2, c * delta);
    if constexpr (kGradient) {
      r.psi_a = T(-2) * c * r.phi_a;
      r.dpsi = T(-2) * c * r.dphi;
      r.psi_b = T(-2) * c * exp_(-c * b2);
    }
    return r;
  }
  const T a = sqrt_(a2), b = sqrt_(b2);
  const T sum = a + b;
  const T b_minus_a = sum > T(0) ? delta / sum : T(0);
  if (kernel == Kernel::laplace) {  // phi = exp(-c max(d, eps)); psi = -c exp(-c d) / d above the floor, else 0
    const T ac = a < eps ? eps : a, bc = b < eps ? eps : b;
    const bool both_live = !(a <= eps) && !(b <= eps);
    const T gap = both_live ? b_minus_a : bc - ac;
    const T cgap = c * gap;
    const bool near = cgap < T(0.5) && cgap > T(-0.5);  // exp_difference's choice, with exp(-c ac) at hand
    const T ea = exp_(-c * ac);
    const T em = near ? expm1_(-cgap) : T(0);
    const T eb = (kGradient || !near) ? exp_(-c * bc) : T(0);
    r.phi_a = ea;
    r.dphi = near ? -ea * em : ea - eb;
    if constexpr (kGradient) {
      r.psi_a = a <= eps ? T(0) : -c * ea / a;  // zero at or below the floor; NaN stays NaN
      r.psi_b = b <= eps ? T(0) : -c * eb / b;
      // Close distances: psi(a) - psi(b) = psi(a) (1 - e^{-c gap} a / b), expanded so nothing cancels.
      const bool close = both_live && near;
      r.dpsi = close ? r.psi_a * (-em + (gap / b) * (em + T(1))) : r.psi_a - r.psi_b;
    }
    return r;
  }
  // energy: phi = -d
  r.phi_a = -a;
  r.dphi = b_minus_a;
  if constexpr (kGradient) {
    const bool both_live = !(a <= T(0)) && !(b <= T(0));
    r.psi_a = a <= T(0) ? T(0) : T(-1) / a;
    r.psi_b = b <= T(0) ? T(0) : T(-1) / b;
    r.dpsi = both_live ? -b_minus_a / (a * b) : r.psi_a - r.psi_b;
  }
  return r;
}

template <class T>
struct PairCoefficients {
  T loss, own, cross, gap;  // gradient coefficients of X_i - X_j, X_i - Y_j and X_j - Y_j
};

// Weight of the self term k(X_i, X_j) for one ordered pair: u and unpaired leave out i = j.
template <class T>
IMM_HD T self_weight(Estimator est, int64_t m, bool diagonal) {
  if (est == Estimator::v) return T(1) / T(m * m);
  return diagonal ? T(0) : T(1) / T(m * (m - 1));
}

// Weight of the cross term k(X_i, Y_j) for one ordered pair: unpaired also leaves out the partners i = j (made
// from one (x, eps) in IMM, so dependent), which keeps the estimate unbiased.
template <class T>
IMM_HD T cross_weight(Estimator est, int64_t m, bool diagonal) {
  return est == Estimator::unpaired ? self_weight<T>(est, m, diagonal) : T(1) / T(m * m);
}

// Loss contribution and (with kGradient) gradient coefficients of one ordered pair (i, j) of one side.
// c: the kernel's scale (bandwidth / D); grad_w: 2 * group weight (and 1/G for a mean); e2 = |X_j - Y_j|^2.
template <class T, bool kGradient = true>
IMM_HD PairCoefficients<T> pair_coefficients(Kernel kernel, T self_w, T cross_w, T grad_w, T a2, T b2, T delta,
                                             T e2, T c, T eps, bool diagonal) {
  const PairTerms<T> t = pair_terms<T, kGradient>(kernel, a2, b2, delta, c, eps);
  PairCoefficients<T> r{};
  r.loss = cross_w * t.dphi + (self_w - cross_w) * t.phi_a;
  if constexpr (kGradient) {
    if (!diagonal && T(4) * e2 < a2) {  // near duplicates
      r.own = grad_w * (cross_w * t.dpsi + (self_w - cross_w) * t.psi_a);
      r.gap = -grad_w * cross_w * t.psi_b;
    } else {
      r.own = diagonal ? T(0) : grad_w * self_w * t.psi_a;
      r.cross = -grad_w * cross_w * t.psi_b;
    }
  }
  return r;
}

// The kernel's scale: bandwidth / D for laplace and rbf; the energy kernel has none.
template <class T>
IMM_HD T kernel_scale(Kernel kernel, T bandwidth, int64_t d) {
  return kernel == Kernel::energy ? T(1) : bandwidth / T(d);
}

}  // namespace imm

// Per-pair math of the grouped MMD, shared by every native backend.
//
// For one side X of a group (X = y_t with partner Y = y_r, or the reverse) and rows i, j:
//   a = |X_i - X_j|,  b = |X_i - Y_j|,  delta = b^2 - a^2 = sum_d (X_j - Y_j)(2 X_i - X_j - Y_j)
// delta is accumulated from the differences themselves, so when y_r ~ y_t the small quantities
// phi(a) - phi(b) and psi(a) - psi(b) come out to full relative precision instead of as the
// difference of two nearly equal kernel values.
//
// Per group, with self weights s_ij (V: 1/M^2; U: 0 on i = j, else 1/(M(M-1))) and cross weight x = 1/M^2:
//   loss = sum_sides sum_ij [ x (phi(a) - phi(b)) + (s_ij - x) phi(a) ]
//   grad_{X_i} = sum_j [ P_ij (Y_j - X_j) + Q_ij (X_i - Y_j) ]
//   P_ij = 2 w s_ij psi(a),  Q_ij = 2 w (x (psi(a) - psi(b)) + (s_ij - x) psi(a)),  psi(d) = phi'(d) / d
// which expands to the textbook sum_ij s k(X_i, X_j) - 2 x k(X_i, Y_j) terms and their gradients.
#pragma once
#include "platform.h"

namespace imm {

template <class T>
struct PairTerms {
  T phi_a, dphi, psi_a, dpsi;  // phi(a), phi(a) - phi(b), psi(a), psi(a) - psi(b)
};

// psi(d) = phi'(d)/d, zero where the kernel is flat or the direction undefined (d at or below the floor).
// Written so that NaN distances stay NaN.
template <class T>
IMM_HD T laplace_psi(T d, T c, T eps) {
  return d <= eps ? T(0) : -c * exp_(-c * d) / d;
}

// exp(-xa) - exp(-xb), given gap = xb - xa accurately: expm1 where the two are close (the difference would
// cancel), the plain difference elsewhere (where expm1 could overflow against an underflowed exp).
template <class T>
IMM_HD T exp_difference(T xa, T xb, T gap) {
  return (gap < T(0.5) && gap > T(-0.5)) ? -exp_(-xa) * expm1_(-gap) : exp_(-xa) - exp_(-xb);
}

template <class T>
IMM_HD PairTerms<T> pair_terms(Kernel kernel, T a2, T b2, T delta, T c, T eps) {
  PairTerms<T> r;
  if (kernel == Kernel::rbf) {  // phi = exp(-c d^2)
    r.phi_a = exp_(-c * a2);
    r.dphi = exp_difference(c * a2, c * b2, c * delta);
    r.psi_a = T(-2) * c * r.phi_a;
    r.dpsi = T(-2) * c * r.dphi;
    return r;
  }
  const T a = sqrt_(a2), b = sqrt_(b2);
  const T sum = a + b;
  const T b_minus_a = sum > T(0) ? delta / sum : T(0);
  if (kernel == Kernel::laplace) {  // phi = exp(-c max(d, eps))
    const T ac = a < eps ? eps : a, bc = b < eps ? eps : b;
    const bool both_live = !(a <= eps) && !(b <= eps);
    const T gap = both_live ? b_minus_a : bc - ac;
    const T cgap = c * gap;
    r.phi_a = exp_(-c * ac);
    r.dphi = exp_difference(c * ac, c * bc, cgap);
    r.psi_a = laplace_psi(a, c, eps);
    // Close distances: psi(a) - psi(b) = psi(a) (1 - e^{-c gap} a / b), expanded so nothing cancels.
    const bool close = both_live && cgap < T(0.5) && cgap > T(-0.5);
    r.dpsi = close ? r.psi_a * (-expm1_(-cgap) + (gap / b) * exp_(-cgap)) : r.psi_a - laplace_psi(b, c, eps);
    return r;
  }
  // energy: phi = -d
  const bool both_live = !(a <= T(0)) && !(b <= T(0));
  r.phi_a = -a;
  r.dphi = b_minus_a;
  r.psi_a = a <= T(0) ? T(0) : T(-1) / a;
  const T psi_b = b <= T(0) ? T(0) : T(-1) / b;
  r.dpsi = both_live ? -b_minus_a / (a * b) : r.psi_a - psi_b;
  return r;
}

template <class T>
struct PairCoefficients {
  T loss, p, q;
};

// Weight of the self term k(X_i, X_j) for one ordered pair.
template <class T>
IMM_HD T self_weight(Estimator est, int64_t m, bool diagonal) {
  if (est == Estimator::v) return T(1) / T(m * m);
  return diagonal ? T(0) : T(1) / T(m * (m - 1));
}

// Loss contribution and gradient coefficients of one ordered pair (i, j) of one side.
// c: the kernel's scale (bandwidth / D); grad_w: 2 * group weight.
template <class T>
IMM_HD PairCoefficients<T> pair_coefficients(Kernel kernel, T self_w, T cross_w, T grad_w, T a2, T b2, T delta,
                                             T c, T eps) {
  const PairTerms<T> t = pair_terms(kernel, a2, b2, delta, c, eps);
  PairCoefficients<T> r;
  r.loss = cross_w * t.dphi + (self_w - cross_w) * t.phi_a;
  r.p = grad_w * self_w * t.psi_a;
  r.q = grad_w * (cross_w * t.dpsi + (self_w - cross_w) * t.psi_a);
  return r;
}

// The kernel's scale: bandwidth / D for laplace and rbf; the energy kernel has none.
template <class T>
IMM_HD T kernel_scale(Kernel kernel, T bandwidth, int64_t d) {
  return kernel == Kernel::energy ? T(1) : bandwidth / T(d);
}

}  // namespace imm

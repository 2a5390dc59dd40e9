// Schedule coefficients of the interpolant, the DDIM step and the IMM output map (docs/math.md sections 1-3),
// shared by every native backend. Differences of nearby times are formed analytically
// (alpha_s sigma_t - alpha_t sigma_s = t - s on fm, sin(pi (t - s) / 2) on cosine) so s -> t does not cancel.
#pragma once
#include "platform.h"

namespace imm {

template <class T>
struct AlphaSigma {
  T alpha, sigma;
};

template <class T>
IMM_HD AlphaSigma<T> alpha_sigma(Schedule schedule, T t) {
  if (schedule == Schedule::fm) return {T(1) - t, t};
  const T half_pi = T(1.5707963267948966);
  return {cos_(half_pi * t), sin_(half_pi * t)};
}

// alpha_s sigma_t - alpha_t sigma_s
template <class T>
IMM_HD T cross_term(Schedule schedule, T s, T t) {
  if (schedule == Schedule::fm) return t - s;
  return sin_(T(1.5707963267948966) * (t - s));
}

// alpha_t alpha_s + sigma_t sigma_s
template <class T>
IMM_HD T dot_term(Schedule schedule, T s, T t) {
  if (schedule == Schedule::fm) return (T(1) - t) * (T(1) - s) + t * s;
  return cos_(T(1.5707963267948966) * (t - s));
}

// Coefficients of one output: out = a * in0 + b * in1.
template <class T>
struct Mix {
  T a, b;
};

// f_{s,t}(x_t) = c_skip x_t + c_out g.
template <class T>
IMM_HD Mix<T> imm_output_coefficients(Schedule schedule, Param param, T sigma_data, T s, T t) {
  const AlphaSigma<T> at = alpha_sigma(schedule, t);
  if (param == Param::euler_fm) return {T(1), -(t - s) * sigma_data};
  if (param == Param::identity) {  // DDIM(x_t, g, s, t); from t = 0 only s = t = 0 is allowed: the identity
    if (at.sigma == T(0)) return {T(1), T(0)};
    const AlphaSigma<T> as = alpha_sigma(schedule, s);
    return {as.sigma / at.sigma, cross_term(schedule, s, t) / at.sigma};
  }
  const T norm2 = at.alpha * at.alpha + at.sigma * at.sigma;
  return {dot_term(schedule, s, t) / norm2, -sigma_data * cross_term(schedule, s, t) / sqrt_(norm2)};
}

// The coefficients of output k in {0, 1}: interpolate gives (alpha, sigma) at time k; imm_output has one
// output, at (s, t) = (time0, time1).
template <class T>
IMM_HD Mix<T> combine_coefficients(CombineKind kind, Schedule schedule, Param param, T sigma_data, T time0, T time1,
                                   int output) {
  if (kind == CombineKind::interpolate) {
    const AlphaSigma<T> c = alpha_sigma(schedule, output == 0 ? time0 : time1);
    return {c.alpha, c.sigma};
  }
  return imm_output_coefficients(schedule, param, sigma_data, time0, time1);
}

// coef[dst][src] of one row: the kind's coefficients mix[o][i] (output o from input i; none for a second output
// of a one-output kind), transposed for the backward (dst_i = sum_o mix[o][i] src_o).
template <class T>
IMM_HD void combine_matrix(CombineKind kind, Schedule schedule, Param param, T sigma_data, T time0, T time1,
                           int outputs, bool transpose, T (&coef)[2][2]) {
  T mix[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
  for (int o = 0; o < outputs; ++o) {
    const Mix<T> m = combine_coefficients(kind, schedule, param, sigma_data, time0, time1, o);
    mix[o][0] = m.a;
    mix[o][1] = m.b;
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) coef[i][j] = transpose ? mix[j][i] : mix[i][j];
}

}  // namespace imm

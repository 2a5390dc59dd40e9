"""Mutation check: plants small, realistic bugs in imm_kernels one at a time (a flipped sign, an off-by-one bound, a
dropped term, a wrong split or stride, swapped arguments) and runs the fast tests that should catch each, to show
that the suite fails where the code is wrong. Run on demand, not in CI:

    python tests/mutate.py                  # the control, then every mutant; prints the survivors and the score
    python tests/mutate.py --list           # the mutants, numbered (0 is the control)
    python tests/mutate.py --only 5 --only 12 [--tests "tests/test_mmd.py -k cpu-cpu"]
    python tests/mutate.py --list-cuda      # mutants of csrc/cuda, for a machine with a GPU (never run here)

Your checkout is never modified. The working tree as it is (tracked and untracked files that git does not ignore,
uncommitted changes included) is copied into a scratch folder, a temporary one that is deleted at the end, or
--scratch DIR, which is kept and reused (its build too). The scratch copy gets its own virtual environment, which sees
the packages of the python running this script but not its imm_kernels, and its own CMake build of the C++ extension;
mutants are applied and built there only, so Ctrl-C at any point leaves the checkout as it was.

A run first runs each test selection once on the unmutated copy (all must pass), then the control mutant (a blatant
bug: the run fails if it survives, proving that the copy is rebuilt, imported and tested), then the mutants, grouped so
that each C++ file is recompiled as few times as possible. A mutant is caught when its tests fail, crash or time out.
Mutants whose text no longer occurs exactly once in their file are reported as stale and fail the run.
Needs cmake and ninja (tests/requirements.txt puts both in the venv) and a C++17 compiler with OpenMP.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Test selections (pytest arguments). -x: a caught mutant stops at its first failing test.
MMD_CPU = ("tests/test_mmd.py", "tests/test_threads.py", "-k", "cpu-cpu or threads")
MMD_TRITON = ("tests/test_mmd.py", "-k", "cpu-triton")
COMBINE_CPU = ("tests/test_interpolant.py", "-k", "cpu-cpu")
COMBINE_TRITON = ("tests/test_interpolant.py", "-k", "cpu-triton")
MMD_AND_COMBINE_CPU = ("tests/test_mmd.py", "tests/test_interpolant.py", "-k", "cpu-cpu")
IMM = ("tests/test_imm.py",)
PYTORCH_CPU = ("tests/test_pytorch.py", "-k", "cpu-cpu")
GENERATOR = ("tests/test_generator.py", "-k", "not ddp")
LOSS_HEAD_CPU = ("tests/test_loss_head.py", "-k", "cpu-cpu or bad_input")
LOSS_HEAD_TRITON = ("tests/test_loss_head.py", "-k", "cpu-triton")
REFERENCE = ("tests/test_reference.py",)
EXAMPLES_CHECKPOINT = ("tests/test_examples.py", "-k", "time_features")
EXAMPLES_DEFAULTS = ("tests/test_examples.py", "-k", "parameterisation_defaults")
GAUSSIAN_STUDY = ("tests/test_examples.py", "-k", "gaussian_study_smoke")
CUDA_MMD = ("tests/test_mmd.py", "-k", "cuda-cuda")
CUDA_COMBINE = ("tests/test_interpolant.py", "-k", "cuda-cuda")


@dataclass(frozen=True)
class Mutant:
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple
    what: str


MMD_MATH, SCHEDULE_MATH = "csrc/common/mmd_math.h", "csrc/common/schedule_math.h"
CPU_MMD, CPU_COMBINE, CPU_STORAGE = "csrc/cpu/mmd.cpp", "csrc/cpu/combine.cpp", "csrc/cpu/storage.h"
TRITON_MMD, TRITON_COMBINE = "imm_kernels/triton/mmd.py", "imm_kernels/triton/interpolant.py"

CONTROL = Mutant(CPU_MMD, "out[0] = store<In>(Acc(total / double(p.groups)))",
                 "out[0] = store<In>(Acc(-total / double(p.groups)))", MMD_CPU,
                 "control: the mean loss comes out negated")

MUTANTS = [
    CONTROL,
    # The pair math shared by the native backends.
    Mutant(MMD_MATH, "? -exp_(-xa) * expm1_(-gap)", "? exp_(-xa) * expm1_(-gap)", MMD_CPU,
           "exp_difference: the sign of the expm1 branch"),
    Mutant(MMD_MATH, "const T ac = a < eps ? eps : a,", "const T ac = a,", MMD_CPU,
           "laplace: the eps floor dropped from phi(a)"),
    Mutant(MMD_MATH, "r.psi_a = a <= eps ? T(0)", "r.psi_a = a <= T(0) ? T(0)", MMD_CPU,
           "laplace: psi(a) nonzero below the eps floor"),
    Mutant(MMD_MATH, "(-em + (gap / b) * (em + T(1)))", "(-em + (gap / a) * (em + T(1)))", MMD_CPU,
           "laplace: psi(a) - psi(b) for close distances divides by a, not b"),
    Mutant(MMD_MATH, "r.dpsi = both_live ? -b_minus_a / (a * b)", "r.dpsi = both_live ? b_minus_a / (a * b)", MMD_CPU,
           "energy: the sign of psi(a) - psi(b)"),
    Mutant(MMD_MATH, "r.psi_b = T(-2) * c * exp_(-c * b2);", "r.psi_b = T(-2) * c * exp_(-c * a2);", MMD_CPU,
           "rbf: psi(b) evaluated at a"),
    Mutant(MMD_MATH, "r.loss = cross_w * t.dphi + (self_w - cross_w) * t.phi_a;",
           "r.loss = cross_w * t.dphi + self_w * t.phi_a;", MMD_CPU, "the loss drops the -cross_w phi(a) term"),
    Mutant(MMD_MATH, "r.own = grad_w * (cross_w * t.dpsi + (self_w - cross_w) * t.psi_a);",
           "r.own = grad_w * (cross_w * t.dpsi + (self_w + cross_w) * t.psi_a);", MMD_CPU,
           "near-duplicate form: the sign of cross_w in the own coefficient"),
    Mutant(MMD_MATH, "r.gap = -grad_w * cross_w * t.psi_b;", "r.gap = grad_w * cross_w * t.psi_b;", MMD_CPU,
           "near-duplicate form: the sign of the gap coefficient"),
    Mutant(MMD_MATH, "return diagonal ? T(0) : T(1) / T(m * (m - 1));", "return diagonal ? T(0) : T(1) / T(m * m);",
           MMD_CPU, "U statistic: off-diagonal self weight 1/M^2 instead of 1/(M(M-1))"),
    Mutant(MMD_MATH, "bandwidth / T(d);", "bandwidth / T(d + 1);", MMD_CPU, "kernel scale: bandwidth / (D + 1)"),
    # The schedule math shared by the native backends.
    Mutant(SCHEDULE_MATH, "return {cos_(half_pi * t), sin_(half_pi * t)};",
           "return {sin_(half_pi * t), cos_(half_pi * t)};", COMBINE_CPU, "cosine: alpha and sigma swapped"),
    Mutant(SCHEDULE_MATH, "const T half_pi = T(1.5707963267948966);", "const T half_pi = T(1.57079632679);",
           COMBINE_CPU, "cosine: pi / 2 to 12 digits"),
    Mutant(SCHEDULE_MATH, "return sin_(T(1.5707963267948966) * (t - s));",
           "return sin_(T(1.5707963267948966) * (s - t));", COMBINE_CPU, "cosine: cross term of (s - t)"),
    Mutant(SCHEDULE_MATH, "return {as.sigma / at.sigma,", "return {as.alpha / at.sigma,", COMBINE_CPU,
           "identity (DDIM): c_skip alpha_s / sigma_t"),
    Mutant(SCHEDULE_MATH, "return {T(1), -(t - s) * sigma_data};", "return {T(1), -(t - s) / sigma_data};",
           COMBINE_CPU, "euler_fm: c_out divides by sigma_data"),
    Mutant(SCHEDULE_MATH, "alpha_sigma(schedule, output == 0 ? time0 : time1)",
           "alpha_sigma(schedule, output == 0 ? time0 : time0)", COMBINE_CPU,
           "interpolate_pair: the second output at the first time"),
    # The C++ MMD.
    Mutant(CPU_MMD, "ceil_div(features, kLanes) * kLanes)", "features)", MMD_CPU,
           "tile width not a whole number of lanes"),
    Mutant(CPU_MMD, "  return {i * kBlockRows, size(i), j * kBlockRows, size(j), i == j};",
           "  return {i * kBlockRows, size(i), i * kBlockRows, size(j), i == j};", MMD_CPU,
           "off-diagonal pair blocks start at the wrong row block"),
    Mutant(CPU_MMD, "    for (int64_t c = n; c < width; ++c) out[c] = Acc(0);\n", "", MMD_CPU,
           "the last tile's padding not zeroed"),
    Mutant(CPU_MMD, "dt_ba[l] += da[c] * (u_ba - v);", "dt_ba[l] += da[c] * (u_ba + v);", MMD_CPU,
           "pass 1: a sign in the delta of the (b, a) pair"),
    Mutant(CPU_MMD, "(side == 0 ? ab : b * rows + a)", "(side == 0 ? ab : ab)", MMD_CPU,
           "finalize: the y_r side reads |t_a - r_b| where it needs |r_a - t_b|"),
    Mutant(CPU_MMD, "2.0 * w / (p.reduction == Reduction::mean ? double(p.groups) : 1.0)", "2.0 * w", MMD_CPU,
           "the gradient of the mean not divided by G"),
    Mutant(CPU_MMD, "block, part * span, std::min(d, (part + 1) * span)",
           "block, part * span, std::min(d, (part + 1) * span - 1)", MMD_CPU,
           "feature split: each part stops one feature short"),
    Mutant(CPU_MMD, "for (int64_t part = 0; part < parts; ++part)", "for (int64_t part = 0; part < parts - 1; ++part)",
           MMD_CPU, "feature split: the last part left out of the summed finalize"),
    Mutant(CPU_MMD, "all_finite(summed, n) ? summed", "all_finite(summed, 0) ? summed", MMD_CPU,
           "feature split: the float64 fallback never taken"),
    Mutant(CPU_MMD, "std::min(d, (part + 1) * span), scratch", "std::min(d, (part + 1) * span - 1), scratch", MMD_CPU,
           "backward feature split: each part stops one feature short"),
    Mutant(CPU_MMD, "const PairCoefficients<double> r = pair_coefficients<double, kGradient>(",
           "const auto r = pair_coefficients<Acc, kGradient>(", MMD_CPU,
           "finalize in the accumulation type (float for float32 inputs), not double"),
    Mutant(CPU_MMD, "for (int64_t j0 = 0; j0 < m; j0 += rows)", "for (int64_t j0 = 0; j0 < rows; j0 += rows)", MMD_CPU,
           "backward: only the first row block of partners"),
    Mutant(CPU_MMD, "const Acc sign = side == 0 ? Acc(1) : Acc(-1), go", "const Acc sign = Acc(1), go", MMD_CPU,
           "backward: the y_r side's gap term with the y_t side's sign"),
    # The C++ combine and the bfloat16 store.
    Mutant(CPU_COMBINE, "b * s.row_stride + f0 * s.feature_stride", "b * s.row_stride + f0", COMBINE_CPU,
           "row blocks: a strided source's block offset ignores the feature stride"),
    Mutant(CPU_COMBINE, "static_cast<In*>(base) + b * f_count + f0", "static_cast<In*>(base) + b * f_count",
           COMBINE_CPU, "row blocks: every block written at the row's start"),
    Mutant(SCHEDULE_MATH, "coef[i][j] = transpose ? mix[j][i] : mix[i][j];",
           "coef[i][j] = transpose ? mix[i][j] : mix[i][j];", COMBINE_CPU, "backward: the mix not transposed"),
    Mutant(CPU_COMBINE, "if (stride0 == 1 && (!src1 || stride1 == 1))", "if (stride0 == 1)", COMBINE_CPU,
           "a strided second source read as packed"),
    Mutant(CPU_COMBINE, "if (!(times[k] >= 0 && times[k] <= 1))", "if (!(times[k] <= 1))", COMBINE_CPU,
           "time check: negative times in tensors accepted"),
    Mutant(CPU_STORAGE, "  u += 0x7fffu + ((u >> 16) & 1u);\n", "", MMD_AND_COMBINE_CPU,
           "float -> bfloat16 truncates instead of rounding to nearest even"),
    # The Python layer, the IMM schedule math and the reference.
    Mutant("imm_kernels/imm.py", "s = eps_t + (t - eps_t) * u[1]", "s = eps_t + (t - eps_t) * u[0]", IMM,
           "sample_times: s from the same uniform as t"),
    Mutant("imm_kernels/imm.py", "t = eps_t + (T - eps_t) * u[0]", "t = eps_t + (T - eps_t) * u.max(0).values", IMM,
           "sample_times: t the larger of two uniforms"),
    Mutant("imm_kernels/imm.py", "- step_min) / 2.0**k", "- step_min) / 2.0 ** (k - 1)", IMM,
           "r_from_st: the eta step twice as large"),
    Mutant("imm_kernels/imm.py", '(torch.atan, torch.tan) if r_spacing == "angle"',
           '(torch.atan, torch.tan) if r_spacing == "eta"', IMM, "r_from_st: the two r spacings swapped"),
    Mutant("imm_kernels/imm.py", "return t * (1 - t) ** (a - 1) /", "return t * (1 - t) ** a /", IMM,
           "time_weight: (1 - t)^a for (1 - t)^(a - 1)"),
    Mutant("imm_kernels/imm.py", "return (a_t * a_s + s_t * s_s) / norm2,",
           "return (a_t * a_s + s_t * s_s) / torch.sqrt(norm2),", IMM, "simple_edm: c_skip over sqrt(norm2)"),
    Mutant("imm_kernels/reference.py", "self_w.fill_(1.0 / (m * (m - 1)))", "self_w.fill_(1.0 / (m * m))", REFERENCE,
           "reference U statistic: self weight 1/M^2"),
    Mutant("imm_kernels/reference.py", "torch.where(d <= eps, eps, d)", "d", REFERENCE,
           "reference laplace: no eps floor"),
    Mutant("imm_kernels/reference.py", "torch.where(d <= eps, eps, d)", "torch.where(d < eps, eps, d)", REFERENCE,
           "reference laplace: the gradient passes at d == eps (as torch.clamp's does)"),
    Mutant("imm_kernels/reference.py", "return alpha(t, schedule) * x + sigma(t, schedule) * noise",
           "return alpha(t, schedule) * x + sigma(t, schedule) * x", REFERENCE,
           "reference interpolate: sigma_t times x, not noise"),
    Mutant("imm_kernels/_native.py", "return x, x.stride(0), layout[0], layout[1]",
           "return x, x.stride(0), 1, layout[1]", COMBINE_CPU, "operand: a single feature stride read as 1"),
    Mutant("imm_kernels/mmd.py", "return [out_t if need_t else None, out_r if need_r else None,",
           "return [out_r if need_t else None, out_t if need_r else None,", MMD_CPU,
           "autograd: the two gradients swapped"),
    Mutant("imm_kernels/interpolant.py", "kind, outputs, not transpose, schedule", "kind, outputs, transpose, schedule",
           COMBINE_CPU, "autograd: the backward runs the forward map"),
    # Gradients of every input, torch.func, autocast and layouts (tests/test_pytorch.py).
    Mutant("imm_kernels/mmd.py", "(1 if kernel == \"laplace\" else 2) * bw", "(1 if kernel == \"laplace\" else 1) * bw",
           PYTORCH_CPU, "bandwidth gradient: rbf's bw d^2 taken as degree 1"),
    Mutant("imm_kernels/mmd.py", "grad = grad - scale * floor", "grad = grad", PYTORCH_CPU,
           "bandwidth gradient: the V-statistic diagonal's eps-floor term left out"),
    Mutant("imm_kernels/mmd.py", "return scale / groups if reduction == \"mean\" else scale", "return scale",
           PYTORCH_CPU, "weight gradient: the mean's 1/G left out"),
    Mutant("imm_kernels/mmd.py", "total = total + part * tangent.to(acc).expand(groups)", "total = total + part",
           PYTORCH_CPU, "jvp: the per-group tangents of bandwidth and weight ignored"),
    Mutant("imm_kernels/mmd.py", "else weight.to(acc)) / (groups if reduction == \"mean\" else 1)",
           "else weight.to(acc))", PYTORCH_CPU, "vmap: the mean taken as a sum over each problem's groups"),
    Mutant("imm_kernels/interpolant.py", "total = total + derivative.to(acc) * product",
           "total = total - derivative.to(acc) * product", PYTORCH_CPU, "time gradient: the sign"),
    Mutant("imm_kernels/interpolant.py", "[[per_coefficient[o * 2 + i][k] for i in range(2)]",
           "[[per_coefficient[o * 2 + i][1 - k] for i in range(2)]", PYTORCH_CPU,
           "time derivatives: each time gets the other's"),
    Mutant("imm_kernels/interpolant.py", "term = _rows((derivative * tangent.double())",
           "term = _rows((derivative * tangent.double().flip(0))", PYTORCH_CPU, "jvp: time tangents of other samples"),
    Mutant("imm_kernels/_native.py", "return batch_first(x, dim, n).reshape(n, -1).expand(n, count)",
           "return batch_first(x, dim, n).reshape(n, -1)[:1].expand(n, count)", PYTORCH_CPU,
           "vmap: every problem with the first problem's times, bandwidths and weights"),
    Mutant("imm_kernels/_native.py", "return x.view(n, -1, *x.shape[1:]) if x.numel() else x",
           "return x.view(-1, n, *x.shape[1:]).transpose(0, 1) if x.numel() else x", PYTORCH_CPU,
           "vmap: the problems' rows interleaved"),
    Mutant("imm_kernels/_validate.py", "dtype = torch.promote_types(a.dtype, b.dtype)", "dtype = a.dtype", PYTORCH_CPU,
           "autocast: mixed inputs run in the first one's dtype"),
    Mutant("imm_kernels/_native.py", "for position, dim in enumerate((0, *order)):\n        inverse[dim] = position",
           "for position, dim in enumerate((0, *order)):\n        inverse[position] = dim", PYTORCH_CPU,
           "channels-last: the outputs permuted back the wrong way"),
    # IMMGenerator (tests/test_generator.py).
    Mutant("imm_kernels/generator.py", "noise_t, noise_second = 1000 * t.to(torch.float32), 1000 * second.to(",
           "noise_second, noise_t = 1000 * t.to(torch.float32), 1000 * second.to(", GENERATOR,
           "the network's two times swapped"),
    Mutant("imm_kernels/generator.py", "labels = torch.where(dropped.repeat_interleave(group_size).to(labels.device),",
           "labels = torch.where(dropped.repeat(group_size).to(labels.device),", GENERATOR,
           "label dropout per row pattern instead of per group"),
    Mutant("imm_kernels/generator.py", "g_r = self(x_r, s_rows, r_rows, labels, network=target,",
           "g_r = self(x_r, s_rows, t_rows, labels, network=target,", GENERATOR,
           "the target map f_{s,t} instead of f_{s,r}"),
    Mutant("imm_kernels/generator.py", "noise = (self.sigma_data * torch.randn(", "noise = (1.0 * torch.randn(",
           GENERATOR, "the prior noise N(0, 1) instead of N(0, sigma_data^2)"),
    Mutant("imm_kernels/generator.py", "x = interpolate(x, noise(), full(s), schedule=self.schedule)",
           "x = interpolate(x, noise(), full(t), schedule=self.schedule)", GENERATOR,
           "restart: re-noised to the step's start instead of its end"),
    Mutant("imm_kernels/generator.py", "middle = [float(schedules.eta_inv(middle_eta, schedule))]",
           "middle = [float(schedules.eta_inv(1.4, schedule))]", GENERATOR,
           "time_grid: middle_eta ignored"),
    # The fused loss head (tests/test_loss_head.py): the mix in both native backends, the Python around them.
    Mutant(CPU_MMD, "skip * load<Acc>(row[c]) + scale * load<Acc>(f[c]);",
           "skip * load<Acc>(row[c]) + scale * load<Acc>(row[c]);", LOSS_HEAD_CPU,
           "mix: the network output f read as x"),
    Mutant(CPU_MMD, "rows.out = Acc(p.mix.coefficients[4 * g + 2 * side + 1]);",
           "rows.out = Acc(p.mix.coefficients[2 * side + 1]);", LOSS_HEAD_CPU,
           "mix: every group with group 0's c_out"),
    Mutant(CPU_MMD, "if (j0 != first) {", "if (j0 != 0) {", MMD_CPU,
           "backward: a group's first row block taken for every block's partners (M > 16)"),
    Mutant(CPU_MMD, "sides[1].f ? scale * sides[1].out : scale", "sides[1].f ? scale * sides[0].out : scale",
           LOSS_HEAD_CPU, "mix backward: g_r's gradient scaled by c_out(s, t)"),
    Mutant(TRITON_MMD, "value = side[4].to(ACC) * value + side[5].to(ACC) * f",
           "value = side[5].to(ACC) * value + side[4].to(ACC) * f", LOSS_HEAD_TRITON, "mix: c_skip and c_out swapped"),
    Mutant(TRITON_MMD, "side_r = (y_r_ptr, stride_r, f_r_ptr, stride_fr, tl.load(base + 2), tl.load(base + 3))",
           "side_r = (y_r_ptr, stride_r, f_r_ptr, stride_fr, tl.load(base), tl.load(base + 1))", LOSS_HEAD_TRITON,
           "mix: the y_r side with f_{s,t}'s coefficients"),
    Mutant(TRITON_MMD, "scale_r = scale_t * side_r[5].to(ACC)", "scale_r = scale_t * side_t[5].to(ACC)",
           LOSS_HEAD_TRITON, "mix backward: g_r's gradient scaled by c_out(s, t)"),
    Mutant("imm_kernels/loss_head.py", "*output_coefficients(s.double(), r.double(), **options)]",
           "*output_coefficients(s.double(), t.double(), **options)]", LOSS_HEAD_CPU,
           "the target's coefficients of f_{s,t} instead of f_{s,r}"),
    Mutant("imm_kernels/loss_head.py", "for v in (x_t, x_r, s, r, t, bw, w)]", "for v in (x_t, x_r, s, r, t, w)]",
           LOSS_HEAD_CPU, "a bandwidth that requires grad taken down the fused path (its gradient None)"),
    Mutant("imm_kernels/loss_head.py", "rows[:, 2] * x_r + rows[:, 3] * g_r", "rows[:, 2] * x_r + rows[:, 1] * g_r",
           LOSS_HEAD_CPU, "second order: the target formed with c_out(s, t)"),
    # The eager path's row plan and backward hot path (mmd.py).
    Mutant("imm_kernels/mmd.py", "return _native.module(backend), leading, mix_args, (t, r, *mix_rows)",
           "return _native.module(backend), leading, mix_args, (t, r)", LOSS_HEAD_CPU,
           "row plan: the packed copies of the network outputs freed before the kernels read them"),
    Mutant("imm_kernels/mmd.py", "if plan is not None and not (needs[2] or needs[3] or torch.is_grad_enabled())",
           "if plan is not None and not torch.is_grad_enabled()", PYTORCH_CPU,
           "eager backward: the kernel alone also where the bandwidth or weight needs a gradient"),
    Mutant("imm_kernels/mmd.py", "out_t.data_ptr() if grad_t else 0, out_r.data_ptr() if grad_r else 0",
           "out_r.data_ptr() if grad_r else 0, out_t.data_ptr() if grad_t else 0", MMD_CPU,
           "planned backward: the two gradients' destinations swapped"),
    Mutant("imm_kernels/mmd.py", "(needs[0], needs[1]) == options[7:9]", "True", PYTORCH_CPU,
           "the op's backward served by the kernel alone though a grad flag was False (a silent None)"),
    Mutant("imm_kernels/mmd.py", "if plan is None or _dispatch.saved_tensor_hooks_active():", "if plan is None:",
           PYTORCH_CPU, "the row plan keeps y_t and y_r alive under saved-tensor hooks"),
    Mutant("imm_kernels/mmd.py", "y_t, y_r, bandwidth, weight, *state = ctx.saved_tensors",
           "y_t, y_r, bandwidth, weight, *state = (*ctx.plan[3][:2], None, None) if ctx.plan else ctx.saved_tensors",
           PYTORCH_CPU, "eager backward: the inputs taken from the plan, without autograd's checks of the saved ones"),
    Mutant("imm_kernels/_validate.py", "and shape == y_r.shape and not shape[0] % group_size and",
           "and shape == y_r.shape and", ("tests/test_hardening.py", "-k", "common_case"),
           "the common-case test passes a group size that does not divide the batch"),
    Mutant("imm_kernels/generator.py", "bandwidth = bandwidth_scale * imm.kernel_bandwidth(",
           "bandwidth = imm.kernel_bandwidth(", GENERATOR, "IMMGenerator.loss ignores bandwidth_scale"),
    # The Triton kernels (run by the interpreter).
    Mutant(TRITON_MMD, "-t_minus_r_j * (w + z)", "t_minus_r_j * (w + z)", MMD_TRITON,
           "pass 1: the sign of the y_r side's delta"),
    Mutant(TRITON_MMD, "mask = index < chunks", "mask = index < chunks - 1", MMD_TRITON,
           "split finalize: the last chunk left out"),
    Mutant(TRITON_MMD, "return loss, own, tl.where(near, 0.0, far_psi_b), tl.where(near, far_psi_b, 0.0)",
           "return loss, own, tl.where(near, far_psi_b, 0.0), tl.where(near, 0.0, far_psi_b)", MMD_TRITON,
           "the cross and gap coefficients swapped"),
    Mutant(TRITON_MMD, "tl.exp(-tl.where(close, c_gap, 0.0))", "tl.exp(tl.where(close, c_gap, 0.0))", MMD_TRITON,
           "laplace close form: exp(+c gap)"),
    Mutant(TRITON_MMD, "one / (GROUP_SIZE * (GROUP_SIZE - 1))", "one / (GROUP_SIZE * GROUP_SIZE)", MMD_TRITON,
           "U statistic: off-diagonal self weight 1/M^2"),
    Mutant(TRITON_MMD, "scale_t = tl.load(grad_output_ptr + group * grad_output_stride)",
           "scale_t = tl.load(grad_output_ptr)", MMD_TRITON, "backward: every group scaled by group 0's output gradient"),
    Mutant(TRITON_COMBINE, "cross = tl.sin((t - s) * _HALF_PI)", "cross = tl.sin((s - t) * _HALF_PI)", COMBINE_TRITON,
           "cosine: cross term of (s - t)"),
    Mutant(TRITON_COMBINE, "c00, c01, c10, c11 = a0, a1, b0, b1", "c00, c01, c10, c11 = a0, b0, a1, b1",
           COMBINE_TRITON, "backward: the mix not transposed"),
    Mutant(TRITON_COMBINE, "feature * src1_feature_stride", "feature", COMBINE_TRITON,
           "the second source's feature stride ignored"),
    # The unpaired estimator (no term with i = j).
    Mutant(MMD_MATH, "return est == Estimator::unpaired ?", "return est == Estimator::unpaired && !diagonal ?",
           MMD_CPU, "unpaired: the partners' cross term kept (weight 1/M^2)"),
    Mutant(TRITON_MMD, "        cross_w = self_w", "        cross_w = tl.where(diagonal, cross_w, self_w)", MMD_TRITON,
           "unpaired: the partners' cross term kept (weight 1/M^2)"),
    Mutant("imm_kernels/reference.py", "cross_w.fill_(-1.0 / (m * (m - 1))).fill_diagonal_(0.0)",
           "cross_w.fill_(-1.0 / (m * (m - 1)))", REFERENCE, "unpaired: the partners' cross term weighted as the rest"),
    Mutant("imm_kernels/_validate.py", 'return 1 if estimator == "v" else 2', 'return 2 if estimator == "u" else 1',
           ("tests/test_mmd.py", "tests/test_hardening.py", "-k", "bad_input or common_case"),
           "unpaired takes groups of one (a division by zero)"),
    Mutant("imm_kernels/generator.py", "unpaired_weight = (1 - 1 / group_size) * weight",
           "unpaired_weight = (1 - 1 / group_size ** 2) * weight", GENERATOR,
           "partner_weight, partner='mean': the unpaired estimate weighed 1 - 1/M^2 instead of 1 - 1/M"),
    Mutant("imm_kernels/generator.py", "return torch.where(times[1] > times[0], partners, 0)", "return partners",
           GENERATOR, "partner='mean': the partners' term kept where r = s"),
    Mutant("imm_kernels/generator.py", "typical = distance.detach().mean(1)", "typical = distance.mean(1)",
           GENERATOR, "partner='mean': the typical distance c differentiated"),
    Mutant("imm_kernels/generator.py", "r_spacing=r_spacing, generator=generator,", "generator=generator,",
           GENERATOR, "loss: r_spacing not passed on (r always equal steps in eta)"),
    # The examples' network: its time features.
    Mutant("examples/checkpoint.py", 'config["width"],\n                         config["time_frequency"])',
           'config["width"])', EXAMPLES_CHECKPOINT, "a checkpoint's network rebuilt with DDPM's time features"),
    Mutant("examples/checkpoint.py", '("r_spacing", "eta"), ("time_frequency", 1.0)):', '("r_spacing", "eta")):',
           EXAMPLES_CHECKPOINT, "a checkpoint from before --time-frequency: no time features to rebuild with"),
    Mutant("examples/train.py", 'config["width"],\n                         config["time_frequency"]).to(device)',
           'config["width"]).to(device)', EXAMPLES_CHECKPOINT, "--time-frequency not passed to the trained network"),
    Mutant("examples/train.py", '("euler_fm" if points_on_fm else "simple_edm")', '"simple_edm"', EXAMPLES_DEFAULTS,
           "points train the paper's simple_edm maps again"),
    Mutant("examples/train.py", 'not images and config["method"] == "imm" and config["schedule"] == "fm"',
           'config["method"] == "imm" and config["schedule"] == "fm"', EXAMPLES_DEFAULTS,
           "images default to euler_fm too"),
    Mutant("examples/gaussian.py", 'return checkpoint.load(folder)["config"] == wanted', "return True", GAUSSIAN_STUDY,
           "the Gaussian study measures a finished run of older defaults as if it were today's"),
]

# Mutants of the CUDA kernels, listed for a machine with a GPU (they need one to build and run).
CUDA_MUTANTS = [
    Mutant("csrc/cuda/pair_sums.cuh", "s[kDT][b][a] += dl[a] * (u_ba - vv);", "s[kDT][b][a] += dl[a] * (u_ba + vv);",
           CUDA_MMD, "pass 1, diagonal tile: a sign in the delta of the (b, a) pair"),
    Mutant("csrc/cuda/pair_sums.cuh", "s[kDR][a][b] -= dc * (w + z);", "s[kDR][a][b] += dc * (w + z);", CUDA_MMD,
           "pass 1, off-diagonal tile: the sign of the y_r side's delta"),
    Mutant("csrc/cuda/pair_sums.cuh", "for (int sl = 0; sl < slices; ++sl) sum +=",
           "for (int sl = 0; sl < slices - 1; ++sl) sum +=", CUDA_MMD, "pass 1: the last slice of a tile left out"),
    Mutant("csrc/cuda/mmd.cu", "for (int64_t k = 0; k < chunks; ++k) {", "for (int64_t k = 1; k < chunks; ++k) {",
           CUDA_MMD, "split finalize: the first chunk left out"),
    Mutant("csrc/cuda/mmd.cu", "const Acc sign = side == 0 ? Acc(1) : Acc(-1);", "const Acc sign = Acc(1);",
           CUDA_MMD, "pass 2: the y_r side's gap term with the y_t side's sign"),
    Mutant("csrc/cuda/mmd.cu", "if (row0 + a >= v.m) break;", "if (row0 + a > v.m) break;", CUDA_MMD,
           "pass 2: one gradient row past the group written"),
    Mutant("csrc/cuda/combine.cu", "coef[i][j] = transpose ? mix[j][i] : mix[i][j];",
           "coef[i][j] = transpose ? mix[i][j] : mix[i][j];", CUDA_COMBINE, "backward: the mix not transposed"),
    Mutant("csrc/cuda/combine.cu", "t0[row * p.time0_stride], t1[row * p.time1_stride]",
           "t0[row * p.time0_stride], t1[row * p.time0_stride]", CUDA_COMBINE,
           "the second time read with the first's stride"),
]


def describe(number: int, mutant: Mutant) -> str:
    change = f"{mutant.old.strip()!r} -> {mutant.new.strip()!r}"
    return f"{number:3d}  {mutant.path}: {mutant.what}\n     {change}\n     tests: {shlex.join(mutant.tests)}"


def source_files(root: Path) -> list[Path]:
    """The working tree's files that git tracks or would track (untracked, not ignored), as they are now."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [Path(name) for name in listed if name and (root / name).is_file()]


def sync_tree(root: Path, scratch: Path) -> None:
    """Copies what differs (new timestamps, so the build sees the change); identical files keep theirs."""
    for name in source_files(root):
        source, target = root / name, scratch / name
        if target.is_file() and target.read_bytes() == source.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def make_venv(scratch: Path) -> Path:
    """A virtual environment in the scratch folder that imports this python's packages (a .pth file naming its
    site-packages; the .pth files in there, such as an editable install's, are not run) but not its imm_kernels."""
    venv = scratch / ".venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                       check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        parent = site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
        Path(purelib, "parent_packages.pth").write_text("\n".join(dict.fromkeys(parent)) + "\n")
    return python


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        sys.exit(f"mutate.py: {name} not found (pip install {name})")
    return found


class Scratch:
    """The scratch copy: its tree, environment and build."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.build_dir = folder / "build-mutate"
        self.env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def prepare(self) -> None:
        sync_tree(ROOT, self.folder)
        for cache in self.folder.rglob("__pycache__"):
            shutil.rmtree(cache)  # no bytecode from an earlier run: a mutant's .pyc could pass for the original
        self.python = make_venv(self.folder)
        if not (self.build_dir / "build.ninja").exists():
            import pybind11

            subprocess.run([tool("cmake"), "-S", str(self.folder), "-B", str(self.build_dir), "-G", "Ninja",
                            f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}", "-DCMAKE_BUILD_TYPE=Release", "-DIMM_CUDA=OFF",
                            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
                           check=True, capture_output=True, env=self.env)
        if not self.build():
            sys.exit("mutate.py: the unmutated scratch copy does not build")
        where = subprocess.run([str(self.python), "-c", "import imm_kernels, imm_kernels._C as c; "
                                "print(imm_kernels.__file__); print(c.__file__)"],
                               capture_output=True, text=True, env=self.env, cwd=self.folder)
        if where.returncode or any(not Path(p).resolve().is_relative_to(self.folder.resolve())
                                   for p in where.stdout.split()):
            sys.exit(f"mutate.py: the scratch environment imports imm_kernels from elsewhere:\n{where.stdout}"
                     f"{where.stderr}")

    def build(self) -> bool:
        """Rebuilds what changed (nothing: a fraction of a second) and puts the extension beside the sources."""
        result = subprocess.run([tool("cmake"), "--build", str(self.build_dir)], capture_output=True, text=True,
                                env=self.env)
        if result.returncode:
            print(result.stdout[-3000:], result.stderr[-3000:])
            return False
        for built in self.build_dir.glob("_C*.so"):
            target = self.folder / "imm_kernels" / built.name
            if not target.exists() or target.stat().st_mtime < built.stat().st_mtime:
                shutil.copy2(built, target)
        return True

    def run_tests(self, tests: tuple, timeout: float) -> tuple[str, str]:
        """(outcome, the first failing test or the reason): passed, failed, crashed or timeout."""
        command = [str(self.python), "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
        try:
            result = subprocess.run(command, cwd=self.folder, env=self.env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", f"no result in {timeout:.0f} s"
        lines = result.stdout.splitlines()
        failed = next((line for line in lines if line.startswith(("FAILED ", "ERROR "))), lines[-1] if lines else "")
        if result.returncode == 0:
            return "passed", lines[-1] if lines else ""
        if result.returncode in (1, 2):  # tests failed, or collection / import errors (2)
            return "failed", failed
        if result.returncode < 0:
            return "crashed", f"signal {-result.returncode}"
        return "error", f"pytest exit code {result.returncode}: {failed}\n{result.stderr[-2000:]}"


# A test run's outcome (Scratch.run_tests) as the verdict on its mutant; stale and error mean a broken harness or list.
VERDICTS = {"failed": "caught", "crashed": "caught", "timeout": "caught", "passed": "SURVIVED"}


def apply(scratch: Scratch, mutant: Mutant) -> str | None:
    """Applies the mutant; returns the original text, or None when the mutant is stale."""
    path = scratch.folder / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return None
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def run(selected: list[tuple[int, Mutant]], scratch: Scratch, tests_override: tuple | None, timeout: float) -> int:
    start = time.monotonic()
    # --tests replaces the mutants' selections, not the control's: the control proves the harness with its own.
    selection = {number: (number != 0 and tests_override) or mutant.tests for number, mutant in selected}
    print(f"baseline: {len(set(selection.values()))} test selection(s) on the unmutated copy", flush=True)
    for tests in dict.fromkeys(selection.values()):
        outcome, detail = scratch.run_tests(tests, timeout)
        print(f"  {outcome:8} {shlex.join(tests)}: {detail}", flush=True)
        if outcome != "passed":
            print("mutate.py: the unmutated copy must pass every selection; fix that first")
            return 1
    # C++ files first, each file's mutants together: every compile of a file serves a restore and the next mutant.
    order = sorted(selected, key=lambda item: (item[0] != 0, not item[1].path.startswith("csrc"), item[1].path))
    results = {}
    for number, mutant in order:
        began = time.monotonic()
        original = apply(scratch, mutant)
        if original is None:
            results[number] = ("stale", f"the text does not occur exactly once in {mutant.path}")
        else:
            try:
                built = scratch.build()
                results[number] = scratch.run_tests(selection[number], timeout) if built else ("error", "no build")
            finally:
                (scratch.folder / mutant.path).write_text(original)
        outcome, detail = results[number]
        seconds = time.monotonic() - began
        print(f"[{number:2d}] {VERDICTS.get(outcome, outcome):8} {seconds:6.1f} s  {mutant.path}: {mutant.what}\n"
              f"               {outcome}: {detail}", flush=True)
    verdicts = {n: VERDICTS.get(outcome, "broken") for n, (outcome, _) in results.items()}
    caught = [n for n, verdict in verdicts.items() if verdict == "caught" and n != 0]
    survivors = [n for n, verdict in verdicts.items() if verdict == "SURVIVED" and n != 0]
    broken = [n for n, verdict in verdicts.items() if verdict == "broken"]
    counted = len(caught) + len(survivors)
    minutes = (time.monotonic() - start) / 60
    print(f"\n{len(caught)}/{counted} mutants caught ({100 * len(caught) / max(counted, 1):.0f}%) in {minutes:.1f} min")
    for number in survivors:
        print(f"  survived: [{number}] {MUTANTS[number].path}: {MUTANTS[number].what}")
    for number in broken:
        print(f"  {results[number][0]}: [{number}] {MUTANTS[number].path}: {results[number][1]}")
    if verdicts[0] == "SURVIVED":
        print("mutate.py: the control mutant survived: the harness does not test what it builds")
        return 1
    return 1 if broken else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants (0 is the control) and exit")
    parser.add_argument("--list-cuda", action="store_true", help="list the CUDA mutants (they need a GPU) and exit")
    parser.add_argument("--only", type=int, action="append", metavar="N", help="run mutant N only (repeatable)")
    parser.add_argument("--tests", help="pytest arguments to run for each selected mutant (not the control) instead "
                        "of its own")
    parser.add_argument("--scratch", type=Path, help="scratch folder to use and keep (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    args = parser.parse_args()
    if args.list or args.list_cuda:
        for number, mutant in enumerate(CUDA_MUTANTS if args.list_cuda else MUTANTS):
            print(describe(number, mutant))
        return 0
    numbers = args.only if args.only else range(len(MUTANTS))
    if any(not 0 <= n < len(MUTANTS) for n in numbers):
        parser.error(f"--only takes 0 to {len(MUTANTS) - 1}")
    selected = [(n, MUTANTS[n]) for n in dict.fromkeys([0, *numbers])]  # the control always runs
    folder = args.scratch or Path(tempfile.mkdtemp(prefix="imm-mutate-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"scratch copy: {folder}", flush=True)
    try:
        scratch = Scratch(folder)
        scratch.prepare()
        return run(selected, scratch, tuple(shlex.split(args.tests)) if args.tests else None, args.timeout)
    except KeyboardInterrupt:
        print("\ninterrupted; your checkout was not touched")
        return 130
    finally:
        if not args.scratch:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""The per-sample linear ops of IMM: interpolate, interpolate_pair, ddim and imm_output (docs/math.md sections
1-3).

Each is out_o = a_o(times) * in0 + b_o(times) * in1 per sample, with the schedule coefficients computed inside
the kernel from the times (a float, or per-sample float32/float64 tensors), so one op, imm_kernels::combine,
serves them all: forward (in0, in1) -> outputs, and its transpose, the backward (grad outputs -> grad inputs).
Being linear, the transpose of the transpose is the forward again, which gives gradients of gradients. Time
tensors that require grad get theirs from the coefficients' closed-form derivatives (below).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _native, _validate, reference
from .imm import output_coefficients
from .schedules import SCHEDULES, alpha, sigma


@torch.library.custom_op("imm_kernels::combine", mutates_args=())
def combine(src0: Tensor, src1: Tensor | None, time0: Tensor | None, time0_value: float, time1: Tensor | None,
            time1_value: float, kind: str, outputs: int, transpose: bool, write0: bool, write1: bool, schedule: str,
            param: str, sigma_data: float, backend: str) -> tuple[Tensor, Tensor]:
    """dst_o = sum_i C[o][i] src_i per sample (C transposed when `transpose`) for same-shaped (B, ...) sources;
    the coefficients of `kind` ("interpolate" or "imm_output", with `outputs` forward outputs) come from the
    times: a (B,) or 0-d float32/float64 tensor, or None for the plain value beside it. Returns (dst0, dst1), an
    unwritten one as an empty tensor."""
    _validate.op_rows(1, ("src0", src0), *((("src1", src1),) if src1 is not None else ()))
    _validate.choice("kind", kind, tuple(_native.COMBINE_KIND_CODES))
    _validate.imm_output_options(schedule, param, sigma_data)
    return _native.op_outputs(src0, *_dispatch.implementation("combine", backend)(
        src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1, schedule, param,
        sigma_data, backend))


@combine.register_fake
def _(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1, schedule, param,
      sigma_data, backend):
    return _native.op_outputs(src0, *_native.output_pair(src0, write0, write1))


_dispatch.register_custom_op("combine", torch.ops.imm_kernels.combine)


@_dispatch.register("combine", "cpu")
def _native_combine(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1,
                    schedule, param, sigma_data, backend):
    _validate.native_scalar("time0", time0, src0.shape[0], src0)
    _validate.native_scalar("time1", time1, src0.shape[0], src0)
    dst0, dst1 = _native.output_pair(src0, write0, write1)
    s0, row0, step0, features = _native.operand(src0)
    s1, row1, step1, _ = _native.operand(src1) if src1 is not None else (None, 0, 0, 0)
    _native.module(backend).combine(
        src0.shape[0], features, _native.DTYPE_CODES[src0.dtype], _native.COMBINE_KIND_CODES[kind],
        _native.SCHEDULE_CODES[schedule], _native.PARAM_CODES[param], sigma_data,
        *_native.scalar_args(time0, time0_value, time1, time1_value), outputs, transpose,
        src0.is_cpu and not transpose, s0.data_ptr(), row0, step0, _native.ptr(s1), row1, step1, _native.ptr(dst0),
        _native.ptr(dst1), _native.launch_arg(src0))
    return dst0, dst1


@_dispatch.register("combine", "cuda")
def _cuda_combine(*arguments):
    """The cuda backend: the GPU-verified kernel, or with IMM_CUDA_KERNELS=next that of the current contract."""
    if _dispatch.variant("IMM_CUDA_KERNELS") == "next":
        return _native_combine(*arguments)
    return _verified_cuda_combine(*arguments)


def _verified_cuda_combine(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0,
                           write1, schedule, param, sigma_data, backend):
    """The GPU-verified kernel (csrc/cuda/verified.h): packed sources and times in the accumulation dtype."""
    _validate.native_scalar("time0", time0, src0.shape[0], src0)
    _validate.native_scalar("time1", time1, src0.shape[0], src0)
    dst0, dst1 = _native.output_pair(src0, write0, write1)
    rows, acc, device = src0.shape[0], _validate.accumulation_dtype(src0.dtype), src0.device

    def times(tensor, value):
        if tensor is None:
            return torch.full((1,), value, dtype=acc, device=device).expand(rows)
        return tensor.to(acc).expand(rows)

    def packed(x):
        return None if x is None else x.reshape(rows, -1).contiguous()

    t0, t1 = times(time0, time0_value), times(time1, time1_value)
    s0, s1 = packed(src0), packed(src1)
    _native.module("cuda").verified_combine(
        rows, s0.shape[1], _native.DTYPE_CODES[src0.dtype], _native.COMBINE_KIND_CODES[kind],
        _native.SCHEDULE_CODES[schedule], _native.PARAM_CODES[param], sigma_data, t0.data_ptr(), t0.stride(0),
        t1.data_ptr(), t1.stride(0), outputs, s0.data_ptr(), _native.ptr(s1), _native.ptr(dst0), _native.ptr(dst1),
        transpose, _native.launch_arg(src0))
    return dst0, dst1


# ---- Autograd: one set of formulas, two entry points (as in mmd.py) ----
# Eager calls and the functorch transforms apply _Combine over the backend's implementation; the same formulas are
# registered on imm_kernels::combine itself (what torch.compile traces, torch.ops callers and opcheck get), and its
# batching rule serves torch.vmap. Gradients of the sources: the transposed op. Gradients of the times: closed-form
# derivatives of the schedule coefficients (torch.func.vjp over the (B,) coefficient formulas of imm.py and
# schedules.py, never over a (B, D) tensor) against per-sample dot products of the gradients and the sources,
# which are saved only when a time requires grad.


def coefficient_matrix(kind: str, outputs: int, time0, time1, schedule: str, param: str, sigma_data: float):
    """C[o][i], per-sample (or scalar) tensors of the forward map dst_o = sum_i C[o][i] src_i."""
    if kind == "interpolate":
        return [[alpha(time, schedule), sigma(time, schedule)] for time in (time0, time1)[:outputs]]
    return [list(output_coefficients(time0, time1, schedule=schedule, param=param, sigma_data=sigma_data))]


def _coefficient_derivatives(times, spec, needs) -> list:
    """[k][o][i]: dC[o][i] / d time_k per sample (float64), for the times in needs (None for the others). Each
    coefficient of a sample depends on that sample's times only, so the gradient of its sum over the samples is its
    derivative (torch.func.vjp: it also runs inside the functorch transforms and forward-mode AD)."""
    time0_value, time1_value, kind, outputs, _, schedule, param, sigma_data, _ = spec
    primals = tuple(time.double() if time is not None else torch.tensor(value, dtype=torch.float64)
                    for time, value in zip(times, (time0_value, time1_value)))

    def flat_matrix(time0, time1):
        return tuple(c for row in coefficient_matrix(kind, outputs, time0, time1, schedule, param, sigma_data)
                     for c in row)

    flat, pullback = torch.func.vjp(flat_matrix, *primals)
    per_coefficient = [pullback(tuple(torch.ones_like(c) if j == index else torch.zeros_like(c)
                                      for j, c in enumerate(flat)))
                       for index in range(len(flat))]
    return [None if not need else [[per_coefficient[o * 2 + i][k] for i in range(2)] for o in range(len(flat) // 2)]
            for k, need in enumerate(needs)]


def _rows(x: Tensor, like: Tensor) -> Tensor:
    """A (B,) per-sample factor shaped to broadcast over like's features."""
    return x.reshape(-1, *([1] * (like.dim() - 1)))


def _time_gradients(ctx, saved, grads) -> list:
    """d loss / d time_k = sum over (o, i) of dC[o][i]/dtime_k <grad of dst, src> per sample, for forward maps
    (dst_o from src_i) and transposed ones (dst_i from src_o) alike."""
    time0, time1, src0, src1 = saved
    spec = ctx.spec
    transpose = spec[4]
    derivatives = _coefficient_derivatives((time0, time1), spec, ctx.needs[2:])
    acc = torch.float64 if src0.dtype == torch.float64 else torch.float32
    sources = (src0, src1)

    def dot(a, b):
        if a is None or b is None:
            return None
        return (a.to(acc) * b.to(acc)).reshape(a.shape[0], -1).sum(1)

    result = []
    for time, per_time in zip((time0, time1), derivatives):
        if per_time is None:
            result.append(None)
            continue
        total = torch.zeros(src0.shape[0], dtype=acc, device=src0.device)
        for o, row in enumerate(per_time):
            for i, derivative in enumerate(row):
                product = dot(grads[i], sources[o]) if transpose else dot(grads[o], sources[i])
                if product is not None:
                    total = total + derivative.to(acc) * product
        result.append(total.to(time.dtype).sum_to_size(time.shape))
    return result


def _reference_gradients(ctx, saved, grads) -> list:
    """Gradients that can be differentiated again with a time that requires grad: the same map written with
    PyTorch ops (the sources are saved in that case), through torch.func.vjp as in mmd._reference_gradients."""
    inputs = (saved[2], saved[3], saved[0], saved[1])  # (src0, src1, time0, time1)
    time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, _ = ctx.spec
    wanted = [index for index, need in enumerate(ctx.needs) if need]

    def mapped(*variables):
        src0, src1, time0, time1 = _dispatch.replaced(inputs, wanted, variables)
        matrix = coefficient_matrix(kind, outputs, time0 if time0 is not None else time0_value,
                                    time1 if time1 is not None else time1_value, schedule, param, sigma_data)
        sources, dst = (src0, src1), [0, 0]
        for o, row in enumerate(matrix):
            for i, c in enumerate(row):
                to, frm = (i, o) if transpose else (o, i)
                if sources[frm] is not None:
                    dst[to] = dst[to] + _rows(c, src0) * sources[frm]
        return tuple(d for d, g in zip(dst, grads) if g is not None)

    result = iter(torch.func.vjp(mapped, *(inputs[index] for index in wanted))[1](
        tuple(g for g in grads if g is not None)))
    return [next(result) if need else None for need in ctx.needs]


def _setup(ctx, src0, src1, time0, time1, spec, write0, write1, output, needs) -> None:
    for dst, written in zip(output, (write0, write1)):
        if not written and dst is not None:  # the custom op's empty placeholder (the implementations give None)
            ctx.mark_non_differentiable(dst)
    ctx.set_materialize_grads(False)  # an output nobody used (x_r of interpolate_pair under no_grad) costs nothing
    keep_sources = needs[2] or needs[3]  # only the times' gradients read the sources
    ctx.save_for_backward(time0, time1, src0 if keep_sources else None, src1 if keep_sources else None)
    ctx.transformed = _dispatch.transforming()
    if ctx.transformed:  # forward mode may follow (jvp): it reads the sources
        ctx.save_for_forward(time0, time1, src0, src1)
    ctx.spec, ctx.needs = spec, needs


def _gradients(ctx, grad0, grad1) -> list:
    """[grad src0, grad src1, grad time0, grad time1], None where not needed."""
    needs = ctx.needs
    if grad0 is None and grad1 is None:
        return [None] * 4
    saved = _dispatch.saved_tensors(ctx)  # (time0, time1, src0, src1), the sources where a time needs a gradient
    if (needs[2] or needs[3]) and _dispatch.differentiable_backward(grad0 if grad0 is not None else grad1, saved):
        return _reference_gradients(ctx, saved, (grad0, grad1))
    time0, time1 = saved[:2]
    time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, backend = ctx.spec
    if grad0 is None:  # only the second destination was used
        grad0 = torch.zeros_like(grad1)
    in0 = in1 = None
    if needs[0] or needs[1]:  # the transposed map, itself differentiable under create_graph=True
        reverse = (time0_value, time1_value, kind, outputs, not transpose, schedule, param, sigma_data, backend)
        in0, in1 = combine_call(grad0, grad1, time0, time1, reverse, needs[0], needs[1])
    times = _time_gradients(ctx, saved, (grad0, grad1)) if needs[2] or needs[3] else [None, None]
    return [in0 if needs[0] else None, in1 if needs[1] else None, *times]


def _tangents(ctx, tangent0, tangent1, tangent_time0, tangent_time1):
    """Forward mode: the map is linear in the sources (the same op on their tangents) plus, for times with a
    tangent, sum over (o, i) of dC[o][i]/dtime tangent_time src_i."""
    time0, time1, src0, src1 = _dispatch.saved_tensors(ctx)
    spec = ctx.spec
    transpose = spec[4]
    write = (ctx.write0, ctx.write1)
    out = [None, None]
    if tangent0 is not None or tangent1 is not None:
        if tangent0 is None:
            tangent0 = torch.zeros_like(src0)
        out = list(combine_call(tangent0, tangent1, time0, time1, spec, *write))
    time_tangents = (tangent_time0, tangent_time1)
    derivatives = _coefficient_derivatives((time0, time1), spec, [t is not None for t in time_tangents])
    sources = (src0, src1)
    for per_time, tangent in zip(derivatives, time_tangents):
        if per_time is None:
            continue
        for o, row in enumerate(per_time):
            for i, derivative in enumerate(row):
                dst, src = (i, o) if transpose else (o, i)
                if sources[src] is None or not write[dst]:
                    continue
                term = _rows((derivative * tangent.double()).to(src0.dtype), src0) * sources[src]
                out[dst] = term if out[dst] is None else out[dst] + term
    return tuple((x if x is not None else torch.zeros_like(src0)) if written else None  # None: a placeholder
                 for x, written in zip(out, write))


class _Combine(_dispatch.Function):
    """The eager entry point: imm_kernels::combine's implementation with the formulas above. spec: the op's
    arguments after the times' tensors, without the write flags: (time0_value, time1_value, kind, outputs,
    transpose, schedule, param, sigma_data, backend), one argument because Function.apply costs per argument."""

    generate_vmap_rule = True

    @staticmethod
    def forward(src0, src1, time0, time1, spec, write0, write1):
        time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, backend = spec
        return _dispatch.call("combine", backend)(src0, src1, time0, time0_value, time1, time1_value, kind, outputs,
                                                  transpose, write0, write1, schedule, param, sigma_data, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        src0, src1, time0, time1, spec, write0, write1 = inputs
        ctx.write0, ctx.write1 = write0, write1
        _setup(ctx, src0, src1, time0, time1, spec, write0, write1, output, ctx.needs_input_grad[:4])

    @staticmethod
    def backward(ctx, grad0, grad1):
        return (*_gradients(ctx, grad0, grad1), None, None, None)

    @staticmethod
    def jvp(ctx, tangent0, tangent1, tangent_time0, tangent_time1, _spec, _write0, _write1):
        return _tangents(ctx, tangent0, tangent1, tangent_time0, tangent_time1)


def combine_call(src0, src1, time0, time1, spec, write0: bool, write1: bool):
    """The op on a native or Triton backend, through _Combine where gradients are recorded: (dst0, dst1), an
    unwritten one an empty placeholder."""
    if not torch.compiler.is_compiling() and (_dispatch.transforming() or torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (src0, src1, time0, time1))):
        return _Combine.run(src0, src1, time0, time1, spec, write0, write1)
    # Eager without gradients: the implementation; under torch.compile: the op with its registered autograd (Dynamo
    # refuses a Function's jvp).
    time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, backend = spec
    return _dispatch.call("combine", backend)(src0, src1, time0, time0_value, time1, time1_value, kind, outputs,
                                              transpose, write0, write1, schedule, param, sigma_data, backend)


def _op_setup_context(ctx, inputs, output):
    src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1, *rest = inputs
    needs = ctx.needs_input_grad
    ctx.write0, ctx.write1 = write0, write1
    _setup(ctx, src0, src1, time0, time1, (time0_value, time1_value, kind, outputs, transpose, *rest), write0, write1,
           output, (needs[0], needs[1], needs[2], needs[4]))


def _op_backward(ctx, grad0, grad1):
    in0, in1, grad_time0, grad_time1 = _gradients(ctx, grad0, grad1)
    return in0, in1, grad_time0, None, grad_time1, *(None,) * 10


torch.library.register_autograd("imm_kernels::combine", _op_backward, setup_context=_op_setup_context)


@torch.library.register_vmap("imm_kernels::combine")
def _combine_vmap(info, in_dims, src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0,
                  write1, schedule, param, sigma_data, backend):
    """A batch of n problems is one problem of n B samples."""
    n = info.batch_size
    src0 = _native.stacked(src0, in_dims[0], n)
    src1 = _native.stacked(src1, in_dims[1], n) if src1 is not None else None
    rows = src0.shape[0] // n
    dst = torch.ops.imm_kernels.combine(src0, src1, _native.stacked_per_row(time0, in_dims[2], n, rows), time0_value,
                                        _native.stacked_per_row(time1, in_dims[4], n, rows), time1_value, kind,
                                        outputs, transpose, write0, write1, schedule, param, sigma_data, backend)
    return tuple(_native.unstacked(d, n) for d in dst), tuple(0 if d.numel() else None for d in dst)


def _backend(name0: str, in0, name1: str, in1, backend: str):
    """Checks the two same-shaped inputs (promoted to one dtype under autocast) -> (in0, in1, concrete backend)."""
    in0, in1 = _validate.matching_dtypes(name0, in0, name1, in1)
    _validate.float_tensor(name0, in0)
    _validate.float_tensor(name1, in1)
    _validate.same_batch(name0, in0, name1, in1)
    return in0, in1, _dispatch.resolve("combine", backend, in0.device)


def _run(in0, in1, times, kind: str, outputs: int, schedule: str, param: str, sigma_data: float, backend: str):
    """Checks the two times ((name, value) each) and runs `kind` on a native or Triton backend. Inputs dense in
    another memory order (channels-last) run in that order, and their outputs keep it."""
    batch, device = in0.shape[0], in0.device
    (time0, value0), (time1, value1) = (_validate.time_operand(name, value, batch, device) for name, value in times)
    if kind == "imm_output" and time0 is None and time1 is None and value0 > value1:
        raise ValueError(f"{times[0][0]} must be <= {times[1][0]} (the target time comes before the source time); "
                         f"got {value0} > {value1}")
    src0, src1 = _native.memory_order(in0, in1)
    spec = (value0, value1, kind, outputs, False, schedule, param, sigma_data, backend)
    out0, out1 = combine_call(src0, src1, time0, time1, spec, True, outputs == 2)
    out0 = _native.restore_order(in0, src0, out0)
    return (out0, _native.restore_order(in0, src0, out1)) if outputs == 2 else out0


def interpolate(x: Tensor, noise: Tensor, t, *, schedule: str = "fm", backend: str = "auto") -> Tensor:
    """x_t = alpha_t x + sigma_t noise; t a float or (B,) per-sample times in [0, 1]."""
    _validate.choice("schedule", schedule, SCHEDULES)
    x, noise, backend = _backend("x", x, "noise", noise, backend)
    if backend == "reference":
        return reference.interpolate(x, noise, t, schedule=schedule)
    return _run(x, noise, (("t", t), ("t", t)), "interpolate", 1, schedule, "simple_edm", 1.0, backend)


def interpolate_pair(x: Tensor, noise: Tensor, t, r, *, schedule: str = "fm", backend: str = "auto"):
    """(x_t, x_r) from the same x and noise in one pass over them."""
    _validate.choice("schedule", schedule, SCHEDULES)
    x, noise, backend = _backend("x", x, "noise", noise, backend)
    if backend == "reference":
        return reference.interpolate_pair(x, noise, t, r, schedule=schedule)
    return _run(x, noise, (("t", t), ("r", r)), "interpolate", 2, schedule, "simple_edm", 1.0, backend)


def imm_output(x_t: Tensor, g: Tensor, s, t, *, schedule: str = "fm", param: str = "simple_edm",
               sigma_data: float = 0.5, backend: str = "auto") -> Tensor:
    """f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) g for the network output g; s <= t.
    param: "simple_edm", "euler_fm" (fm only) or "identity" (DDIM(x_t, g, s, t))."""
    sigma_data = _validate.imm_output_options(schedule, param, sigma_data)
    x_t, g, backend = _backend("x_t", x_t, "g", g, backend)
    if backend == "reference":
        return reference.imm_output(x_t, g, s, t, schedule=schedule, param=param, sigma_data=sigma_data)
    return _run(x_t, g, (("s", s), ("t", t)), "imm_output", 1, schedule, param, sigma_data, backend)


def ddim(x_t: Tensor, x_hat: Tensor, s, t, *, schedule: str = "fm", backend: str = "auto") -> Tensor:
    """DDIM(x_t, x_hat, s, t): moves x_t at time t to time s <= t given the clean estimate x_hat."""
    _validate.choice("schedule", schedule, SCHEDULES)
    x_t, x_hat, backend = _backend("x_t", x_t, "x_hat", x_hat, backend)
    if backend == "reference":
        return reference.ddim(x_t, x_hat, s, t, schedule=schedule)
    return _run(x_t, x_hat, (("s", s), ("t", t)), "imm_output", 1, schedule, "identity", 1.0, backend)

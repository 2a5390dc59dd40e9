"""imm_mmd_loss: IMM's loss head, the grouped MMD between the outputs f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) g_t
and f_{s,r}(x_r) = c_skip(s, r) x_r + c_out(s, r) g_r (docs/math.md sections 3-4), from the four tensors and one
(s, r, t) per group, without materialising either output.

The kernels are mmd_loss's with a mix (csrc/common/problems.h OutputMix): each side's rows are formed where they are
loaded, and the backward's per-group scale carries c_out, so its gradient is g's. Bytes of a training step, in units
of one (B, D) tensor:
- composed from the ops: 13 (imm_output twice, 3 each; mmd_loss forward 2 and backward 3; imm_output's backward 2);
- fused: 9 (forward reads x_t, g_t, x_r, g_r; backward reads them again and writes grad g_t).
Saved state between the passes: mmd_loss's pair coefficients (mmd.py says why). Saving the two outputs instead would
move the same 9 units (forward 4 reads + 2 writes, backward 2 reads + 1 write) and hold two (B, D) tensors; the four
inputs re-read are alive in a training step anyway (the network's inputs and outputs), so the head holds no (B, D)
tensor of its own.

The fused kernels give the gradients of g_t and g_r. Where anything else needs one (x_t, x_r, times, bandwidth,
weight), under the functorch transforms, on the cuda backend (no GPU-proven fused kernel yet) and on the reference
backend, imm_mmd_loss is the composition imm_output + mmd_loss, with all of their derivatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _native, _validate, reference
from .imm import output_coefficients
from .interpolant import imm_output
from .mmd import _native_backward, _native_forward, check_backward_operands, forward_outputs, mmd_loss

_FUSED_BACKENDS = ("cpu", "triton")


def _check_mix(x_t, g_t, x_r, g_r, coefficients, group_size) -> None:
    """The loss head ops' rows and coefficients as torch.ops callers may pass them: what the kernels read."""
    groups = _validate.op_rows(group_size, ("x_t", x_t), ("g_t", g_t), ("x_r", x_r), ("g_r", g_r))
    if not (isinstance(coefficients, Tensor) and coefficients.dtype == torch.float64
            and coefficients.device == x_t.device and coefficients.shape == (groups, 4)
            and coefficients.is_contiguous()):
        raise ValueError(f"coefficients must be a contiguous float64 tensor of shape ({groups}, 4) on {x_t.device}; "
                         f"got {_validate.described(coefficients)}")


@torch.library.custom_op("imm_kernels::loss_head_forward", mutates_args=())
def loss_head_forward(x_t: Tensor, g_t: Tensor, x_r: Tensor, g_r: Tensor, coefficients: Tensor,
                      bandwidth: Tensor | None, bandwidth_value: float, weight: Tensor | None, weight_value: float,
                      group_size: int, kernel: str, estimator: str, eps: float, reduction: str, grad_t: bool,
                      grad_r: bool, backend: str) -> tuple[Tensor, Tensor]:
    """mmd_forward of the outputs c_skip x + c_out g of each side; coefficients: (G, 4) float64 rows (c_skip(s, t),
    c_out(s, t), c_skip(s, r), c_out(s, r)). grad_t, grad_r: whether g_t's, g_r's gradient will be wanted."""
    _check_mix(x_t, g_t, x_r, g_r, coefficients, group_size)
    _validate.mmd_options(x_t, x_r, group_size, kernel, bandwidth_value if bandwidth is None else bandwidth,
                          weight_value if weight is None else weight, estimator, eps, reduction)
    return _native.op_outputs(x_t, *_dispatch.implementation("loss_head_forward", backend)(
        x_t, g_t, x_r, g_r, coefficients, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel,
        estimator, eps, reduction, grad_t, grad_r, backend))


@loss_head_forward.register_fake
def _(x_t, g_t, x_r, g_r, coefficients, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel,
      estimator, eps, reduction, grad_t, grad_r, backend):
    return _native.op_outputs(x_t, *forward_outputs(x_t, group_size, bandwidth, weight, reduction, grad_t, grad_r,
                                                     backend))


@torch.library.custom_op("imm_kernels::loss_head_backward", mutates_args=())
def loss_head_backward(grad_output: Tensor, x_t: Tensor, g_t: Tensor, x_r: Tensor, g_r: Tensor, coefficients: Tensor,
                       saved: Tensor, group_size: int, grad_t: bool, grad_r: bool,
                       backend: str) -> tuple[Tensor, Tensor]:
    """The gradients of g_t and g_r (an unwanted one empty), scaled by grad_output, from the forward's state."""
    _check_mix(x_t, g_t, x_r, g_r, coefficients, group_size)
    check_backward_operands(grad_output, saved, group_size, grad_t, grad_r, backend, ("x_t", x_t), ("g_t", g_t),
                            ("x_r", x_r), ("g_r", g_r))
    return _native.op_outputs(g_t, *_dispatch.implementation("loss_head_backward", backend)(
        grad_output, x_t, g_t, x_r, g_r, coefficients, saved, group_size, grad_t, grad_r, backend))


@loss_head_backward.register_fake
def _(grad_output, x_t, g_t, x_r, g_r, coefficients, saved, group_size, grad_t, grad_r, backend):
    return _native.op_outputs(g_t, *_native.output_pair(g_t, grad_t, grad_r))


_dispatch.register_custom_op("loss_head_forward", torch.ops.imm_kernels.loss_head_forward)
_dispatch.register_custom_op("loss_head_backward", torch.ops.imm_kernels.loss_head_backward)


@_dispatch.register("loss_head_forward", "cpu")
def _cpu_forward(x_t, g_t, x_r, g_r, coefficients, bandwidth, bandwidth_value, weight, weight_value, group_size,
                 kernel, estimator, eps, reduction, grad_t, grad_r, backend):
    return _native_forward(x_t, x_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator,
                           eps, reduction, grad_t, grad_r, backend, mix=(g_t, g_r, coefficients))


@_dispatch.register("loss_head_backward", "cpu")
def _cpu_backward(grad_output, x_t, g_t, x_r, g_r, coefficients, saved, group_size, grad_t, grad_r, backend):
    return _native_backward(grad_output, x_t, x_r, saved, group_size, grad_t, grad_r, backend,
                            mix=(g_t, g_r, coefficients))


# ---- Autograd: g_t and g_r; one set of formulas for the eager Function and the op's registered autograd ----

def _setup(ctx, inputs, output, options) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output[1])  # x_t, g_t, x_r, g_r, coefficients, saved state
    ctx.options = options  # (bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, ..., backend)


def _gradients(ctx, grad_output: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(grad g_t, grad g_r); differentiable again (create_graph=True) through the reference formulation."""
    if grad_output is None:
        return None, None
    x_t, g_t, x_r, g_r, coefficients, saved = ctx.saved_tensors
    bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps, reduction, grad_t, grad_r, \
        backend = ctx.options
    if _dispatch.differentiable_backward(grad_output, (g_t, g_r)):
        rows = coefficients.repeat_interleave(group_size, 0).to(x_t.dtype).view(-1, 4, *([1] * (x_t.dim() - 1)))

        def loss(g_t, g_r):
            return reference.mmd_loss(rows[:, 0] * x_t + rows[:, 1] * g_t, rows[:, 2] * x_r + rows[:, 3] * g_r,
                                      group_size, kernel=kernel, estimator=estimator, eps=eps, reduction=reduction,
                                      bandwidth=bandwidth_value if bandwidth is None else bandwidth,
                                      weight=weight_value if weight is None else weight)

        grads = torch.func.vjp(loss, g_t, g_r)[1](grad_output)
        return grads[0] if grad_t else None, grads[1] if grad_r else None
    out_t, out_r = _dispatch.call("loss_head_backward", backend)(grad_output, x_t, g_t, x_r, g_r, coefficients,
                                                                 saved, group_size, grad_t, grad_r, backend)
    return (out_t if grad_t else None), (out_r if grad_r else None)


class _LossHead(_dispatch.Function):
    """The eager entry point. options: loss_head_forward's arguments after coefficients, in one argument."""

    @staticmethod
    def forward(x_t, g_t, x_r, g_r, coefficients, options):
        return _dispatch.call("loss_head_forward", options[-1])(x_t, g_t, x_r, g_r, coefficients, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs[:5], output, inputs[5])

    @staticmethod
    def backward(ctx, grad_output, _grad_saved):
        grad_t, grad_r = _gradients(ctx, grad_output)
        return None, grad_t, None, grad_r, None, None


_OTHER_INPUTS = {0: "x_t", 2: "x_r", 4: "coefficients", 5: "bandwidth", 7: "weight"}


def _op_setup_context(ctx, inputs, output):
    for index, name in _OTHER_INPUTS.items():
        if ctx.needs_input_grad[index]:
            raise RuntimeError(f"imm_kernels::loss_head_forward differentiates g_t and g_r only; {name} requires grad: "
                               "call imm_kernels.imm_mmd_loss, which composes imm_output and mmd_loss then")
    _setup(ctx, inputs[:5], output, inputs[5:])


def _op_backward(ctx, grad_output, _grad_saved):
    grad_t, grad_r = _gradients(ctx, grad_output)
    return None, grad_t, None, grad_r, *(None,) * 13


torch.library.register_autograd("imm_kernels::loss_head_forward", _op_backward, setup_context=_op_setup_context)


def _group_times(name: str, value, groups: int, device: torch.device) -> Tensor:
    """A time (float or 0-d / (G,) tensor, checked in [0, 1]) as a (G,) tensor, float64 for a float."""
    tensor, number = _validate.time_operand(name, value, groups, device)
    _validate.time_values(name, tensor)
    if tensor is None:
        return torch.full((groups,), number, dtype=torch.float64, device=device)
    return tensor


def imm_mmd_loss(x_t: Tensor, g_t: Tensor, x_r: Tensor, g_r: Tensor, s, r, t, group_size: int, *,
                 schedule: str = "fm", param: str = "simple_edm", sigma_data: float = 0.5, kernel: str = "laplace",
                 bandwidth=1.0, weight=None, estimator: str = "v", eps: float = 1e-8, reduction: str = "mean",
                 backend: str = "auto") -> Tensor:
    """mmd_loss(imm_output(x_t, g_t, s, t), imm_output(x_r, g_r, s, r), group_size, ...) in one fused pass each
    way: IMM's loss head (docs/math.md sections 3-4), the outputs formed where the kernels read them.

    x_t, g_t, x_r, g_r: (B, ...) of one shape and device (g the network's outputs; in one dtype, or under
    torch.autocast the widest of them); s, r, t: one time per group, floats or 0-d / (G,) tensors with
    s <= r <= t in [0, 1]; schedule, param, sigma_data: as imm_output; the rest as mmd_loss (bandwidth and
    weight per group, typically 1 / |c_out(s, t)| and the time weight).

    Differentiable in every input that requires grad: g_t and g_r by the fused kernels; x_t, x_r, the times,
    bandwidth and weight (and everything under torch.func) by composing imm_output and mmd_loss, which is also
    what the cuda and reference backends run.
    """
    for name, value in (("x_t", x_t), ("g_t", g_t), ("x_r", x_r), ("g_r", g_r)):
        _validate.float_tensor(name, value)
    x_t, g_t = _validate.matching_dtypes("x_t", x_t, "g_t", g_t)
    x_r, g_r = _validate.matching_dtypes("x_r", x_r, "g_r", g_r)
    x_t, x_r = _validate.matching_dtypes("x_t", x_t, "x_r", x_r)
    g_t, g_r = g_t.to(x_t.dtype), g_r.to(x_t.dtype)
    for name, other in (("g_t", g_t), ("g_r", g_r)):
        if other.shape != x_t.shape or other.device != x_t.device:
            raise ValueError(f"{name} must have x_t's shape {tuple(x_t.shape)} and device {x_t.device}; got "
                             f"{tuple(other.shape)} on {other.device}")
    groups, bw, bw_value, w, w_value, eps = _validate.mmd_options(x_t, x_r, group_size, kernel, bandwidth, weight,
                                                                  estimator, eps, reduction)
    sigma_data = _validate.imm_output_options(schedule, param, sigma_data)
    s, r, t = (_group_times(name, value, groups, x_t.device) for name, value in (("s", s), ("r", r), ("t", t)))
    _validate.ordered_values("s", s, "r", r)
    _validate.ordered_values("r", r, "t", t)
    backend = _dispatch.resolve("mmd", backend, x_t.device)
    differentiated = [v is not None and v.requires_grad for v in (x_t, x_r, s, r, t, bw, w)]
    # (Dynamo's tracing looks like a functorch transform to _dispatch.transforming: compiled, the op's own autograd.)
    transforming = not torch.compiler.is_compiling() and _dispatch.transforming()
    if backend not in _FUSED_BACKENDS or transforming or (torch.is_grad_enabled() and any(differentiated)):
        rows = [v.repeat_interleave(group_size) for v in (s, r, t)]
        y_t = imm_output(x_t, g_t, rows[0], rows[2], schedule=schedule, param=param, sigma_data=sigma_data,
                         backend=backend)
        y_r = imm_output(x_r, g_r, rows[0], rows[1], schedule=schedule, param=param, sigma_data=sigma_data,
                         backend=backend)
        return mmd_loss(y_t, y_r, group_size, kernel=kernel, bandwidth=bandwidth, weight=weight, estimator=estimator,
                        eps=eps, reduction=reduction, backend=backend)
    options = dict(schedule=schedule, param=param, sigma_data=sigma_data)
    coefficients = torch.stack([*output_coefficients(s.double(), t.double(), **options),
                                *output_coefficients(s.double(), r.double(), **options)], 1)
    x_t, g_t, x_r, g_r = _native.memory_order(x_t, g_t, x_r, g_r)
    grad_t, grad_r = (torch.is_grad_enabled() and g.requires_grad for g in (g_t, g_r))
    arguments = (bw, bw_value, w, w_value, group_size, kernel, estimator, eps, reduction, grad_t, grad_r, backend)
    if not (grad_t or grad_r):
        return _dispatch.call("loss_head_forward", backend)(x_t, g_t, x_r, g_r, coefficients, *arguments)[0]
    if torch.compiler.is_compiling():
        return torch.ops.imm_kernels.loss_head_forward(x_t, g_t, x_r, g_r, coefficients, *arguments)[0]
    return _LossHead.run(x_t, g_t, x_r, g_r, coefficients, arguments)[0]

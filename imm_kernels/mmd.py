"""mmd_loss: the grouped MMD of IMM (docs/math.md section 4), forward and backward one native call each.

Layers: mmd_loss / MMDLoss (validate, pick a backend) -> _EagerMMDLoss (autograd in eager mode; _MMDLoss under the
functorch transforms; under torch.compile the op's own registered autograd) -> the custom ops
imm_kernels::mmd_forward and imm_kernels::mmd_backward (opaque to torch.compile, with fakes for tracing and
batching rules for torch.vmap; in eager mode their implementation is called directly) -> the backend's
implementation.

The backward design: the forward pass saves each group's pair coefficients (G blocks of [6, M, M], flat, in the
accumulation dtype, csrc/common/mmd_math.h) and the backward pass makes the gradient from them and the inputs,
scaled by grad_output inside the kernel. Against making the gradient in the forward pass and scaling it in the
backward (what the GPU-verified CUDA kernels still do, below):
- bytes: the same 5 units of a (B, D) tensor per step (forward reads y_t, y_r; backward reads both and writes
  grad y_t; the other design writes the gradient in forward, then reads and writes it again to scale it);
- memory held between the passes: 6 G M^2 coefficients (0.2% of a gradient at M = 4, D = 3072) instead of a
  whole gradient; the inputs it keeps are alive in a training step anyway (the network's outputs);
- launches: one per direction, the scale inside; a forward-only call (evaluation) writes no gradient.
Groups of many rows and few features (M > D / 6) make the coefficients larger than a gradient: still right, in
O(G M^2) memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _dispatch, _native, _validate, reference

COEFFICIENT_BLOCKS = 6  # per group: the own, cross and gap coefficients of each side (mmd_math.h)


def forward_outputs(y_t: Tensor, group_size: int, bandwidth: Tensor | None, weight: Tensor | None,
                    reduction: str, grad_t: bool, grad_r: bool, backend: str):
    """The forward op's outputs, once its scalar operands are checked: the loss in the input dtype (a scalar, or
    one per group for reduction "none"), and what the backward op needs when a gradient will be wanted (else
    None): the coefficients, or with the GPU-verified CUDA kernels the gradients themselves ([n, B, ...] in the
    input dtype)."""
    groups = y_t.shape[0] // group_size
    if bandwidth is not None or weight is not None:
        _validate.native_scalar("bandwidth", bandwidth, groups, y_t)
        _validate.native_scalar("weight", weight, groups, y_t)
    out = y_t.new_empty(() if reduction != "none" else groups)
    saved = None
    if grad_t or grad_r:
        shape, dtype = _saved_layout(y_t, group_size, grad_t, grad_r, backend)
        saved = y_t.new_empty(shape) if dtype is y_t.dtype else y_t.new_empty(shape, dtype=dtype)
    if _native.POISON:
        _native.poison(out, saved)
    return out, saved


def _saved_layout(y_t: Tensor, group_size: int, grad_t: bool, grad_r: bool, backend: str) -> tuple:
    """(shape, dtype) of the forward op's saved state: with the GPU-verified CUDA kernels the gradients themselves,
    (n, B, ...) in y_t's dtype; else the coefficients, G blocks of (6, M, M) in the accumulation dtype, flat: an
    integer size is the cheapest allocation (0.7 us against 1.3 us for a 4-d shape on a CPU, 2026-12-02), and only
    the kernels read it."""
    if _saves_gradients(backend):
        return (grad_t + grad_r, *y_t.shape), y_t.dtype
    size = y_t.shape[0] // group_size * COEFFICIENT_BLOCKS * group_size * group_size
    return size, _validate.accumulation_dtype(y_t.dtype)


@torch.library.custom_op("imm_kernels::mmd_forward", mutates_args=())
def mmd_forward(y_t: Tensor, y_r: Tensor, bandwidth: Tensor | None, bandwidth_value: float, weight: Tensor | None,
                weight_value: float, group_size: int, kernel: str, estimator: str, eps: float, reduction: str,
                grad_t: bool, grad_r: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The reduced weight * MMD of (B, ...) inputs in groups of group_size rows, and the saved state of the
    backward op (see forward_outputs). bandwidth, weight: a 0-d or (G,) float32/float64 tensor, or None for the
    plain value beside it."""
    _validate.mmd_options(y_t, y_r, group_size, kernel, bandwidth_value if bandwidth is None else bandwidth,
                          weight_value if weight is None else weight, estimator, eps, reduction)
    return _native.op_outputs(y_t, *_dispatch.implementation("mmd_forward", backend)(
        y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps, reduction,
        grad_t, grad_r, backend))


@mmd_forward.register_fake
def _(y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps, reduction,
      grad_t, grad_r, backend):
    return _native.op_outputs(y_t, *forward_outputs(y_t, group_size, bandwidth, weight, reduction, grad_t, grad_r, backend))


@torch.library.custom_op("imm_kernels::mmd_backward", mutates_args=())
def mmd_backward(grad_output: Tensor, y_t: Tensor, y_r: Tensor, saved: Tensor, group_size: int, grad_t: bool,
                 grad_r: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The gradients (grad_t, grad_r, an unwanted one empty) of the loss scaled by grad_output (0-d, or (G,) for
    reduction "none"), from the forward op's saved state."""
    check_backward_operands(grad_output, saved, group_size, grad_t, grad_r, backend, ("y_t", y_t), ("y_r", y_r))
    out_t, out_r = _dispatch.implementation("mmd_backward", backend)(grad_output, y_t, y_r, saved, group_size, grad_t,
                                                                     grad_r, backend)
    return _native.op_outputs(y_t, out_t, out_r)


def check_backward_operands(grad_output, saved, group_size, grad_t, grad_r, backend, *rows) -> None:
    """A backward op's operands as torch.ops callers may pass them: rows (name, tensor) of one shape (the first:
    y_t's place), and, where a gradient is asked for, a grad_output and a saved state that the kernels can read
    (forward_outputs' sizes)."""
    groups = _validate.op_rows(group_size, *rows)
    if grad_t or grad_r:
        like = rows[0][1]
        shape, dtype = _saved_layout(like, group_size, grad_t, grad_r, backend)
        size = shape if isinstance(shape, int) else math.prod(shape)
        _validate.op_backward_state(grad_output, saved, groups, size, dtype, like)


@mmd_backward.register_fake
def _(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend):
    return _native.op_outputs(y_t, *_native.output_pair(y_t, grad_t, grad_r))


_dispatch.register_custom_op("mmd_forward", torch.ops.imm_kernels.mmd_forward)
_dispatch.register_custom_op("mmd_backward", torch.ops.imm_kernels.mmd_backward)


def _row_plan(y_t, y_r, group_size, backend, mix) -> tuple:
    """What both native calls read of the rows: (module, the leading arguments of both calls (pointers, strides,
    sizes, dtype), the mix's arguments, the tensors the pointers point into (y_t, y_r and the mix's rows, or packed
    copies that only the plan holds)). The eager path makes it once per step: the backward reuses the forward's."""
    t, r, stride_t, stride_r, features = _native.row_pair(y_t, y_r)
    leading = (t.data_ptr(), r.data_ptr(), stride_t, stride_r, y_t.shape[0] // group_size, group_size, features,
               _native.DTYPE_CODES[y_t.dtype])
    mix_args, mix_rows = (_native.NO_MIX, ()) if mix is None else _native.mix_arg(mix)
    return _native.module(backend), leading, mix_args, (t, r, *mix_rows)


def _planned_forward(y_t, y_r, bandwidth, weight, options, mix=None):
    """_native_forward's outputs and its row plan (_row_plan), from the eager entry point's arguments (options:
    see _op_arguments)."""
    bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, grad_t, grad_r, backend = options
    out, coefficients = forward_outputs(y_t, group_size, bandwidth, weight, reduction, grad_t, grad_r, backend)
    plan = module, leading, mix_args, _ = _row_plan(y_t, y_r, group_size, backend, mix)
    on_cpu = y_t.is_cpu
    workspace = counter = 0
    if not on_cpu:  # GPU kernels: scratch from torch's allocator, the reduction's counter
        scratch = y_t.new_empty(module.mmd_workspace_bytes(*leading[4:]), dtype=torch.uint8)
        workspace = scratch.data_ptr() if scratch.numel() else 0
        counter = _native.reduction_counter(y_t.device).data_ptr() if reduction != "none" else 0
    module.mmd_forward(
        *leading, _native.KERNEL_CODES[kernel], _native.ESTIMATOR_CODES[estimator],
        _native.REDUCTION_CODES[reduction], eps, *_native.scalar_args(bandwidth, bandwidth_value, weight, weight_value),
        out.data_ptr(), 0 if coefficients is None else coefficients.data_ptr(), on_cpu, workspace, counter, *mix_args,
        torch.get_num_threads() if on_cpu else _native.launch_arg(y_t))
    return out, coefficients, plan


def _planned_backward(plan, grad_output, saved, like, grad_t, grad_r):
    """_native_backward on a row plan; like: y_t (the gradients' shape, dtype and device)."""
    module, leading, mix_args, _ = plan
    out_t, out_r = _native.output_pair(like, grad_t, grad_r)
    module.mmd_backward(
        *leading, grad_output.data_ptr(), grad_output.stride(0) if grad_output.ndim else 0, saved.data_ptr(),
        out_t.data_ptr() if grad_t else 0, out_r.data_ptr() if grad_r else 0, *mix_args,
        torch.get_num_threads() if like.is_cpu else _native.launch_arg(like))
    return out_t, out_r


@_dispatch.register("mmd_forward", "cpu")
def _native_forward(y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps,
                    reduction, grad_t, grad_r, backend, mix=None):
    """The native forward (mmd_forward's arguments); mix: (f_t, f_r, coefficients) of the loss head
    (loss_head.py), y_t, y_r being x_t, x_r."""
    options = (bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, grad_t, grad_r, backend)
    return _planned_forward(y_t, y_r, bandwidth, weight, options, mix)[:2]


def _plans_rows(backend: str) -> bool:
    """Whether the backend's mmd_forward implementation is _native_forward (the eager path then keeps its row
    plan for the backward)."""
    return backend == "cpu" or (backend == "cuda" and not _saves_gradients(backend))


@_dispatch.register("mmd_backward", "cpu")
def _native_backward(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend, mix=None):
    """The native backward; with the loss head's mix (see _native_forward) the gradients are those of f_t, f_r."""
    return _planned_backward(_row_plan(y_t, y_r, group_size, backend, mix), grad_output, saved, y_t, grad_t, grad_r)


@_dispatch.register("mmd_forward", "cuda")
def _cuda_forward(*arguments):
    """The cuda backend: the GPU-verified kernels, or with IMM_CUDA_KERNELS=next those of the current contract."""
    if _dispatch.variant("IMM_CUDA_KERNELS") == "next":
        return _native_forward(*arguments)
    return _verified_cuda_forward(*arguments)


@_dispatch.register("mmd_backward", "cuda")
def _cuda_backward(*arguments):
    if _dispatch.variant("IMM_CUDA_KERNELS") == "next":
        return _native_backward(*arguments)
    return _verified_cuda_backward(*arguments)


def _verified_cuda_forward(y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel,
                           estimator, eps, reduction, grad_t, grad_r, backend):
    """The GPU-verified kernels (csrc/cuda/verified.h): per-group losses and the gradients of their weighted sum
    in one launch; the conversions, the reduction and (in backward) the scale are torch ops around it."""
    if estimator == "unpaired":
        raise ValueError("estimator='unpaired' is not in the GPU-verified CUDA kernels: use backend='triton', or "
                         "IMM_CUDA_KERNELS=next (not yet run on a GPU)")
    groups, device = y_t.shape[0] // group_size, y_t.device
    out, saved = forward_outputs(y_t, group_size, bandwidth, weight, reduction, grad_t, grad_r, backend)
    acc = _validate.accumulation_dtype(y_t.dtype)

    def per_group(tensor, value):
        if tensor is None:
            return torch.full((groups,), value, dtype=acc, device=device)
        return tensor.to(acc).expand(groups).contiguous()

    def packed(x):  # the verified kernels take row strides of at least D
        x, stride, features = _native.rows(x)
        return (x, stride, features) if stride >= features else _native.rows(x.contiguous())

    (t, stride_t, features), (r, stride_r, _) = packed(y_t), packed(y_r)
    weights = per_group(weight, weight_value)
    if reduction == "mean":
        weights = weights / groups
    loss = torch.empty(groups, dtype=acc, device=device)
    module = _native.module("cuda")
    sizes = (groups, group_size, features, _native.DTYPE_CODES[y_t.dtype])
    workspace = torch.empty(module.verified_mmd_workspace_bytes(*sizes), dtype=torch.uint8, device=device)
    grads = iter(saved if saved is not None else ())
    module.verified_mmd_fused(
        t.data_ptr(), r.data_ptr(), stride_t, stride_r, *sizes[:3], sizes[3], _native.KERNEL_CODES[kernel],
        _native.ESTIMATOR_CODES[estimator], eps, per_group(bandwidth, bandwidth_value).data_ptr(),
        weights.data_ptr(), loss.data_ptr(), next(grads).data_ptr() if grad_t else 0,
        next(grads).data_ptr() if grad_r else 0, workspace.data_ptr(), _native.launch_arg(y_t))
    out.copy_(loss if reduction == "none" else loss.sum())
    return out, saved


def _verified_cuda_backward(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend):
    groups = y_t.shape[0] // group_size
    scale = grad_output.reshape(groups, 1) if grad_output.dim() else grad_output
    grads = iter(saved)

    def scaled(wanted: bool) -> Tensor | None:
        return (next(grads).reshape(groups, -1) * scale).reshape(y_t.shape) if wanted else None

    return scaled(grad_t), scaled(grad_r)


# ---- Autograd: one set of formulas, two entry points ----
# Eager calls (and the functorch transforms) apply _MMDLoss, an autograd.Function over the backend's implementation:
# the custom op's own dispatch costs about 16 us a call on a CPU (2026-12-02), more than the whole kernel at small
# shapes. The same formulas are registered on imm_kernels::mmd_forward itself (register_autograd), which is what
# torch.compile traces and torch.ops callers and torch.library.opcheck get; the ops' batching rules
# (register_vmap) serve torch.vmap, under which _dispatch.call hands out the custom ops.
# The loss is differentiable in every floating input: y_t and y_r from the saved coefficients (one backward kernel),
# the weight from the per-group MMD (one forward kernel more, only when the weight requires grad), the bandwidth
# from the input gradients (below, _bandwidth_gradient).


def _op_arguments(y_t, y_r, bandwidth, weight, options):
    """mmd_forward's arguments from _MMDLoss's: options = (bandwidth_value, weight_value, group_size, kernel,
    estimator, eps, reduction, grad_t, grad_r, backend)."""
    return (y_t, y_r, bandwidth, options[0], weight, options[1], *options[2:])


def _setup(ctx, y_t, y_r, bandwidth, weight, options, saved, needs, transformed: bool) -> None:
    """What the custom op's and the transforms' entry points keep for the gradients: saved is the forward op's
    saved state (None when no input gradient was asked of it: only the weight needs one)."""
    ctx.save_for_backward(y_t, y_r, saved, bandwidth, weight)
    if transformed:  # forward mode may follow (jvp)
        ctx.save_for_forward(y_t, y_r, saved, bandwidth, weight)
    _gradient_state(ctx, needs, options, transformed)


def _gradient_state(ctx, needs, options, transformed: bool) -> None:
    """What _gradients reads besides the saved tensors: needs = which of (y_t, y_r, bandwidth, weight) need a
    gradient; transformed: whether a functorch transform or forward-mode AD is active (_dispatch.transforming())."""
    ctx.options, ctx.needs, ctx.transformed = options, needs, transformed
    # The training step's case, which _gradients serves with the backward kernel alone: no functorch level is
    # involved, and exactly the inputs among y_t and y_r that the forward made ready for (its grad flags) need
    # gradients.
    ctx.inputs_only = not (transformed or needs[2] or needs[3]) and (needs[0], needs[1]) == options[7:9]


def _group_scale(grad_output: Tensor, reduction: str, groups: int, dtype: torch.dtype) -> Tensor:
    """d loss / d (weight * MMD) of each group: grad_output (0-d, or (G,) for reduction "none"), over G for "mean"."""
    scale = grad_output.to(dtype)
    return scale / groups if reduction == "mean" else scale


def _bandwidth_gradient(ctx, saved, grad_output: Tensor, grad_t: Tensor, grad_r: Tensor) -> Tensor:
    """d loss / d bandwidth per group, (G,), from the input gradients grad_t, grad_r of the same grad_output.

    The kernel depends on bw and d only through bw d (laplace) or bw d^2 (rbf), so bw dk/dbw = (d / p) dk/dd with
    p = 1 or 2, and summed over a group's pairs (Euler's identity, d being homogeneous of degree 1 in the rows):
    bw dL/dbw = (1 / p) sum over the group's 2M rows of <y - mean, grad y> (the group's mean subtracted, which
    changes nothing since the gradients sum to 0, against cancellation). Pairs at d <= eps are flat in y but not in
    bw (k = exp(-bw eps / D)): for the V-statistic's diagonal (d = 0) that term is added in closed form; distinct
    rows closer than eps are left out (a term of relative size eps / D)."""
    y_t, y_r, _, bandwidth, weight = saved
    bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, *_ = ctx.options
    groups = y_t.shape[0] // group_size
    acc = _validate.accumulation_dtype(y_t.dtype)
    if kernel == "energy":  # no bandwidth in -d
        return torch.zeros(groups, dtype=acc, device=y_t.device)
    rows = [y.reshape(groups, group_size, -1).to(acc) for y in (y_t, y_r)]
    mean = (rows[0].sum(1, keepdim=True) + rows[1].sum(1, keepdim=True)) / (2 * group_size)
    dots = sum(((y - mean) * g.reshape(y.shape).to(acc)).sum((1, 2)) for y, g in zip(rows, (grad_t, grad_r)))
    bw = reference._per_group(bandwidth, bandwidth_value, groups, y_t, acc)
    grad = dots / ((1 if kernel == "laplace" else 2) * bw)
    if kernel == "laplace" and estimator == "v" and eps > 0:
        features = rows[0].shape[-1]
        floor = torch.exp(-bw * eps / features) * (eps / features) * (2.0 / group_size)
        weights = reference._per_group(weight, weight_value, groups, y_t, acc)
        scale = _group_scale(grad_output, reduction, groups, acc) * weights
        grad = grad - scale * floor
    return grad


def _weight_gradient(ctx, saved, grad_output: Tensor) -> Tensor:
    """d loss / d weight per group, (G,): the unweighted per-group MMD (one more forward kernel) times the scale."""
    y_t, y_r, _, bandwidth, _ = saved
    bandwidth_value, _, group_size, kernel, estimator, eps, reduction, *_, backend = ctx.options
    groups = y_t.shape[0] // group_size
    acc = _validate.accumulation_dtype(y_t.dtype)
    mmd = _dispatch.call("mmd_forward", backend)(y_t, y_r, bandwidth, bandwidth_value, None, 1.0, group_size, kernel,
                                                 estimator, eps, "none", False, False, backend)[0]
    return mmd.to(acc) * _group_scale(grad_output, reduction, groups, acc)


def _gradient_parts(ctx, saved, grad_output: Tensor, needs) -> list:
    """[grad y_t, grad y_r, per-group grad bandwidth, per-group grad weight] for grad_output, None where not in
    needs. The input gradients come from one backward kernel with the forward's gradient flags (the bandwidth's
    needs both)."""
    y_t, y_r, state, bandwidth, weight = saved
    options = ctx.options
    group_size, grad_t, grad_r, backend = options[2], options[7], options[8], options[9]
    need_t, need_r, need_bw, need_w = needs
    if (need_t and not grad_t) or ((need_r or need_bw) and not grad_r) or (need_bw and not grad_t):
        raise RuntimeError("mmd_forward: a gradient is wanted for an input whose grad flag was False: pass grad_t=True "
                           "(y_t, bandwidth) and grad_r=True (y_r, bandwidth) to the forward op")
    out_t = out_r = None
    if need_t or need_r or need_bw:
        out_t, out_r = _dispatch.call("mmd_backward", backend)(grad_output, y_t, y_r, state, group_size, grad_t,
                                                               grad_r, backend)
    return [out_t if need_t else None, out_r if need_r else None,
            _bandwidth_gradient(ctx, saved, grad_output, out_t, out_r) if need_bw else None,
            _weight_gradient(ctx, saved, grad_output) if need_w else None]


def _summed_to(grad: Tensor | None, operand: Tensor | None) -> Tensor | None:
    """A per-group gradient in the operand's dtype and shape (summed over the groups for a 0-d operand)."""
    return None if grad is None else grad.to(operand.dtype).sum_to_size(operand.shape)


def _reference_loss(ctx, saved, wanted):
    """(the saved (y_t, y_r, bandwidth, weight), the reference formulation's loss as a function of those at the
    indices `wanted`): for derivatives that must be differentiable again, in O(G (2M)^2 D) memory. torch.func.vjp
    and jvp of it compose with autograd and with the functorch levels around them, also where the inputs do not
    require grad at the level the derivative runs at."""
    inputs = (saved[0], saved[1], saved[3], saved[4])
    bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, *_ = ctx.options

    def loss(*variables):
        y_t, y_r, bandwidth, weight = _dispatch.replaced(inputs, wanted, variables)
        return reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, estimator=estimator, eps=eps,
                                  reduction=reduction, bandwidth=bandwidth_value if bandwidth is None else bandwidth,
                                  weight=weight_value if weight is None else weight)

    return inputs, loss


def _reference_gradients(ctx, saved, grad_output: Tensor) -> list:
    """Gradients that can be differentiated again (create_graph=True, torch.func.hessian)."""
    wanted = [index for index, need in enumerate(ctx.needs) if need]
    inputs, loss = _reference_loss(ctx, saved, wanted)
    grads = iter(torch.func.vjp(loss, *(inputs[index] for index in wanted))[1](grad_output))
    return [next(grads) if need else None for need in ctx.needs]


def _gradients(ctx, grad_output: Tensor, saved) -> list:
    """[grad y_t, grad y_r, grad bandwidth, grad weight], None for an input that needs none; saved: (y_t, y_r,
    forward state, bandwidth, weight)."""
    if ctx.inputs_only and not torch.is_grad_enabled() and grad_output is not None:  # the hot path
        y_t, y_r, state, _, _ = saved
        _, _, group_size, _, _, _, _, grad_t, grad_r, backend = ctx.options
        return [*_dispatch.call("mmd_backward", backend)(grad_output, y_t, y_r, state, group_size, grad_t, grad_r,
                                                         backend), None, None]
    if grad_output is None:  # the loss was not used
        return [None] * 4
    if _dispatch.differentiable_backward(grad_output, saved):
        return _reference_gradients(ctx, saved, grad_output)
    if torch.is_grad_enabled():  # a lone torch.func.grad level runs backward with grad mode on: nothing to record
        with torch.no_grad():
            grads = _gradient_parts(ctx, saved, grad_output, ctx.needs)
    else:
        grads = _gradient_parts(ctx, saved, grad_output, ctx.needs)
    return [*grads[:2], _summed_to(grads[2], saved[3]), _summed_to(grads[3], saved[4])]


def _tangent(ctx, tangent_t, tangent_r, tangent_bw, tangent_w) -> Tensor:
    """Forward mode: the loss's directional derivative, <gradient, tangent> from the gradients of a unit
    grad_output (one per group for reduction "none"), group by group."""
    tangents = (tangent_t, tangent_r, tangent_bw, tangent_w)
    saved = _dispatch.saved_tensors(ctx)  # (y_t, y_r, forward state, bandwidth, weight)
    y_t, y_r, _, bandwidth, weight = saved
    if torch.is_grad_enabled() and (_dispatch.grad_level_active() or any(
            x is not None and x.requires_grad for x in (y_t, y_r, bandwidth, weight))):
        # Reverse mode may differentiate this tangent (torch.func.jacrev of jacfwd): the reference's.
        wanted = [index for index, tangent in enumerate(tangents) if tangent is not None]
        inputs, loss = _reference_loss(ctx, saved, wanted)
        return torch.func.jvp(loss, tuple(inputs[i] for i in wanted), tuple(tangents[i] for i in wanted))[1]
    group_size, reduction = ctx.options[2], ctx.options[6]
    groups = y_t.shape[0] // group_size
    acc = _validate.accumulation_dtype(y_t.dtype)
    unit = torch.ones((groups,) if reduction == "none" else (), dtype=y_t.dtype, device=y_t.device)
    parts = _gradient_parts(ctx, saved, unit, [t is not None for t in tangents])
    total = torch.zeros(groups, dtype=acc, device=y_t.device)
    for index, (part, tangent) in enumerate(zip(parts, tangents)):
        if part is None:
            continue
        if index < 2:  # rows: summed per group
            total = total + (part.to(acc) * tangent.to(acc)).reshape(groups, -1).sum(1)
        else:  # per group
            total = total + part * tangent.to(acc).expand(groups)
    return (total if reduction == "none" else total.sum()).to(y_t.dtype)


def _mark_saved(ctx, saved) -> None:
    """For the entry points that return the saved state as an output (the custom op's schema, the transforms)."""
    if saved is not None:
        ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no zeros for the saved state's gradient


class _EagerMMDLoss(torch.autograd.Function):
    """The eager entry point outside the functorch transforms and torch.compile: in the old form (forward and
    setup in one Python call), the loss alone as its output, the saved state kept on ctx. Where the native
    kernels run directly its backward reuses the forward's row plan and calls the backward kernel straight away
    when only y_t and y_r need gradients (the training step); other gradients go through _gradients. options:
    mmd_forward's arguments after weight, bandwidth_value and weight_value first (see _op_arguments): one
    argument, because Function.apply costs per argument. Every step of this path counts: a small call costs about
    47 us on a CPU, 10 us of it this package's Python (docs/pytorch.md)."""

    @staticmethod
    def forward(ctx, y_t, y_r, bandwidth, weight, options):
        plan = None
        if _plans_rows(options[-1]) and not _dispatch.dispatch_mode_active():  # (mmd_loss checked the rest)
            out, state, plan = _planned_forward(y_t, y_r, bandwidth, weight, options)
        else:
            out, state = _dispatch.call("mmd_forward", options[-1])(*_op_arguments(y_t, y_r, bandwidth, weight,
                                                                                   options))
        if plan is None or _dispatch.saved_tensor_hooks_active():
            # Under saved-tensor hooks only what autograd saves may hold y_t and y_r (the plan does), and the state
            # goes through the hooks too.
            ctx.plan = None
            ctx.save_for_backward(y_t, y_r, bandwidth, weight, state)
        else:
            # The state stays on ctx: unpacked by autograd it would be wrapped in a new Python tensor, which costs
            # about 1 us of the backward.
            ctx.plan, ctx.state = plan, state
            ctx.save_for_backward(y_t, y_r, bandwidth, weight)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, grad_output):
        # (unpacking also makes autograd's check that nothing modified the inputs since the forward)
        y_t, y_r, bandwidth, weight, *state = ctx.saved_tensors
        needs = ctx.needs_input_grad
        plan = ctx.plan
        if plan is not None and not (needs[2] or needs[3] or torch.is_grad_enabled()) and _dispatch.direct():
            options = ctx.options
            return (*_planned_backward(plan, grad_output, ctx.state, y_t, options[7], options[8]), None, None,
                    None)
        _gradient_state(ctx, needs[:4], ctx.options, False)
        saved = (y_t, y_r, ctx.state if plan is not None else state[0], bandwidth, weight)
        return (*_gradients(ctx, grad_output, saved), None)


_eager_mmd_loss = _dispatch.eager_apply(_EagerMMDLoss)


class _MMDLoss(_dispatch.Function):
    """The entry point under the functorch transforms and forward-mode AD (_EagerMMDLoss's, in the form they
    need: setup_context, jvp). Under torch.vmap the forward and backward are vmapped through the custom ops'
    batching rules (generate_vmap_rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(y_t, y_r, bandwidth, weight, options):
        return _dispatch.call("mmd_forward", options[-1])(*_op_arguments(y_t, y_r, bandwidth, weight, options))

    @staticmethod
    def setup_context(ctx, inputs, output):
        y_t, y_r, bandwidth, weight, options = inputs
        _mark_saved(ctx, output[1])
        _setup(ctx, y_t, y_r, bandwidth, weight, options, output[1], ctx.needs_input_grad[:4],
               _dispatch.transforming())

    @staticmethod
    def backward(ctx, grad_output, _grad_saved):
        return (*_gradients(ctx, grad_output, _dispatch.saved_tensors(ctx)), None)

    @staticmethod
    def jvp(ctx, tangent_t, tangent_r, tangent_bw, tangent_w, _options):
        return _tangent(ctx, tangent_t, tangent_r, tangent_bw, tangent_w), None


def _op_setup_context(ctx, inputs, output):
    y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, *rest = inputs
    needs = ctx.needs_input_grad
    _mark_saved(ctx, output[1])
    _setup(ctx, y_t, y_r, bandwidth, weight, (bandwidth_value, weight_value, *rest), output[1],
           (needs[0], needs[1], needs[2], needs[4]), _dispatch.transforming())


def _op_backward(ctx, grad_output, _grad_saved):
    grad_t, grad_r, grad_bw, grad_w = _gradients(ctx, grad_output, _dispatch.saved_tensors(ctx))
    return grad_t, grad_r, grad_bw, None, grad_w, *(None,) * 9


torch.library.register_autograd("imm_kernels::mmd_forward", _op_backward, setup_context=_op_setup_context)


# ---- torch.vmap: a batch of problems is one problem with n times the groups ----

def _saves_gradients(backend: str) -> bool:
    """Whether the forward's saved state is the gradients themselves (the GPU-verified CUDA kernels)."""
    return backend == "cuda" and _dispatch.variant("IMM_CUDA_KERNELS") == "verified"


@torch.library.register_vmap("imm_kernels::mmd_forward")
def _mmd_forward_vmap(info, in_dims, y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel,
                      estimator, eps, reduction, grad_t, grad_r, backend):
    n = info.batch_size
    y_t, y_r = _native.stacked(y_t, in_dims[0], n), _native.stacked(y_r, in_dims[1], n)
    groups = y_t.shape[0] // (n * group_size)
    acc = _validate.accumulation_dtype(y_t.dtype)
    bandwidth = _native.stacked_per_row(bandwidth, in_dims[2], n, groups)
    # Per-group losses of all problems at once; the mean's 1/G goes into the weight, as the kernels fold it into
    # the saved coefficients, so the saved state is each problem's own.
    weight = _native.stacked_per_row(weight, in_dims[4], n, groups)
    weight = (torch.full((n * groups,), weight_value, dtype=acc, device=y_t.device) if weight is None
              else weight.to(acc)) / (groups if reduction == "mean" else 1)
    out, saved = torch.ops.imm_kernels.mmd_forward(y_t, y_r, bandwidth, bandwidth_value, weight, 0.0, group_size,
                                                   kernel, estimator, eps, "none", grad_t, grad_r, backend)
    losses = out.view(n, groups)
    if reduction != "none":
        losses = losses.sum(1, dtype=acc).to(out.dtype)
    if not saved.numel():
        return (losses, saved), (0, None)
    if _saves_gradients(backend):  # (k, n B, ...)
        return (losses, saved.view(saved.shape[0], n, -1, *saved.shape[2:])), (0, 1)
    return (losses, saved.view(n, -1)), (0, 0)


@torch.library.register_vmap("imm_kernels::mmd_backward")
def _mmd_backward_vmap(info, in_dims, grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend):
    n = info.batch_size
    y_t, y_r = _native.stacked(y_t, in_dims[1], n), _native.stacked(y_r, in_dims[2], n)
    rows = y_t.shape[0] // n
    groups = rows // group_size
    grad_output = _native.stacked_per_row(grad_output, in_dims[0], n, groups)  # one scale per merged group
    if _saves_gradients(backend):
        saved = saved.movedim(in_dims[3], 1) if in_dims[3] is not None else saved.unsqueeze(1).expand(
            saved.shape[0], n, *saved.shape[1:])
        saved = saved.reshape(saved.shape[0], n * rows, *saved.shape[3:])
    else:
        saved = _native.stacked(saved, in_dims[3], n)
    out_t, out_r = torch.ops.imm_kernels.mmd_backward(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r,
                                                      backend)
    return tuple(_native.unstacked(g, n) for g in (out_t, out_r)), tuple(0 if g.numel() else None
                                                                        for g in (out_t, out_r))


def mmd_loss(y_t: Tensor, y_r: Tensor, group_size: int, *, kernel: str = "laplace", bandwidth=1.0, weight=None,
             estimator: str = "v", eps: float = 1e-8, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Grouped MMD between y_t and y_r (docs/math.md section 4).

    y_t, y_r: (B, ...) of one shape and device; B = G * group_size, groups are consecutive rows and features
    are flattened to D. kernel: "laplace" exp(-bw max(d, eps) / D), "rbf" exp(-bw d^2 / D) or "energy" -d (no
    bandwidth), d the Euclidean distance of two rows; the gradient at d = 0 is 0.
    bandwidth, weight: floats or 0-d / (G,) tensors; weight None means 1.
    estimator: "v" (the full M x M, paper Eq. 67), "u" (self terms without i = j, over M (M - 1)) or "unpaired"
    (every term without i = j, over M (M - 1): y_t^i never meets its partner y_r^i, so the estimate stays unbiased
    when partners are dependent, as IMM's are; docs/gaussian.md).
    reduction: "mean" over groups, "sum", or "none" for the (G,) per-group losses.
    backend: "auto", "reference", "cpu", "triton" or "cuda". Output and gradients are in the input dtype,
    accumulated in float32 (float64 for float64 inputs); inputs of two dtypes run in the wider one under
    torch.autocast and are refused outside it.

    Differentiable in y_t, y_r, a bandwidth tensor and a weight tensor (whichever require grad), also under
    torch.func (grad, vjp, jvp, vmap). Gradients of gradients (create_graph=True) come from the reference
    formulation. The bandwidth's gradient leaves out distinct rows closer than eps (a term of relative size
    eps / D).
    """
    device = _validate.plain_mmd_device(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction)
    if device is not None:  # (the common case: no bandwidth or weight tensor)
        bw, bw_value, w, w_value = None, bandwidth, None, 1.0
        learned_bandwidth = learned_weight = False
    else:
        y_t, y_r = _validate.matching_dtypes("y_t", y_t, "y_r", y_r)
        _, bw, bw_value, w, w_value, eps = _validate.full_mmd_options(y_t, y_r, group_size, kernel, bandwidth,
                                                                      weight, estimator, eps, reduction)
        device = y_t.device
        learned_bandwidth = bw is not None and bw.requires_grad
        learned_weight = w is not None and w.requires_grad
    backend = _dispatch.resolve("mmd", backend, device)
    if backend == "reference":
        return reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, bandwidth=bandwidth, weight=weight,
                                  estimator=estimator, eps=eps, reduction=reduction)
    if not y_t.is_contiguous():  # (memory_order's own first test: spares the common case its call)
        y_t, y_r = _native.memory_order(y_t, y_r)
    transforming = _dispatch.transforming()
    need_t, need_r = y_t.requires_grad, y_r.requires_grad
    if transforming or torch.is_grad_enabled() and (need_t or need_r or learned_bandwidth or learned_weight):
        # The gradient flags of the forward op: the bandwidth's gradient needs both sides' (_bandwidth_gradient).
        grad_t = transforming or need_t or learned_bandwidth
        grad_r = transforming or need_r or learned_bandwidth
        options = (bw_value, w_value, group_size, kernel, estimator, eps, reduction, grad_t, grad_r, backend)
        if torch.compiler.is_compiling():  # the op with its registered autograd (Dynamo refuses a Function's jvp)
            return torch.ops.imm_kernels.mmd_forward(*_op_arguments(y_t, y_r, bw, w, options))[0]
        if transforming:
            return _MMDLoss.run(y_t, y_r, bw, w, options)[0]
        live = _dispatch.live_tensor
        return _eager_mmd_loss(live(y_t), live(y_r), bw if bw is None else live(bw), w if w is None else live(w),
                               options)
    return _dispatch.call("mmd_forward", backend)(y_t, y_r, bw, bw_value, w, w_value, group_size, kernel, estimator,
                                                  eps, reduction, False, False, backend)[0]


class MMDLoss(torch.nn.Module):
    """Module form of mmd_loss: the keyword arguments are fixed (and checked) at construction. Tensor
    bandwidth / weight are buffers: in state_dict, moved by .to(), shown in repr."""

    def __init__(self, group_size: int, *, kernel: str = "laplace", bandwidth=1.0, weight=None, estimator: str = "v",
                 eps: float = 1e-8, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _validate.choice("kernel", kernel, _validate.KERNELS)
        _validate.choice("estimator", estimator, _validate.ESTIMATORS)
        _validate.choice("reduction", reduction, _validate.REDUCTIONS)
        _validate.positive_int("group_size", group_size, minimum=_validate.smallest_group(estimator))
        _validate.real("eps", eps, nonnegative=True)
        if not isinstance(backend, str) or backend not in _dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, _dispatch.BACKENDS))}; got {backend!r}")
        self.group_size, self.kernel, self.estimator, self.eps = group_size, kernel, estimator, float(eps)
        self.reduction, self.backend = reduction, backend
        self._set_operand("bandwidth", bandwidth, positive=True)
        self._set_operand("weight", 1.0 if weight is None else weight, positive=False)

    def _set_operand(self, name: str, value, *, positive: bool) -> None:
        """A tensor becomes a buffer (checked for shape, dtype and, on CPU, sign); a float an attribute."""
        if isinstance(value, torch.Tensor):
            if value.dtype not in _validate.FLOAT_DTYPES or value.dim() > 1:
                raise ValueError(f"{name} must be a float or a 0-d or (G,) float tensor; got "
                                 f"{value.dtype} of shape {tuple(value.shape)}")
            if positive:
                _validate.positive_values(name, value, "group")
            self.register_buffer(name, value.detach().clone())
        else:
            setattr(self, name, _validate.real(name, value, positive=positive))

    def forward(self, y_t: Tensor, y_r: Tensor, bandwidth=None, weight=None) -> Tensor:
        """bandwidth / weight given here (per step, e.g. from the sampled times) override the constructor's."""
        return mmd_loss(y_t, y_r, self.group_size, kernel=self.kernel, estimator=self.estimator, eps=self.eps,
                        reduction=self.reduction, backend=self.backend,
                        bandwidth=self.bandwidth if bandwidth is None else bandwidth,
                        weight=self.weight if weight is None else weight)

    def extra_repr(self) -> str:
        def shown(value):
            return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)

        return (f"group_size={self.group_size}, kernel={self.kernel!r}, bandwidth={shown(self.bandwidth)}, "
                f"weight={shown(self.weight)}, estimator={self.estimator!r}, eps={self.eps!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")

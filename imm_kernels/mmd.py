"""mmd_loss: the grouped MMD of IMM (docs/math.md section 4), forward and backward one native call each.

Layers: mmd_loss / MMDLoss (validate, pick a backend) -> _MMDLoss (autograd) -> the custom ops
imm_kernels::mmd_forward and imm_kernels::mmd_backward (opaque to torch.compile, with fakes for tracing; in eager
mode their implementation is called directly) -> the backend's implementation.

The backward design: the forward pass saves each group's pair coefficients ([G, 6, M, M] in the accumulation
dtype, csrc/common/mmd_math.h) and the backward pass makes the gradient from them and the inputs,
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
    _validate.native_scalar("bandwidth", bandwidth, groups, y_t)
    _validate.native_scalar("weight", weight, groups, y_t)
    out = _native.new_output(y_t, () if reduction != "none" else (groups,))
    if not (grad_t or grad_r):
        return out, None
    if backend == "cuda" and _dispatch.variant("IMM_CUDA_KERNELS") == "verified":
        return out, _native.new_output(y_t, (grad_t + grad_r, *y_t.shape))
    return out, _native.new_output(y_t, (groups, COEFFICIENT_BLOCKS, group_size, group_size),
                                   _validate.accumulation_dtype(y_t.dtype))


def _op_outputs(first: Tensor, second: Tensor | None) -> tuple[Tensor, Tensor]:
    """The custom ops' schemas have no optional outputs: a missing one is an empty tensor there."""
    return first, first.new_empty(0) if second is None else second


@torch.library.custom_op("imm_kernels::mmd_forward", mutates_args=())
def mmd_forward(y_t: Tensor, y_r: Tensor, bandwidth: Tensor | None, bandwidth_value: float, weight: Tensor | None,
                weight_value: float, group_size: int, kernel: str, estimator: str, eps: float, reduction: str,
                grad_t: bool, grad_r: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The reduced weight * MMD of (B, ...) inputs in groups of group_size rows, and the saved state of the
    backward op (see forward_outputs). bandwidth, weight: a 0-d or (G,) float32/float64 tensor, or None for the
    plain value beside it."""
    return _op_outputs(*_dispatch.implementation("mmd_forward", backend)(
        y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps, reduction,
        grad_t, grad_r, backend))


@mmd_forward.register_fake
def _(y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps, reduction,
      grad_t, grad_r, backend):
    return _op_outputs(*forward_outputs(y_t, group_size, bandwidth, weight, reduction, grad_t, grad_r, backend))


@torch.library.custom_op("imm_kernels::mmd_backward", mutates_args=())
def mmd_backward(grad_output: Tensor, y_t: Tensor, y_r: Tensor, saved: Tensor, group_size: int, grad_t: bool,
                 grad_r: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The gradients (grad_t, grad_r, an unwanted one empty) of the loss scaled by grad_output (0-d, or (G,) for
    reduction "none"), from the forward op's saved state."""
    out_t, out_r = _dispatch.implementation("mmd_backward", backend)(grad_output, y_t, y_r, saved, group_size, grad_t,
                                                                     grad_r, backend)
    return _op_outputs(out_t if out_t is not None else y_t.new_empty(0), out_r)


def backward_outputs(y_t: Tensor, grad_t: bool, grad_r: bool):
    """The gradients asked for, in y_t's shape and dtype; None for the other."""
    return (_native.new_output(y_t, y_t.shape) if grad_t else None,
            _native.new_output(y_t, y_t.shape) if grad_r else None)


@mmd_backward.register_fake
def _(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend):
    out_t, out_r = backward_outputs(y_t, grad_t, grad_r)
    return _op_outputs(out_t if out_t is not None else y_t.new_empty(0), out_r)


_dispatch.register_custom_op("mmd_forward", torch.ops.imm_kernels.mmd_forward)
_dispatch.register_custom_op("mmd_backward", torch.ops.imm_kernels.mmd_backward)


@_dispatch.register("mmd_forward", "cpu")
def _native_forward(y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps,
                    reduction, grad_t, grad_r, backend):
    groups = y_t.shape[0] // group_size
    out, coefficients = forward_outputs(y_t, group_size, bandwidth, weight, reduction, grad_t, grad_r, backend)
    t, stride_t, features = _native.rows(y_t)
    r, stride_r, _ = _native.rows(y_r)
    module, dtype = _native.LOADED[backend], _native.DTYPE_CODES[y_t.dtype]
    workspace = counter = None
    if not y_t.is_cpu:  # GPU kernels: scratch from torch's allocator, the reduction's counter
        workspace = y_t.new_empty(module.mmd_workspace_bytes(groups, group_size, features, dtype), dtype=torch.uint8)
        counter = _native.reduction_counter(y_t.device) if reduction != "none" else None
    module.mmd_forward(
        t.data_ptr(), r.data_ptr(), stride_t, stride_r, groups, group_size, features, dtype,
        _native.KERNEL_CODES[kernel], _native.ESTIMATOR_CODES[estimator], _native.REDUCTION_CODES[reduction], eps,
        *_native.scalar_arg(bandwidth, bandwidth_value), *_native.scalar_arg(weight, weight_value), out.data_ptr(),
        _native.ptr(coefficients), y_t.is_cpu, _native.ptr(workspace), _native.ptr(counter), _native.launch_arg(y_t))
    return out, coefficients


@_dispatch.register("mmd_backward", "cpu")
def _native_backward(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend):
    out_t, out_r = backward_outputs(y_t, grad_t, grad_r)
    t, stride_t, features = _native.rows(y_t)
    r, stride_r, _ = _native.rows(y_r)
    _native.LOADED[backend].mmd_backward(
        t.data_ptr(), r.data_ptr(), stride_t, stride_r, y_t.shape[0] // group_size, group_size, features,
        _native.DTYPE_CODES[y_t.dtype], grad_output.data_ptr(), grad_output.stride(0) if grad_output.ndim else 0,
        saved.data_ptr(), _native.ptr(out_t), _native.ptr(out_r), _native.launch_arg(y_t))
    return out_t, out_r


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
    module = _native.LOADED["cuda"]
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


def _reference_gradients(ctx, grad_output, y_t, y_r):
    """Differentiable gradients for create_graph=True (Hessian-vector products, gradient penalties): the
    reference formulation's autograd, in O(G (2M)^2 D) memory."""
    bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, _ = ctx.options
    bandwidth, weight = ctx.operands
    wanted = [y for y, need in zip((y_t, y_r), ctx.needs_input_grad[:2]) if need]
    with torch.enable_grad():
        loss = reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, estimator=estimator, eps=eps,
                                  reduction=reduction,
                                  bandwidth=bandwidth_value if bandwidth is None else bandwidth,
                                  weight=weight_value if weight is None else weight)
        grads = iter(torch.autograd.grad(loss, wanted, grad_output, create_graph=True))
    return [next(grads) if need else None for need in ctx.needs_input_grad[:2]]


class _MMDLoss(torch.autograd.Function):
    """Autograd of the two custom ops. options: mmd_forward's arguments after weight, without the gradient
    flags: (bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, backend), one argument
    because Function.apply costs per argument."""

    @staticmethod
    def forward(ctx, y_t, y_r, bandwidth, weight, options):
        bandwidth_value, weight_value, group_size, kernel, estimator, eps, reduction, backend = options
        grad_t, grad_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out, saved = _dispatch.call("mmd_forward", backend)(
            y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps,
            reduction, grad_t, grad_r, backend)
        ctx.save_for_backward(y_t, y_r, saved)
        ctx.operands = bandwidth, weight  # detached constants, read only for gradients of gradients
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, grad_output):
        y_t, y_r, saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grads = _reference_gradients(ctx, grad_output, y_t, y_r)
        else:
            options, needs = ctx.options, ctx.needs_input_grad
            out_t, out_r = _dispatch.call("mmd_backward", options[7])(grad_output, y_t, y_r, saved, options[2],
                                                                      needs[0], needs[1], options[7])
            grads = (out_t if needs[0] else None, out_r if needs[1] else None)  # the custom op's are empty tensors
        return grads[0], grads[1], None, None, None


def mmd_loss(y_t: Tensor, y_r: Tensor, group_size: int, *, kernel: str = "laplace", bandwidth=1.0, weight=None,
             estimator: str = "v", eps: float = 1e-8, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Grouped MMD between y_t and y_r (docs/math.md section 4).

    y_t, y_r: (B, ...) of one shape, dtype and device; B = G * group_size, groups are consecutive rows and
    features are flattened to D. kernel: "laplace" exp(-bw max(d, eps) / D), "rbf" exp(-bw d^2 / D) or
    "energy" -d (no bandwidth), d the Euclidean distance of two rows; the gradient at d = 0 is 0.
    bandwidth, weight: floats or (G,) tensors (constants: no gradient flows to them); weight None means 1.
    estimator: "v" (the full M x M, paper Eq. 67) or "u" (self terms without i = j, over M (M - 1)).
    reduction: "mean" over groups, "sum", or "none" for the (G,) per-group losses.
    backend: "auto", "reference", "cpu", "triton" or "cuda". Output and gradients are in the input dtype,
    accumulated in float32 (float64 for float64 inputs). Gradients of gradients (create_graph=True) come from
    the reference formulation.
    """
    _, bw, bw_value, w, w_value, eps = _validate.mmd_options(y_t, y_r, group_size, kernel, bandwidth, weight,
                                                             estimator, eps, reduction)
    backend = _dispatch.resolve("mmd", backend, y_t.device)
    if backend == "reference":
        return reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, bandwidth=bandwidth, weight=weight,
                                  estimator=estimator, eps=eps, reduction=reduction)
    if torch.is_grad_enabled() and (y_t.requires_grad or y_r.requires_grad):
        return _MMDLoss.apply(y_t, y_r, bw, w, (bw_value, w_value, group_size, kernel, estimator, eps, reduction,
                                                backend))
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
        _validate.positive_int("group_size", group_size, minimum=2 if estimator == "u" else 1)
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

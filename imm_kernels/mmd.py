"""mmd_loss: the grouped MMD of IMM, fused forward + backward.

Layers: mmd_loss / MMDLoss (validate, pick a backend) -> MMDLossFunction (autograd) -> the custom op
imm_kernels::mmd_fused (opaque to torch.compile, with a fake for tracing) -> the backend's implementation.
The forward launch also produces the gradient of the loss when an input requires it; backward only
scales that gradient by grad_output, so each input is read once per step by the fused backends.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _dispatch, _native, _validate, reference


def mmd_outputs(y_t: Tensor, group_size: int, grad_t: bool, grad_r: bool):
    """Allocates (loss per group, grad_t, grad_r); an unwanted gradient is an empty tensor."""
    groups = y_t.shape[0] // group_size
    acc = _validate.accumulation_dtype(y_t.dtype)
    loss = _native.new_output((groups,), acc, y_t.device)

    def grad(wanted: bool) -> Tensor:
        return _native.new_output(y_t.shape if wanted else (0,), y_t.dtype, y_t.device)

    return loss, grad(grad_t), grad(grad_r)


@torch.library.custom_op("imm_kernels::mmd_fused", mutates_args=())
def mmd_fused(y_t: Tensor, y_r: Tensor, bandwidth: Tensor, weight: Tensor, group_size: int, kernel: str,
              estimator: str, eps: float, grad_t: bool, grad_r: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group weight * MMD of (B, D) inputs, and d(sum of it)/dy_t, dy_r where asked (else empty)."""
    return _dispatch.implementation("mmd", backend)(y_t, y_r, bandwidth, weight, group_size, kernel, estimator, eps,
                                                    grad_t, grad_r)


@mmd_fused.register_fake
def _(y_t, y_r, bandwidth, weight, group_size, kernel, estimator, eps, grad_t, grad_r, backend):
    return mmd_outputs(y_t, group_size, grad_t, grad_r)


def _native_mmd(backend: str, y_t, y_r, bandwidth, weight, group_size, kernel, estimator, eps, grad_t, grad_r):
    module, _ = _native.load(backend)
    loss, g_t, g_r = mmd_outputs(y_t, group_size, grad_t, grad_r)
    sizes = dict(groups=loss.shape[0], group_size=group_size, features=y_t.shape[1],
                 dtype=_native.DTYPE_CODES[y_t.dtype])
    # Scratch for the per-group pair sums, from torch's caching allocator (0 bytes on the CPU).
    workspace = torch.empty(module.mmd_workspace_bytes(**sizes), dtype=torch.uint8, device=y_t.device)
    module.mmd_fused(
        y_t=y_t.data_ptr(), y_r=y_r.data_ptr(), stride_t=y_t.stride(0), stride_r=y_r.stride(0), **sizes,
        kernel=_native.KERNEL_CODES[kernel], estimator=_native.ESTIMATOR_CODES[estimator], eps=eps,
        bandwidth=bandwidth.data_ptr(), weight=weight.data_ptr(), loss=loss.data_ptr(), grad_t=_native.ptr(g_t),
        grad_r=_native.ptr(g_r), workspace=_native.ptr(workspace), **_native.launch_options(y_t.device))
    return loss, g_t, g_r


for _backend in ("cpu", "cuda"):
    _dispatch.register("mmd", _backend)(functools.partial(_native_mmd, _backend))


class MMDLossFunction(torch.autograd.Function):
    """Autograd of the fused MMD for (B, D) inputs with validated (G,) bandwidth and weight tensors."""

    @staticmethod
    def forward(ctx, y_t, y_r, bandwidth, weight, group_size, kernel, estimator, eps, reduction, backend):
        groups = y_t.shape[0] // group_size
        # The mean's 1/G goes into the weight, so the gradient made in forward is already that of the output.
        scaled_weight = weight / groups if reduction == "mean" else weight
        loss, grad_t, grad_r = torch.ops.imm_kernels.mmd_fused(
            y_t, y_r, bandwidth, scaled_weight, group_size, kernel, estimator, eps, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1], backend)
        ctx.save_for_backward(grad_t, grad_r)
        ctx.per_group = reduction == "none"
        ctx.groups = groups
        # copy=True: a new tensor even where y_t is in the accumulation dtype already. Dynamo in torch 2.11 returns the
        # forward's intermediates (here `loss`, its sum) too, and an output that is one of them gets a zero gradient
        # (pytorch#180642).
        return (loss if ctx.per_group else loss.sum()).to(y_t.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_output):
        grad_t, grad_r = ctx.saved_tensors

        def scaled(grad: Tensor, needed: bool):
            if not needed:
                return None
            if ctx.per_group:
                return (grad.view(ctx.groups, -1) * grad_output.view(ctx.groups, 1).to(grad.dtype)).view_as(grad)
            return grad * grad_output.to(grad.dtype)

        return (scaled(grad_t, ctx.needs_input_grad[0]), scaled(grad_r, ctx.needs_input_grad[1]),
                None, None, None, None, None, None, None, None)


def mmd_loss(y_t: Tensor, y_r: Tensor, group_size: int, *, kernel: str = "laplace", bandwidth=1.0, weight=None,
             estimator: str = "v", eps: float = 1e-8, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Grouped MMD between y_t and y_r (IMM_SPEC section 4).

    y_t, y_r: (B, ...) of one shape, dtype and device; B = G * group_size, groups are consecutive rows and
    features are flattened to D. kernel: "laplace" exp(-bw max(d, eps) / D), "rbf" exp(-bw d^2 / D) or
    "energy" -d (no bandwidth), d the Euclidean distance of two rows; the gradient at d = 0 is 0.
    bandwidth, weight: floats or (G,) tensors (constants: no gradient flows to them); weight None means 1.
    estimator: "v" (the full M x M, paper Eq. 67) or "u" (self terms without i = j, over M (M - 1)).
    reduction: "mean" over groups, "sum", or "none" for the (G,) per-group losses.
    backend: "auto", "reference", "cpu", "triton" or "cuda". Output and gradients are in the input dtype,
    accumulated in float32 (float64 for float64 inputs).
    """
    args = _validate.mmd_arguments(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction)
    backend = _dispatch.resolve("mmd", backend, y_t.device)
    if backend == "reference":
        return reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, bandwidth=args.bandwidth, weight=args.weight,
                                  estimator=estimator, eps=args.eps, reduction=reduction)
    return MMDLossFunction.apply(args.y_t, args.y_r, args.bandwidth, args.weight, group_size, kernel, estimator,
                                 args.eps, reduction, backend)


class MMDLoss(torch.nn.Module):
    """Module form of mmd_loss: the keyword arguments are fixed at construction."""

    def __init__(self, group_size: int, *, kernel: str = "laplace", bandwidth=1.0, weight=None, estimator: str = "v",
                 eps: float = 1e-8, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.group_size = group_size
        self.options = dict(kernel=kernel, bandwidth=bandwidth, weight=weight, estimator=estimator, eps=eps,
                            reduction=reduction, backend=backend)

    def forward(self, y_t: Tensor, y_r: Tensor, bandwidth=None, weight=None) -> Tensor:
        """bandwidth / weight given here (per step, e.g. from the sampled times) override the constructor's."""
        options = dict(self.options)
        if bandwidth is not None:
            options["bandwidth"] = bandwidth
        if weight is not None:
            options["weight"] = weight
        return mmd_loss(y_t, y_r, self.group_size, **options)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items()
                                                             if not isinstance(v, torch.Tensor))

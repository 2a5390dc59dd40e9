"""Per-call cost: each public op dispatches nothing but its custom op (allocations and views aside) in each
direction, for every backend and reduction, and makes one native call per direction (one kernel launch where a
group fits). Counted on CPU tensors by a TorchDispatchMode that records every ATen op dispatched; with a mode
active the ops go through torch.library (as under torch.compile), so what they dispatch is visible here."""

import pytest
import torch
from conftest import BACKEND_CASES
from torch.utils._python_dispatch import TorchDispatchMode

import imm_kernels
from imm_kernels import _native

ALLOCATIONS = {"empty", "empty_strided", "new_empty", "new_empty_strided"}
CPU_CASES = [case for case in BACKEND_CASES if case.values[0] == "cpu"]


class DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def assert_only(ops, custom_op: str) -> None:
    """The custom op once, and nothing else but allocations and views."""
    ours = [str(op) for op in ops if op.namespace == "imm_kernels"]
    others = [str(op) for op in ops if op.namespace != "imm_kernels" and not op.is_view
              and op.overloadpacket.__name__ not in ALLOCATIONS]
    assert ours == [custom_op] and not others, f"dispatched {ours} and {others}"


@pytest.fixture
def launches(monkeypatch):
    """Counts the native calls: the extension's entry points, and Triton kernel launches."""
    count = {"native": 0}

    class Counting:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            def call(*args):
                count["native"] += 1
                return getattr(self.module, name)(*args)

            return call

    monkeypatch.setitem(_native.LOADED, "cpu", Counting(_native.LOADED["cpu"]))
    if "triton" in imm_kernels.available_backends("cpu"):
        from imm_kernels.triton import mmd

        kernel_class = type(mmd._mmd_forward_kernel)
        run = kernel_class.run

        def counted_run(self, *args, **kwargs):
            count["native"] += 1
            return run(self, *args, **kwargs)

        monkeypatch.setattr(kernel_class, "run", counted_run)
    return count


def forward_then_backward(call, inputs, custom_op: str, launches):
    """Records call(*inputs) and the gradients of its outputs (given: no ones_like, no accumulation)."""
    with DispatchLog() as forward:
        before = launches["native"]
        outputs = call(*inputs)
        forward_launches = launches["native"] - before
    assert_only(forward.ops, f"imm_kernels.{custom_op}_forward.default" if custom_op == "mmd"
                else f"imm_kernels.{custom_op}.default")
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.randn_like(o) for o in outputs]
    with DispatchLog() as backward:
        before = launches["native"]
        torch.autograd.grad(outputs, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad], grads)
        backward_launches = launches["native"] - before
    assert_only(backward.ops, f"imm_kernels.{custom_op}_backward.default" if custom_op == "mmd"
                else f"imm_kernels.{custom_op}.default")
    assert (forward_launches, backward_launches) == (1, 1)


@pytest.mark.parametrize("device,backend", CPU_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("operands", ["floats", "tensors"])
@pytest.mark.parametrize("grads", ["t", "both"])
def test_mmd_loss_dispatches_its_ops_only(device, backend, reduction, operands, grads, launches):
    y_t = torch.randn(8, 3, 5, requires_grad=True)
    y_r = torch.randn(8, 3, 5, requires_grad=grads == "both")
    options = dict(bandwidth=2.0, weight=None) if operands == "floats" else \
        dict(bandwidth=torch.rand(2, dtype=torch.float64) + 0.5, weight=torch.rand(2))
    forward_then_backward(lambda a, b: imm_kernels.mmd_loss(a, b, 4, reduction=reduction, backend=backend, **options),
                          (y_t, y_r), "mmd", launches)


@pytest.mark.parametrize("device,backend", CPU_CASES)
@pytest.mark.parametrize("op", ["interpolate", "interpolate_pair", "ddim", "imm_output"])
@pytest.mark.parametrize("times", ["floats", "tensors"])
def test_interpolant_ops_dispatch_their_op_only(device, backend, op, times, launches):
    x = torch.randn(4, 3, 5, requires_grad=True)
    other = torch.randn(4, 3, 5, requires_grad=True)
    t = torch.rand(4, dtype=torch.float64) * 0.9 + 0.05 if times == "tensors" else 0.7
    r = t * 0.5
    calls = {"interpolate": lambda a, b: imm_kernels.interpolate(a, b, t, backend=backend),
             "interpolate_pair": lambda a, b: imm_kernels.interpolate_pair(a, b, t, r, backend=backend),
             "ddim": lambda a, b: imm_kernels.ddim(a, b, r, t, backend=backend),
             "imm_output": lambda a, b: imm_kernels.imm_output(a, b, r, t, backend=backend)}
    forward_then_backward(calls[op], (x, other), "combine", launches)


@pytest.mark.parametrize("device,backend", CPU_CASES)
def test_forward_only_calls_write_no_gradient_state(device, backend, launches):
    """Under no_grad (evaluation) the forward op is asked for the loss alone."""
    y_t, y_r = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    with torch.no_grad(), DispatchLog() as log:
        imm_kernels.mmd_loss(y_t, y_r, 4, backend=backend)
    assert_only(log.ops, "imm_kernels.mmd_forward.default")
    assert launches["native"] == 1

"""Backends behind one table: which implementation runs an op, whether it can run here, how to get it, and how
an op is called (directly in eager mode, as its torch.library custom op where torch.compile or a dispatch mode
looks on)."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch
from torch.autograd import forward_ad

from . import _native

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# backend="auto": the first usable backend per device type and op family. On CPUs the C++ kernels. On GPUs the
# CUDA extension where it is built: on an H200 (2026-11-26, README) it beat Triton in all 16 timed mmd_loss cases
# (about 2x) and in 22 of 24 interpolant cases, though a whole small-MLP IMM step was 5% faster with Triton
# (3.80 vs 3.98 ms); Triton where the extension is not built.
AUTO_ORDER = {
    "cpu": {"mmd": ("cpu", "reference"), "combine": ("cpu", "reference")},
    "cuda": {"mmd": ("cuda", "triton", "reference"), "combine": ("cuda", "triton", "reference")},
}

# The ops of each family, and the module that registers a backend's implementations of them when imported
# (imported on first use, so triton is never imported unless asked for).
# The loss head (loss_head.py) runs where mmd_loss does (resolved as "mmd"): its kernels are mmd's with a mix.
FAMILY_OPS = {"mmd": ("mmd_forward", "mmd_backward"), "combine": ("combine",),
              "loss_head": ("loss_head_forward", "loss_head_backward")}
_PROVIDERS = {
    ("mmd", "cpu"): "imm_kernels.mmd",
    ("mmd", "cuda"): "imm_kernels.mmd",
    ("mmd", "triton"): "imm_kernels.triton.mmd",
    ("combine", "cpu"): "imm_kernels.interpolant",
    ("combine", "cuda"): "imm_kernels.interpolant",
    ("combine", "triton"): "imm_kernels.triton.interpolant",
    ("loss_head", "cpu"): "imm_kernels.loss_head",
    ("loss_head", "triton"): "imm_kernels.triton.mmd",
}
_FAMILY = {op: family for family, ops in FAMILY_OPS.items() for op in ops}

# Kernel designs selectable at run time, so that one GPU lease times them all (tests/gpu_check.sh sweeps them);
# the first of each is the default. A default changes only on GPU evidence, recorded with the card's name.
VARIANTS = {
    # Triton MMD: "tile" reduces an (M, M, BLOCK_D) pair tile once per tile; "stream" accumulates the pair tiles
    # elementwise and reduces once per group, and its backward streams partner rows past (M, BLOCK_D) tiles
    # (no reduction at all).
    "IMM_TRITON_MMD": ("tile", "stream"),
    # Triton combine: "row" is one row's 2048-feature block per program (4 warps); "wide" 4096 (8 warps).
    "IMM_TRITON_COMBINE": ("row", "wide"),
    # CUDA: "verified" the kernels that passed the suite on an H200 (csrc/cuda/verified.h); "next" the kernels of
    # the current contract (csrc/cuda/next), unproven until a GPU run passes the suite with them.
    "IMM_CUDA_KERNELS": ("verified", "next"),
}


def variant(name: str) -> str:
    """The design in force for VARIANTS[name]: its environment variable, else the default."""
    value = os.environ.get(name, VARIANTS[name][0])
    if value not in VARIANTS[name]:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, VARIANTS[name]))}; got {value!r}")
    return value


_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
_CUSTOM_OPS: dict[str, Callable] = {}
_RESOLVED: dict[tuple[str, str, torch.device], str] = {}


def register(op: str, backend: str):
    """Decorator: fn implements custom op `op` (same arguments, backend last) on `backend`."""

    def decorate(fn: Callable) -> Callable:
        _IMPLEMENTATIONS[(op, backend)] = fn
        return fn

    return decorate


def register_custom_op(op: str, custom_op) -> None:
    _CUSTOM_OPS[op] = custom_op


def implementation(op: str, backend: str) -> Callable:
    if (op, backend) not in _IMPLEMENTATIONS:
        importlib.import_module(_PROVIDERS[(_FAMILY[op], backend)])
    return _IMPLEMENTATIONS[(op, backend)]


def transforming() -> bool:
    """Whether a functorch transform (torch.func.grad, vjp, jvp, vmap, ...) or forward-mode AD is active: the
    tensors may then be wrappers without storage, and the ops must go through their registered rules."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def _levels() -> list:
    """The kinds of the active functorch levels, outermost first."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return []
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return [level.key() for level in retrieve_all_functorch_interpreters()]


def grad_level_active() -> bool:
    return torch._C._functorch.TransformType.Grad in _levels()


def differentiable_backward(grad_output: torch.Tensor, inputs) -> bool:
    """Whether a backward pass must give gradients that can be differentiated again: in forward mode (a jvp level
    or forward-mode AD around it: torch.func.hessian, jacfwd of jacrev), or in reverse mode (grad mode on, as
    create_graph=True sets it, something it depends on requires grad, and a grad level other than the one
    running this backward is active: grad of grad, jacrev of jacrev). A lone torch.func.grad / vjp level always
    runs its backward with grad mode on, though nothing differentiates the result again."""
    if torch._C._functorch.peek_interpreter_stack() is None and forward_ad._current_level < 0:
        if not torch.is_grad_enabled() or grad_output.requires_grad:  # the common cases, decided cheaply
            return torch.is_grad_enabled()
    levels = _levels()
    grad, jvp = torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp
    if jvp in levels or forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    if grad_output.requires_grad:
        return True
    if not any(x is not None and x.requires_grad for x in inputs):
        return False
    return not levels or levels.count(grad) - (levels[-1] == grad) > 0


class Function(torch.autograd.Function):
    """An autograd.Function with setup_context (as the functorch transforms need) and a cheaper apply: outside
    the transforms, Function.apply binds the arguments to forward's signature with inspect on every call (about
    10 us), which forwards without default arguments do not need."""

    @classmethod
    def run(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return cls.apply(*args)
        return eager_apply(cls)(*live(args))


def eager_apply(function):
    """function.apply for an old-form autograd.Function called outside the functorch transforms, without its
    checks for them and for setup_context (the caller has made both); the caller passes live_tensor()s."""
    return super(torch.autograd.Function, function).apply


def saved_tensors(ctx) -> tuple:
    """ctx.saved_tensors, unwrapped by live() where the forward ran under a functorch transform (ctx.transformed)."""
    saved = ctx.saved_tensors
    return live(saved) if ctx.transformed else saved


def replaced(values, indices, replacements) -> list:
    """values with values[indices[k]] = replacements[k] (the inputs a reference derivative varies)."""
    values = list(values)
    for index, replacement in zip(indices, replacements):
        values[index] = replacement
    return values


#: A tensor, or a wrapper of a functorch level that has ended (a tensor saved under torch.func.vjp and read by its
#: pullback) replaced by what it wraps, as Function.apply does for its arguments.
live_tensor = torch._C._functorch.unwrap_if_dead


def live(tensors) -> list:
    """live_tensor of each tensor among `tensors`, the others as they are."""
    return [live_tensor(x) if isinstance(x, torch.Tensor) else x for x in tensors]


def direct() -> bool:
    """Whether an op may run as its backend's implementation itself (eager mode: no custom-op dispatch, which
    costs more than a small kernel) rather than as its registered custom op, which torch.compile (also compiled
    autograd), a dispatch mode (make_fx, FakeTensorMode, a profiler, the tests' op counter) and the functorch
    transforms must see."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.peek_interpreter_stack() is not None)


#: Whether a torch dispatch mode is active (one of direct()'s conditions, for callers that know the others).
dispatch_mode_active = torch._C._len_torch_dispatch_stack


def _top_saved_tensor_hooks():
    """torch's query for the innermost saved-tensor hooks (a private function: it takes ignore_is_tracing in
    recent releases, nothing before), or None where this torch has none."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        top(False)
        return functools.partial(top, False)  # (no Python frame per call)
    except TypeError:
        return top


_TOP_SAVED_TENSOR_HOOKS = _top_saved_tensor_hooks()


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (torch.autograd.graph.saved_tensors_hooks: offloading with
    save_on_cpu, non-reentrant checkpointing): what autograd saves is then theirs to keep or drop, so nothing else
    may hold the saved tensors. True where torch cannot tell."""
    return _TOP_SAVED_TENSOR_HOOKS is None or _TOP_SAVED_TENSOR_HOOKS() is not None


def call(op: str, backend: str) -> Callable:
    """What to call for `op`: the backend's implementation where direct(), else the registered custom op."""
    if not direct():
        return _CUSTOM_OPS[op]
    return _IMPLEMENTATIONS.get((op, backend)) or implementation(op, backend)


def _triton_problem() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton is not installed ({error}): pip install 'imm_kernels[triton]'"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else what is missing and how to get it."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors; got {device.type} tensors (use 'cuda', 'triton' or 'auto')"
        _, reason = _native.load("cpu")
        return reason and f"{reason}: install from source with `pip install .` (needs a C++17 compiler, CMake, OpenMP)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors; got {device.type} tensors"
        _, reason = _native.load("cuda")
        return reason and (f"{reason}: build it with CUDAARCHS='90a-real' pip install . "
                           "-Ccmake.define.IMM_CUDA=ON (see the README)")
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA tensors; got {device.type} tensors"
        return _triton_problem()
    raise AssertionError(backend)


def _resolve(family: str, backend: str, device_type: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    device = torch.device(device_type)
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason:
            raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
        return backend
    for candidate in AUTO_ORDER.get(device_type, {}).get(family, ("reference",)):
        if unavailable_reason(candidate, device) is None:
            return candidate
    return "reference"


def resolve(family: str, backend: str, device: torch.device) -> str:
    """The concrete backend for op family `family` on `device` (decided once per process and device type, kept
    per device: the key then costs no device.type, a third of this call on the hot path); raises with
    instructions when it cannot run."""
    key = (family, backend, device)
    resolved = _RESOLVED.get(key) if isinstance(backend, str) else None
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(family, backend, device.type)
    return resolved


# torch.compile takes resolve's result as a constant (no imports or probing inside the graph). This is what
# torch.compiler.assume_constant_result does, without its import of torch._dynamo, which would add 1.5 s
# to `import imm_kernels` for every user who never compiles (tests/test_compile.py checks both effects).
resolve._dynamo_marked_constant = True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on tensors of `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]

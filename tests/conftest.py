"""Test setup: one thread, the Triton interpreter on CPU-only machines, poisoned native outputs, and the
helpers every test file shares (backends to parametrize over, tolerances, relative error)."""

import contextlib
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["IMM_KERNELS_POISON"] = "1"  # outputs start as NaN: an element a kernel never writes fails the test

import torch  # noqa: E402  (imported after the environment is set; importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the definition of any Triton kernel
torch.set_num_threads(1)

import pytest  # noqa: E402

import imm_kernels  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def native_backends(device: str) -> list[str]:
    return [b for b in imm_kernels.available_backends(device) if b != "reference"]


BACKEND_CASES = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in native_backends(d)]


def refuses_unpaired(device, backend: str) -> bool:
    """Whether backend on device runs the GPU-verified CUDA kernels, which refuse estimator="unpaired"."""
    from imm_kernels import _dispatch

    return (torch.device(device).type == "cuda" and backend in ("cuda", "auto")
            and _dispatch.variant("IMM_CUDA_KERNELS") == "verified")


def skip_where_refused(device, backend: str, estimator: str) -> None:
    """Skip an unpaired case where the GPU-verified CUDA kernels run (test_mmd.py and the fuzz test the refusal)."""
    if estimator == "unpaired" and refuses_unpaired(device, backend):
        pytest.skip("the GPU-verified CUDA kernels refuse estimator='unpaired' (IMM_CUDA_KERNELS=next runs it)")

# Relative error bounds against the float64 reference, over whole tensors, for random (not near-duplicate) inputs:
# per dtype, (CPU tensors, CUDA tensors). On CPU tensors (cpu backend, Triton interpreter) about 2x the worst error
# measured over test_mmd.py, test_interpolant.py and test_threads.py (`IMM_REPORT_ERRORS=1 pytest tests/test_mmd.py
# tests/test_interpolant.py tests/test_threads.py`, 2026-12-01): float64 3.5e-13; float32 1.8e-7 (the float32
# reference's own error: up to 3.0e-7); float16 4.9e-4 and bfloat16 4.1e-3, about one rounding of the output (2^-11,
# 2^-8: fp16 / bf16 inputs are exact in float32; the same-precision reference: 1.5e-3 and 1.5e-2).
# test_near_duplicates_float32's own 1e-4 was measured too: 2.0e-5 (cpu), 6.8e-5 (triton).
# On CUDA tensors the bounds the suite passed on an H200 (2026-11-26); not measured there yet.
RTOL = {torch.float64: (1e-12, 1e-10), torch.float32: (4e-7, 2e-5), torch.float16: (1e-3, 2e-3),
        torch.bfloat16: (8e-3, 1.6e-2)}


def rtol(dtype: torch.dtype, device: str, backend: str) -> float:
    """The bound of RTOL for results of `backend` on `device`."""
    on_cpu, on_cuda = RTOL[dtype]
    if device != "cpu":
        return on_cuda
    # The Triton interpreter truncates float32 to bfloat16 where a GPU rounds to nearest (measured: 7.8e-3).
    return on_cpu * (2 if backend == "triton" and dtype == torch.bfloat16 else 1)


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64 (1 in place of a zero denominator); NaN or
    inf anywhere in actual gives inf."""
    dtype = actual.dtype
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.norm().item(), floor)
    error = (actual - expected).norm().item() / (scale if scale > 0 else 1.0)
    if REPORT_ERRORS:
        caller = sys._getframe(1)
        site = f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"
        key = (_running["test"], site, _running["backend"], str(dtype).removeprefix("torch."))
        _worst_errors[key] = max(_worst_errors.get(key, 0.0), error)
    return error


# IMM_REPORT_ERRORS=1 keeps the worst rel_error of each test function, call site, device-backend and dtype, and prints
# them at the end of the run: how RTOL above was measured (and how to measure it on a GPU).
REPORT_ERRORS = os.environ.get("IMM_REPORT_ERRORS") == "1"
_worst_errors: dict = {}
_running = {"test": "", "backend": "-"}  # the running test's name and its device-backend


def pytest_runtest_setup(item):
    params = item.callspec.params if hasattr(item, "callspec") else {}
    _running.update(test=item.originalname, backend=f"{params.get('device', '-')}-{params.get('backend', '-')}")


def pytest_terminal_summary(terminalreporter):
    if not REPORT_ERRORS:
        return
    terminalreporter.section("worst relative errors against float64 (IMM_REPORT_ERRORS=1)")
    for (test, site, backend, dtype), error in sorted(_worst_errors.items()):
        terminalreporter.write_line(f"{error:10.3g}  {dtype:9} {backend:11} {test} ({site})")


@contextlib.contextmanager
def threads(count: int):
    """torch's thread count, which the cpu backend uses too, set to `count` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_configure(config):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)  # CI must not fail on a draw it never saw before
    if os.environ.get("CI"):
        settings.load_profile("ci")

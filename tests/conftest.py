"""Test setup: one thread, the Triton interpreter on CPU-only machines, poisoned native outputs, and the
helpers every test file shares (backends to parametrize over, tolerances, relative error)."""

import os

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

# Relative error bounds against the float64 reference, over whole tensors, for random (not near-duplicate)
# inputs. float32 lands near 1e-7; fp16 / bf16 inputs are exact in float32, so only the rounding of the
# outputs (and of the gradient's scaling) remains.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64 (1 in place of a zero denominator); NaN or
    inf anywhere in actual gives inf."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.norm().item(), floor)
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_configure(config):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)  # CI must not fail on a draw it never saw before
    if os.environ.get("CI"):
        settings.load_profile("ci")

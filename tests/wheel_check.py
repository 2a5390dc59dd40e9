"""An installed imm_kernels, checked from the outside: tests/test_wheel.py runs this file with the python of a fresh
virtual environment that holds the released wheel, from a folder outside the source tree (python -I: neither
PYTHONPATH nor the script's folder on sys.path):

    python -I wheel_check.py SITE_PACKAGES      # SITE_PACKAGES: where imm_kernels must come from

It checks that imm_kernels is the installed one, lists available_backends(), runs forward and backward of every
public op against imm_kernels.reference in float64 at small shapes, and counts the OpenMP runtimes mapped into the
process after multi-threaded work of torch and of imm_kernels: exactly one, torch's. It prints one JSON line.
tests/test_wheel.py also runs `python wheel_check.py --openmp-only` in the development environment.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import imm_kernels
from imm_kernels import imm, reference


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime files (libgomp, libiomp, libomp) mapped into this process, from /proc/self/maps."""
    with open("/proc/self/maps") as maps:
        files = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    return sorted(f for f in files if Path(f).name.startswith(("libgomp", "libiomp", "libomp")))


def multithreaded_work() -> None:
    """torch and imm_kernels both start their OpenMP thread pools (2 threads, groups split across them)."""
    torch.set_num_threads(2)
    a = torch.randn(256, 256)
    (a @ a).sum()
    y_t, y_r = torch.randn(64 * 4, 256, requires_grad=True), torch.randn(64 * 4, 256)
    imm_kernels.mmd_loss(y_t, y_r, 4, backend="cpu").backward()


def check_openmp() -> list[str]:
    multithreaded_work()
    runtimes = openmp_runtimes()
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    assert len(runtimes) == 1, f"{len(runtimes)} OpenMP runtimes mapped into one process: {runtimes}"
    assert Path(runtimes[0]).resolve().parent == torch_lib, f"the OpenMP runtime is not torch's: {runtimes}"
    return runtimes


def compare(name: str, ours, ref, *inputs: torch.Tensor) -> None:
    """Outputs and input gradients (for random output cotangents) of ours and ref agree in float64."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    results = []
    for fn in (ours, ref):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(1)
        cotangents = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, inputs, cotangents)
        results.append([o.detach() for o in outs] + list(grads))
    for i, (a, b) in enumerate(zip(*results)):
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-10, atol=1e-12), (
            f"{name}: output or gradient {i} differs from the reference by {(a - b).abs().max().item():.3g}")


def check_ops() -> list[str]:
    """Every public op on the cpu backend against the reference, forward and backward, float64."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    g, m, d, b = 3, 4, 5, 6
    y_t, y_r = torch.randn(g * m, d, **f64), torch.randn(g * m, d, **f64)
    bandwidth, weight = torch.rand(g, **f64) + 0.5, torch.rand(g, **f64)
    x, noise = torch.randn(b, d, **f64), torch.randn(b, d, **f64)
    s, r, t = (v.repeat_interleave(2) for v in imm.sample_times(b // 2, dtype=torch.float64))
    cases = []  # (name, op, inputs, positional arguments after the inputs, keyword arguments)
    for kernel in ("laplace", "rbf", "energy"):
        cases += [(f"mmd_loss/{kernel}/{estimator}", "mmd_loss", (y_t, y_r), (m,),
                   dict(kernel=kernel, estimator=estimator, weight=weight,
                        **({} if kernel == "energy" else {"bandwidth": bandwidth}))) for estimator in ("v", "u")]
    for schedule in ("fm", "cosine"):
        cases += [(f"interpolate/{schedule}", "interpolate", (x, noise), (t,), dict(schedule=schedule)),
                  (f"interpolate_pair/{schedule}", "interpolate_pair", (x, noise), (t, r), dict(schedule=schedule)),
                  (f"ddim/{schedule}", "ddim", (x, noise), (s, t), dict(schedule=schedule))]
        cases += [(f"imm_output/{schedule}/{param}", "imm_output", (x, noise), (s, t),
                   dict(schedule=schedule, param=param))
                  for param in ("simple_edm", "identity") + (("euler_fm",) if schedule == "fm" else ())]
    for name, op, inputs, arguments, options in cases:
        compare(name, lambda *a: getattr(imm_kernels, op)(*a, *arguments, backend="cpu", **options),
                lambda *a: getattr(reference, op)(*a, *arguments, **options), *inputs)
    module = imm_kernels.MMDLoss(m, bandwidth=bandwidth, backend="cpu")
    compare("MMDLoss", module, lambda a, c: reference.mmd_loss(a, c, m, bandwidth=bandwidth), y_t, y_r)
    return [name for name, *_ in cases] + ["MMDLoss"]


def main(argv: list[str]) -> None:
    if argv == ["--openmp-only"]:
        print(json.dumps({"openmp": check_openmp()}))
        return
    (site_packages,) = argv
    location = Path(imm_kernels.__file__).resolve()
    assert location.is_relative_to(Path(site_packages).resolve()), f"imm_kernels imported from {location}"
    backends = imm_kernels.available_backends()
    assert {"reference", "cpu"} <= set(backends), backends
    checked = check_ops()
    runtimes = check_openmp()
    print(json.dumps({"file": str(location), "version": imm_kernels.__version__, "torch": torch.__version__,
                      "backends": backends, "checked": checked, "openmp": runtimes}))


if __name__ == "__main__":
    main(sys.argv[1:])

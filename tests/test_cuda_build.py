"""The CUDA wheel, built here with nvcc (no GPU needed) and repaired as released (csrc/build_wheels.py):
machine code for exactly the architectures asked for and no PTX, a +cuXY version, a manylinux platform tag, MMD
kernels free of register spills and stack frames, the GPU-verified kernels' machine code unchanged, and a module
that loads and probes for a device without crashing. Skipped where nvcc is missing. The first run builds for
40 s to 1.5 minutes on 2 cores; reruns reuse build/cuda-wheel-test/."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import imm_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
import build_wheels  # noqa: E402  (csrc/build_wheels.py: the release build)

ARCHS = "80-real;90a-real"
EXPECTED_ELF = {"sm_80", "sm_90a"}


def find_nvcc() -> str | None:
    """The CUDA compiler the build would use: CUDACXX, else nvcc on PATH."""
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"].split()[0]
    return shutil.which("nvcc")


def find_cuobjdump(nvcc: str) -> str | None:
    """cuobjdump from PATH, beside nvcc, in the triton wheel, or from the nvidia-cuda-cuobjdump wheel."""
    candidates = [shutil.which("cuobjdump"), str(Path(nvcc).resolve().parent / "cuobjdump")]
    for site in map(Path, sys.path):
        candidates += [site / "triton/backends/nvidia/bin/cuobjdump", site / "nvidia/cuda_cuobjdump/bin/cuobjdump"]
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK) and Path(c).is_file()), None)


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (put it on PATH or set CUDACXX): "
                                                     "the CUDA wheel cannot be built on this machine")


def run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The CUDA wheel as released: built and repaired by csrc/build_wheels.py (the same code as the release command)."""
    try:
        return build_wheels.build_wheel(tmp_path_factory.mktemp("wheel"), ROOT / "build" / "cuda-wheel-test", ARCHS)
    except RuntimeError as error:
        pytest.fail(f"the CUDA wheel did not build or repair:\n{error}")


@pytest.fixture(scope="module")
def extension(wheel, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(out)
    (module,) = (out / "imm_kernels").glob("_cuda*.so")
    return module


@pytest.fixture(scope="module")
def cuobjdump() -> str:
    tool = find_cuobjdump(NVCC)
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA's bin folder, the triton wheel or pip install nvidia-cuda-cuobjdump)")
    return tool


def test_version_carries_the_nvcc_release(wheel):
    major, minor = re.search(r"release (\d+)\.(\d+)", run(NVCC, "--version")).groups()
    assert wheel.name.split("-")[1] == f"{imm_kernels.__version__}+cu{major}{minor}"


def test_platform_tag_is_manylinux_with_nothing_bundled_that_torch_brings(wheel):
    """auditwheel's symbol tag is the file's platform tag; libgomp.so.1 (torch's) is the only external library."""
    report = build_wheels.check(wheel)
    assert report["sym_tag"].startswith("manylinux") and wheel.name.endswith(f"-{report['sym_tag']}.whl")
    assert set(report["external_libs"]) <= {"libgomp.so.1"}, report["external_libs"]


def test_machine_code_for_exactly_the_requested_architectures(extension, cuobjdump):
    elf = run(cuobjdump, "--list-elf", str(extension))
    assert set(re.findall(r"\.(sm_\w+)\.cubin", elf)) == EXPECTED_ELF, elf
    ptx = run(cuobjdump, "--list-ptx", str(extension))
    assert not re.search(r"PTX file\s+\d+:", ptx), f"PTX embedded, though no virtual architecture was asked for:\n{ptx}"


def kernel_resources(report: str) -> list[tuple[str, str, dict[str, int]]]:
    """(architecture, kernel, {REG, STACK, LOCAL, ...}) for every kernel in a cuobjdump --dump-resource-usage."""
    rows, arch, kernel = [], None, None
    for line in report.splitlines():
        if match := re.match(r"\s*arch = (\w+)", line):
            arch = match.group(1)
        elif match := re.match(r"\s*Function (\S+):", line):
            kernel = match.group(1)
        elif kernel and (fields := dict(re.findall(r"(\w+):(\d+)", line))):
            rows.append((arch, kernel, {k: int(v) for k, v in fields.items()}))
            kernel = None
    return rows


def demangled(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


def test_mmd_kernels_neither_spill_nor_use_a_stack_frame(extension, cuobjdump):
    rows = kernel_resources(run(cuobjdump, "--dump-resource-usage", str(extension)))
    names = demangled([kernel for _, kernel, _ in rows])
    table = [f"{arch:7} REG {r['REG']:3}  STACK {r['STACK']:3}  LOCAL {r['LOCAL']:3}  SHARED {r['SHARED']:5}  "
             f"{re.sub(r'imm::cuda::.anonymous namespace.::', '', name)}"
             for (arch, _, r), name in zip(rows, names)]
    print("\n".join(table))  # the resource report of every kernel, for pytest -s / -rA
    assert {arch for (arch, _, _), name in zip(rows, names) if "mmd_" in name} == EXPECTED_ELF
    # Spills live in the stack frame (local memory); the combine kernel's frame is libdevice's sin/cos
    # huge-argument path, never taken for times in [0, 1].
    offenders = [line for (_, _, r), line in zip(rows, table) if "mmd_" in line and (r["STACK"] or r["LOCAL"])]
    assert not offenders, "MMD kernels with a stack frame (register spills):\n" + "\n".join(offenders)


# The kernels that passed the test suite on an H200 (2026-11-26; csrc/cuda/verified.h) and the fingerprint of their
# machine code for ARCHS, by the nvcc release that builds it: a change to them, or to what they include, shows here
# before it could reach a GPU unverified.
VERIFIED_KERNELS = ("mmd_group_kernel", "mmd_partial_sums_kernel", "mmd_finalize_kernel", "mmd_gradient_kernel",
                    "combine_kernel")
VERIFIED_FINGERPRINTS = {"13.0": "48:b3c9b5e4dbab223d06b6f598fd1fd728"}


def sass_fingerprint(sass: str) -> str:
    """'<kernels>:<hash>' of the verified kernels' instructions (addresses, encodings and the compiler's
    per-build name hashes left out)."""
    functions, key = {}, None
    for line in sass.splitlines():
        if line.strip().startswith("Fatbin"):  # the next compilation unit's header: no function's code
            key = None
        elif match := re.match(r"\s*arch = (\w+)", line):
            arch = match.group(1)
        elif match := re.match(r"\s*Function : (\S+)", line):
            name = re.sub(r"_GLOBAL__N__\w+?_\d+_\w+_cu_\w{8}|NS\d?_|\d+_combine_cu_\w{8}", "", match.group(1))
            verified = any(kernel in name for kernel in VERIFIED_KERNELS) and "4next" not in name  # not next::
            key = (arch, name) if verified else None
            if key:
                functions[key] = []
        elif key and (code := re.sub(r"/\*[0-9a-f]{4}\*/|/\* 0x[0-9a-f]+ \*/", "", line).strip()):
            functions[key].append(code)
    digest = hashlib.sha256()
    for key in sorted(functions):
        digest.update(repr(key).encode())
        digest.update("\n".join(functions[key]).encode())
    return f"{len(functions)}:{digest.hexdigest()[:32]}"


def test_verified_kernels_keep_their_machine_code(extension, cuobjdump):
    release = ".".join(re.search(r"release (\d+)\.(\d+)", run(NVCC, "--version")).groups())
    if release not in VERIFIED_FINGERPRINTS:
        pytest.skip(f"no fingerprint recorded for nvcc {release} (recorded: {', '.join(VERIFIED_FINGERPRINTS)})")
    assert sass_fingerprint(run(cuobjdump, "-sass", str(extension))) == VERIFIED_FINGERPRINTS[release], (
        "the machine code of the GPU-verified CUDA kernels changed: a change to csrc/cuda/mmd.cu, combine.cu, "
        "verified.h or what they include must pass the suite on a GPU (tests/gpu_check.sh) before it lands")


def test_module_loads_and_probes_for_a_device(extension):
    """Loads beside any torch build (static cudart); without a driver the probe says False rather than crashing."""
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('imm_kernels._cuda', "
             f"{str(extension)!r}); module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
             "print(module.device_available())")
    assert run(sys.executable, "-c", probe).strip() in ("True", "False")

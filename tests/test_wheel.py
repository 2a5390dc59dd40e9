"""The CPU wheel as released, installed away from the source tree (about 1 minute on 2 cores; `pytest -m wheel`
selects these tests, `-m "not wheel"` leaves them out).

csrc/build_wheels.py builds the wheel and repairs it to its manylinux tag; a fresh virtual environment in a
temporary folder (no --system-site-packages: nothing of the development environment is visible in it) gets the
wheel and the pinned torch and numpy of tests/requirements.txt (pip's cache makes that about 20 s), and
tests/wheel_check.py runs there with python -I from a folder outside the checkout: imm_kernels must come from that
environment's site-packages, every public op must match the reference forward and backward, and one OpenMP runtime
(torch's) must be mapped. The CUDA wheel's contents (architectures, +cuXY version, platform tag) are checked in
tests/test_cuda_build.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import imm_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
import build_wheels  # noqa: E402  (csrc/build_wheels.py: the release build)

pytestmark = pytest.mark.wheel


def pins(*names: str) -> list[str]:
    """The name==version lines of tests/requirements.txt for these packages."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "tests" / "requirements.txt").read_text().splitlines()]
    found = [line for line in lines if line.split("==")[0] in names]
    assert len(found) == len(names), f"tests/requirements.txt pins {found}, expected {names}"
    return found


def run(*command: str, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def outside_env() -> dict:
    """This process's environment without what would point a python at the checkout or at this venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "TRITON_INTERPRET")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheels.build_wheel(tmp_path_factory.mktemp("dist"), ROOT / "build" / "wheel-test")


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(python, site-packages) of a fresh venv holding the wheel and the pinned torch."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(home / "env")
    python = home / "env" / "bin" / "python"
    # pip of this environment installs into the new one (--python): the new venv needs no pip of its own.
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check",
        str(wheel), *pins("torch", "numpy"), cwd=home, env=outside_env())
    site = Path(run(str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=home).strip())
    return python, site


def test_wheel_tag_and_version(wheel):
    report = build_wheels.check(wheel)
    name, version, python_tag, abi_tag, platform = wheel.name.removesuffix(".whl").split("-")
    assert name == "imm_kernels" and version == imm_kernels.__version__  # one version: imm_kernels/__init__.py
    assert platform == report["sym_tag"] and re.fullmatch(r"manylinux_2_\d+_x86_64", platform), platform
    assert set(report["external_libs"]) <= {"libgomp.so.1"}, report["external_libs"]  # torch brings it
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"imm_kernels-{version}.dist-info/METADATA").decode()
    assert f"\nVersion: {imm_kernels.__version__}\n" in metadata
    assert any(re.fullmatch(r"imm_kernels/_C\..*\.so", n) for n in names) and not any("_cuda" in n for n in names)
    assert any(n.endswith("dist-info/licenses/LICENSE") for n in names), "LICENSE is not in the wheel"


def test_installed_wheel_matches_the_reference(installed, tmp_path):
    python, site = installed
    script = tmp_path / "wheel_check.py"  # a copy: nothing of the checkout on sys.path
    script.write_text((ROOT / "tests" / "wheel_check.py").read_text())
    report = json.loads(run(str(python), "-I", str(script), str(site), cwd=tmp_path, env=outside_env())
                        .strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site)
    assert report["version"] == imm_kernels.__version__
    assert "cpu" in report["backends"] and len(report["checked"]) == 18, report
    assert len(report["openmp"]) == 1 and "/torch/lib/" in report["openmp"][0], report["openmp"]


def test_one_openmp_runtime_in_the_development_build(tmp_path):
    """The editable build of .ci/env.sh shares torch's libgomp the same way."""
    report = json.loads(run(sys.executable, str(ROOT / "tests" / "wheel_check.py"), "--openmp-only", cwd=tmp_path))
    assert len(report["openmp"]) == 1, report


def test_sdist(tmp_path):
    """The sdist of csrc/build_wheels.py: the plain version, the sources and the license, no build outputs."""
    import tarfile

    sdist = build_wheels.build_sdist(tmp_path)
    assert sdist.name == f"imm_kernels-{imm_kernels.__version__}.tar.gz"
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "pyproject.toml", "CMakeLists.txt", "csrc/bindings.cpp", "imm_kernels/__init__.py"} <= names
    assert not [n for n in names if n.startswith((".venv/", "build/", "dist/")) or n.endswith(".so")]

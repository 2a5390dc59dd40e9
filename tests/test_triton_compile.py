"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) on a machine without one, in each constexpr
variant that matters, so that lowering errors the interpreter cannot see (types, layouts, operations
without a GPU lowering) fail here. Each target compiles in a subprocess (this file run as a script) without
TRITON_INTERPRET: the kernels of this process were defined for the interpreter."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = [80, 90]

# Pointer parameters in the input dtype, in float64, in int32; every other pointer is in the accumulation dtype.
INPUT_POINTERS = {"y_t_ptr", "y_r_ptr", "f_t_ptr", "f_r_ptr", "grad_t_ptr", "grad_r_ptr", "grad_output_ptr", "out_ptr", "src0_ptr",
                  "src1_ptr", "dst0_ptr", "dst1_ptr"}
FLOAT64_POINTERS = {"partial_ptr", "sums_ptr", "mix_ptr"}
INT32_POINTERS = {"counter_ptr"}


def signature(kernel, dtype: str) -> dict:
    """Triton's type of each parameter for inputs of `dtype` ("fp32", "bf16", ...)."""
    acc = "fp64" if dtype == "fp64" else "fp32"

    def param_type(param):
        if param.is_constexpr:
            return "constexpr"
        if param.annotation:  # floats declared in the kernel, e.g. eps: tl.float64
            return param.annotation
        if param.name.endswith("_ptr"):
            if param.name in INPUT_POINTERS:
                return "*" + dtype
            return "*" + ("fp64" if param.name in FLOAT64_POINTERS else "i32" if param.name in INT32_POINTERS else acc)
        return "i32"

    return {param.name: param_type(param) for param in kernel.params}


def aligned(kernel, constexprs: dict) -> tuple[dict, dict]:
    """(attrs, constexprs) of the specialization a launch gets with 16-byte aligned tensors of packed features and
    sizes divisible by 16 (the benchmark shapes): feature strides are 1 (Triton makes an argument equal to 1 a
    constant), every other pointer and integer argument divisible by 16."""
    unit = {param.name: 1 for param in kernel.params if param.name.endswith("feature_stride")}
    attrs = {(index,): [["tt.divisibility", 16]] for index, param in enumerate(kernel.params)
             if not param.is_constexpr and not param.annotation and param.name not in unit}
    return attrs, {**constexprs, **unit}


def variants():
    """(kernel, input dtype, constexprs), with the block sizes the launches pick on a GPU (and num_warps among the
    constexprs where the launch sets it: compile() takes it out)."""
    import torch
    import triton
    import triton.language as tl

    from imm_kernels.triton import interpolant, mmd

    def group_shape(group_size, dtype, features=None, acc=True, design="tile", backward=False, mix=False):
        """The group constexprs, and the tile width for `features` unless None (the finalize has no tiles)."""
        pad = triton.next_power_of_2(group_size)
        shape = dict(GROUP_SIZE=group_size, GROUP_PAD=pad)
        if acc:
            shape["ACC"] = tl.float64 if dtype == "fp64" else tl.float32
            shape["DESIGN"] = design
            shape["MIX"] = mix
        if features is not None:
            torch_acc = torch.float64 if dtype == "fp64" else torch.float32
            shape["BLOCK_D"] = mmd.block_features(pad, features, torch_acc, torch.device("cuda"), design, backward)
        return shape

    def forward(kernel="laplace", estimator="v", reduction="mean", tensors=True, save=True):
        return dict(KERNEL=kernel, ESTIMATOR=estimator, REDUCTION=reduction, BANDWIDTH_TENSOR=tensors,
                    WEIGHT_TENSOR=tensors, SAVE=save)

    # Many small groups, e.g. (G, M, D) = (1024, 4, 4096): forward and backward one program per group.
    for kernel in ("laplace", "rbf", "energy"):
        for estimator in ("v", "u", "unpaired"):
            yield mmd._mmd_forward_kernel, "fp32", dict(group_shape(4, "fp32", 4096), **forward(kernel, estimator))
    for dtype, kernel in (("bf16", "laplace"), ("fp16", "rbf"), ("fp64", "energy")):
        yield mmd._mmd_forward_kernel, dtype, dict(group_shape(4, dtype, 4096), **forward(kernel, "u"))
    for group_size, features in ((1, 4096), (3, 4096), (8, 4096), (16, 4096), (4, 1)):
        yield mmd._mmd_forward_kernel, "fp32", dict(group_shape(group_size, "fp32", features), **forward())
    for reduction, tensors, save in (("none", False, False), ("sum", True, False), ("mean", False, True)):
        yield mmd._mmd_forward_kernel, "fp32", dict(group_shape(4, "fp32", 4096),
                                                    **forward(reduction=reduction, tensors=tensors, save=save))
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        yield mmd._mmd_backward_kernel, dtype, dict(group_shape(4, dtype, 4096), WRITE_T=True, WRITE_R=True)
    yield mmd._mmd_backward_kernel, "fp32", dict(group_shape(16, "fp32", 3072), WRITE_T=True, WRITE_R=False)
    # Few large groups, e.g. (8, 8, 196608): features split into chunks.
    for dtype in ("fp32", "bf16", "fp64"):
        yield mmd._mmd_partial_sums_kernel, dtype, group_shape(8, dtype, 196608)
        yield mmd._mmd_backward_kernel, dtype, dict(group_shape(8, dtype, 196608), WRITE_T=True, WRITE_R=True)
    yield mmd._mmd_partial_sums_kernel, "fp32", group_shape(16, "fp32", 196608)
    for dtype, kernel, estimator, reduction in (("fp32", "laplace", "u", "mean"), ("fp32", "rbf", "v", "none"),
                                                ("bf16", "energy", "u", "sum"), ("fp64", "laplace", "v", "mean")):
        yield mmd._mmd_finalize_kernel, dtype, dict(group_shape(8, dtype, acc=False),
                                                    **forward(kernel, estimator, reduction))

    # The "stream" design (_dispatch.VARIANTS): forward, split pass 1 and backward, narrow and wide types.
    for dtype, group_size in (("fp32", 4), ("bf16", 4), ("fp32", 16), ("fp64", 8)):
        yield mmd._mmd_forward_kernel, dtype, dict(group_shape(group_size, dtype, 4096, design="stream"), **forward(),
                                                   num_warps=mmd._STREAM_WARPS)
        yield mmd._mmd_backward_kernel, dtype, dict(group_shape(group_size, dtype, 4096, design="stream",
                                                                backward=True), WRITE_T=True, WRITE_R=dtype == "fp32")
    yield mmd._mmd_partial_sums_kernel, "fp32", dict(group_shape(8, "fp32", 196608, design="stream"),
                                                     num_warps=mmd._STREAM_WARPS)

    # The loss head's mix (loss_head.py): both designs, both directions, narrow and wide types, split and not.
    for design in ("tile", "stream"):
        warps = dict(num_warps=mmd._STREAM_WARPS) if design == "stream" else {}
        for dtype in ("fp32", "bf16", "fp64"):
            yield mmd._mmd_forward_kernel, dtype, dict(group_shape(4, dtype, 3072, design=design, mix=True),
                                                       **forward(), **warps)
            yield mmd._mmd_backward_kernel, dtype, dict(group_shape(4, dtype, 3072, design=design, backward=True,
                                                                    mix=True), WRITE_T=True, WRITE_R=dtype == "fp32")
        yield mmd._mmd_partial_sums_kernel, "fp32", dict(group_shape(4, "fp32", 65536, design=design, mix=True),
                                                         **warps)

    # combine: every (kind, schedule, param) of the public ops, forward and transposed (the backward).
    cases = [("interpolate", s, "simple_edm", outputs) for s in ("fm", "cosine") for outputs in (1, 2)]
    cases += [("imm_output", "fm", p, 1) for p in ("simple_edm", "euler_fm", "identity")]
    cases += [("imm_output", "cosine", p, 1) for p in ("simple_edm", "identity")]

    def combine(kind, schedule, param, outputs, transpose, dtype="fp32", features=3072, times=(True, True)):
        has_src1 = outputs == 2 or not transpose
        return dict(KIND=kind, SCHEDULE=schedule, PARAM=param, OUTPUTS=outputs, TRANSPOSE=transpose,
                    HAS_SRC1=has_src1, WRITE0=True, WRITE1=outputs == 2 or transpose, TIME0_TENSOR=times[0],
                    TIME1_TENSOR=times[1], BLOCK_F=interpolant.block_features(features)[0],
                    ACC=tl.float64 if dtype == "fp64" else tl.float32)

    for case in cases:
        for transpose in (False, True):
            yield interpolant._combine_kernel, "fp32", combine(*case, transpose)
    for dtype in ("bf16", "fp16", "fp64"):
        for case in (("interpolate", "fm", "simple_edm", 2), ("imm_output", "cosine", "simple_edm", 1)):
            for transpose in (False, True):
                yield interpolant._combine_kernel, dtype, combine(*case, transpose, dtype=dtype, features=9000)
    yield interpolant._combine_kernel, "fp32", combine("imm_output", "fm", "simple_edm", 1, False, times=(False, True))
    wide = combine("interpolate", "fm", "simple_edm", 2, False, features=9000)
    wide["BLOCK_F"] = interpolant.block_features(9000, "wide")[0]
    yield interpolant._combine_kernel, "bf16", wide


def compile(kernel, dtype: str, constexprs: dict, attrs: dict, target):
    """triton.compile of one variant (its num_warps, if any, as an option)."""
    import triton

    values = dict(constexprs)
    options = {"num_warps": values.pop("num_warps")} if "num_warps" in values else None
    return triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=values,
                                                    attrs=attrs), target=target, options=options)


def compile_all(arch: int) -> int:
    """Compiles every variant for sm_<arch>; prints each failure and returns their count."""
    import triton
    from triton.backends.compiler import GPUTarget

    from imm_kernels.triton import interpolant, mmd

    target = GPUTarget("cuda", arch, 32)
    failures = 0
    compiled = set()
    for kernel, dtype, constexprs in variants():
        compiled.add(kernel.__name__)
        try:
            # Any layout; on sm_90 also the aligned specialization (the one benchmarks.model reads).
            for attrs, values in [({}, constexprs)] + ([aligned(kernel, constexprs)] if arch == 90 else []):
                compile(kernel, dtype, values, attrs, target)
        except Exception as error:  # noqa: BLE001  (report every failing variant, not just the first)
            failures += 1
            print(f"FAILED sm_{arch} {kernel.__name__} {dtype} {constexprs}:\n{error}\n")
    kernels = {name for module in (mmd, interpolant) for name, value in vars(module).items()
               if isinstance(value, triton.JITFunction) and name.endswith("_kernel")}
    for name in sorted(kernels - compiled):
        failures += 1
        print(f"FAILED {name}: no variant of it is compiled here")
    return failures


@pytest.fixture(scope="module")
def compilers(tmp_path_factory):
    """One subprocess per target, all started at once (they run side by side on a multi-core machine)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compile for real, leave no cache
    processes = {arch: subprocess.Popen([sys.executable, __file__, str(arch)], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True) for arch in ARCHS}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_kernels_compile_for_gpu(compilers, arch):
    output, _ = compilers[arch].communicate(timeout=900)
    assert compilers[arch].returncode == 0, output[-20000:]


if __name__ == "__main__":
    sys.exit(min(compile_all(int(sys.argv[1])), 1) if len(sys.argv) == 2 else 2)

"""interpolate, interpolate_pair, ddim and imm_output on every native backend against the float64 reference."""

import pytest
import torch
from conftest import BACKEND_CASES, rel_error, rtol

import imm_kernels
from imm_kernels import reference

# (op name, schedule, param) cases; ops take (in0, in1, time0[, time1]) as in the public API.
CASES = [("interpolate", s, None) for s in ("fm", "cosine")] + \
        [("interpolate_pair", s, None) for s in ("fm", "cosine")] + \
        [("ddim", s, None) for s in ("fm", "cosine")] + \
        [("imm_output", "fm", p) for p in ("simple_edm", "euler_fm", "identity")] + \
        [("imm_output", "cosine", p) for p in ("simple_edm", "identity")]


def call(module, op, in0, in1, t0, t1, schedule, param, **extra):
    fn = getattr(module, op)
    if op == "interpolate":
        return fn(in0, in1, t0, schedule=schedule, **extra)
    if op == "interpolate_pair":
        return fn(in0, in1, t0, t1, schedule=schedule, **extra)
    if op == "ddim":
        return fn(in0, in1, t0, t1, schedule=schedule, **extra)
    return fn(in0, in1, t0, t1, schedule=schedule, param=param, sigma_data=0.7, **extra)


def times(op, batch, device, dtype=torch.float64):
    """Random per-sample times; s <= t for the ops that move from t to s."""
    t = torch.rand(batch, dtype=dtype, device=device) * 0.98 + 0.01
    other = torch.rand(batch, dtype=dtype, device=device)
    return (t, other) if op.startswith("interpolate") else (other * t, t)


def outputs(value):
    return value if isinstance(value, tuple) else (value,)


def run_both(op, schedule, param, in0, in1, t0, t1, backend):
    """(outputs, grads) of the backend and of the float64 reference for a random probe of the outputs."""
    a = [x.detach().requires_grad_() for x in (in0, in1)]
    got = outputs(call(imm_kernels, op, *a, t0, t1, schedule, param, backend=backend))
    probes = [torch.randn(o.shape, dtype=torch.float64) for o in got]
    sum((o.double().cpu() * p).sum() for o, p in zip(got, probes)).backward()
    b = [x.detach().double().requires_grad_() for x in (in0, in1)]
    want = outputs(call(reference, op, *b, t0.double(), t1.double(), schedule, param))
    sum((o.cpu() * p).sum() for o, p in zip(want, probes)).backward()
    return (got, (a[0].grad, a[1].grad)), (want, (b[0].grad, b[1].grad))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("op,schedule,param", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 1), (6, 3, 4, 5), (3, 9000)], ids=["D1", "BCHW", "wide"])
def test_matches_reference(device, backend, op, schedule, param, dtype, shape):
    in0 = torch.randn(shape, device=device).to(dtype)
    in1 = torch.randn(shape, device=device).to(dtype)
    t0, t1 = times(op, shape[0], device)
    (got, grads), (want, want_grads) = run_both(op, schedule, param, in0, in1, t0, t1, backend)
    for g, w in zip(got + grads, want + want_grads):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_error(g, w) <= rtol(dtype, device, backend), f"{op}: {rel_error(g, w):.3g}"


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("op,schedule,param", CASES)
def test_scalar_times_and_noncontiguous(device, backend, op, schedule, param):
    transposed = torch.randn(4, 6, 5, device=device, dtype=torch.float64).transpose(1, 2)
    row_slice = torch.randn(4, 9, device=device, dtype=torch.float64)[:, :5]  # packed features, row stride 9
    t0, t1 = (0.7, 0.3) if op.startswith("interpolate") else (0.3, 0.7)
    for in0, in1 in ((transposed, torch.randn(4, 5, 6, device=device, dtype=torch.float64)),
                     (row_slice, torch.randn(4, 11, device=device, dtype=torch.float64)[:, 3:8])):
        got = outputs(call(imm_kernels, op, in0, in1, t0, t1, schedule, param, backend=backend))
        want = outputs(call(reference, op, in0, in1, t0, t1, schedule, param))
        for g, w in zip(got, want):
            assert rel_error(g, w) <= rtol(torch.float64, device, backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("op,schedule,param", CASES)
def test_gradcheck(device, backend, op, schedule, param):
    in0 = torch.randn(3, 4, device=device, dtype=torch.float64, requires_grad=True)
    in1 = torch.randn(3, 4, device=device, dtype=torch.float64, requires_grad=True)
    t0, t1 = times(op, 3, device)
    assert torch.autograd.gradcheck(lambda a, b: call(imm_kernels, op, a, b, t0, t1, schedule, param,
                                                      backend=backend), (in0, in1))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_edges_of_time(device, backend):
    """t = 0 and s = t: the maps are the identity on x_t; s -> t does not cancel."""
    x = torch.randn(4, 7, device=device, dtype=torch.float64)
    g = torch.randn_like(x)
    zero = torch.zeros(4, dtype=torch.float64, device=device)
    for param in ("simple_edm", "identity"):
        out = imm_kernels.imm_output(x, g, zero, zero, param=param, backend=backend)
        assert torch.equal(out, x)
    t = torch.full((4,), 0.5, dtype=torch.float64, device=device)
    s = t - 1e-7
    got = imm_kernels.imm_output(x.float(), g.float(), s.float(), t.float(), backend=backend)
    want = reference.imm_output(x, g, s.float().double(), t.float().double())
    assert rel_error(got, want) <= rtol(torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    """The custom op's schema and fake, forward and transposed, with time tensors and plain values."""
    x = torch.randn(4, 6, device=device)
    n = torch.randn_like(x)
    t = torch.rand(4, device=device)
    r = t * 0.5
    op = torch.ops.imm_kernels.combine.default
    torch.library.opcheck(op, (x, n, r, 0.0, t, 0.0, "imm_output", 1, False, True, False, "fm", "simple_edm", 0.5,
                               backend))
    torch.library.opcheck(op, (x, n, t, 0.0, None, 0.3, "interpolate", 2, False, True, True, "cosine", "simple_edm",
                               0.5, backend))
    torch.library.opcheck(op, (x, n, None, 0.6, r, 0.0, "interpolate", 2, True, True, False, "fm", "simple_edm", 0.5,
                               backend))
    torch.library.opcheck(op, (x, None, t, 0.0, t, 0.0, "interpolate", 1, True, False, True, "fm", "simple_edm", 0.5,
                               backend))


BAD_CALLS = [
    (dict(x=torch.randn(4, 3), noise=torch.randn(4, 2)), ValueError, "x and noise must have the same shape"),
    (dict(noise=torch.randn(4, 3, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(x=torch.arange(12).view(4, 3), noise=torch.arange(12).view(4, 3)), TypeError, "x must be float32"),
    (dict(t=1.5), ValueError, r"t must lie in \[0, 1\]"),
    (dict(t=-0.1), ValueError, r"t must lie in \[0, 1\]"),
    (dict(t=torch.tensor([0.1, 0.2, 1.2, 0.3])), ValueError, r"t must lie in \[0, 1\]"),
    (dict(t=torch.rand(3)), ValueError, r"t must be a float or a tensor of shape \(4,\)"),
    (dict(t=torch.tensor([1, 0, 1, 0])), TypeError, "t must be a float or a float tensor"),
    (dict(t="late"), TypeError, "t must be a float"),
    (dict(schedule="vp"), ValueError, "schedule must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(x=torch.randn(0, 3), noise=torch.randn(0, 3)), ValueError, "non-empty"),
]


@pytest.mark.parametrize("change,error,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_interpolate(change, error, match):
    args = {"x": torch.randn(4, 3), "noise": torch.randn(4, 3), "t": 0.5, **change}
    with pytest.raises(error, match=match):
        imm_kernels.interpolate(args.pop("x"), args.pop("noise"), args.pop("t"), **args)


@pytest.mark.parametrize("fn,kwargs,match", [
    (imm_kernels.imm_output, dict(param="edm"), "param must be one of"),
    (imm_kernels.imm_output, dict(param="euler_fm", schedule="cosine"), "euler_fm' is defined for schedule='fm'"),
    (imm_kernels.imm_output, dict(sigma_data=0.0), "sigma_data must be > 0"),
    (imm_kernels.imm_output, dict(s=0.8), "s must be <= t"),
    (imm_kernels.ddim, dict(s=torch.tensor([0.1, 0.9, 0.2, 0.3])), "s must be <= t"),
    (imm_kernels.interpolate_pair, dict(r=torch.tensor([0.1, 0.9, 0.2, float("nan")])), r"r must lie in \[0, 1\]"),
])
def test_bad_input_two_times(fn, kwargs, match):
    names = ("t", "r") if fn is imm_kernels.interpolate_pair else ("s", "t")
    times_ = {names[0]: 0.3, names[1]: 0.5}
    times_.update({k: kwargs.pop(k) for k in list(kwargs) if k in names})
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(4, 3), torch.randn(4, 3), times_[names[0]], times_[names[1]], **kwargs)


WIDE = 2 * 16384 + 1000  # three of the CPU kernel's 16384-feature blocks, the last one short


def wide_source(layout, device):
    """(leaf tensor, the (3, WIDE) view of it that an op reads): packed, every other element (feature stride 2),
    or one value per row (feature stride 0)."""
    if layout == "packed":
        leaf = torch.randn(3, WIDE, device=device, dtype=torch.float64, requires_grad=True)
        return leaf, leaf
    if layout == "strided":
        leaf = torch.randn(3, 2 * WIDE, device=device, dtype=torch.float64, requires_grad=True)
        return leaf, leaf[:, ::2]
    leaf = torch.randn(3, 1, device=device, dtype=torch.float64, requires_grad=True)
    return leaf, leaf.expand(3, WIDE)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("op,schedule,param",
                         [("interpolate_pair", "cosine", None), ("imm_output", "fm", "simple_edm")])
@pytest.mark.parametrize("layouts", [("packed", "strided"), ("strided", "expanded"), ("expanded", "packed")],
                         ids="-".join)
def test_wide_rows_and_strided_sources(device, backend, op, schedule, param, layouts):
    """Rows of several feature blocks, sources whose features are not packed, and the gradient of a sum, which
    arrives expanded (stride 0 everywhere); the outputs and the leaves' gradients match the reference."""
    (leaf0, in0), (leaf1, in1) = (wide_source(layout, device) for layout in layouts)
    t0, t1 = times(op, 3, device)
    results = []
    for module, options in ((imm_kernels, dict(backend=backend)), (reference, {})):
        out = outputs(call(module, op, in0, in1, t0, t1, schedule, param, **options))
        grads = torch.autograd.grad(sum(o.sum() for o in out), (leaf0, leaf1))
        results.append([o.detach() for o in out] + list(grads))
    for g, w in zip(*results):
        error = rel_error(g, w)
        assert error <= rtol(torch.float64, device, backend), f"{op} {layouts}: {error:.3g}"


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[0] == "cpu"])
@pytest.mark.parametrize("op,name", [("interpolate_pair", "t"), ("interpolate_pair", "r"), ("imm_output", "s")])
def test_negative_times_in_cpu_tensors_are_refused(device, backend, op, name):
    """A time below 0 in a tensor (as a float it never reaches the op), like one above 1 (BAD_CALLS)."""
    times_ = {"t": torch.tensor([0.5, 0.6, 0.7, 0.8]), "r": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    times_["s"] = times_["r"]
    times_[name] = torch.tensor([0.1, -0.2, 0.3, 0.4])
    order = ("t", "r") if op == "interpolate_pair" else ("s", "t")
    with pytest.raises(ValueError, match=rf"{name} must lie in \[0, 1\]"):
        getattr(imm_kernels, op)(torch.randn(4, 3), torch.randn(4, 3), *(times_[k] for k in order), backend=backend)


# The Triton interpreter truncates float32 to bfloat16 (a GPU rounds to nearest): not this test's subject.
@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values != ("cpu", "triton")])
def test_bfloat16_results_are_rounded_to_nearest(device, backend):
    """Computed in float32, a bfloat16 output differs from the float64 answer rounded to bfloat16 only where that
    lies within float32's error of a tie: rarely. Truncating instead differs about every other time, and stays
    within the norm-wise bound of RTOL."""
    x, noise = (torch.randn(64, 257, device=device).to(torch.bfloat16) for _ in range(2))
    t = torch.rand(64, device=device)
    got = imm_kernels.interpolate(x, noise, t, backend=backend)
    want = reference.interpolate(x.double(), noise.double(), t.double()).to(torch.bfloat16)
    assert (got != want).double().mean().item() < 0.01

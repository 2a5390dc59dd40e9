"""What a hostile-input probe found, each fixed and held here: one huge group (an abort before), gradients of
gradients (zeros before), saturated kernels and enormous elements (gradients off by 1e20 before), unchecked
public classes, torch.compile with dynamic shapes, value checks that compiled code skipped, expanded and
overlapping rows, and MMDLoss's tensor options outside module state."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BACKEND_CASES, DEVICES, rel_error

import imm_kernels
from imm_kernels import _validate, reference


def mmd_grads(y_t, y_r, group_size, backend, **options):
    """Loss and gradients of a fixed random functional of it, on `backend`."""
    a, b = (y.detach().clone().requires_grad_() for y in (y_t, y_r))
    loss = imm_kernels.mmd_loss(a, b, group_size, backend=backend, **options)
    probe = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    return (loss,) + torch.autograd.grad((loss * probe).sum(), (a, b))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("case", ["rbf_wide", "rbf_narrow", "outlier_t", "outlier_r", "outlier_energy"])
def test_saturated_kernels_and_enormous_elements_match_float64(device, backend, case):
    """float32 results within float32 accuracy of the float64 answer (item 3 of the probe)."""
    torch.manual_seed(0)
    features = 64
    y_t = torch.randn(8, features, device=device)
    y_r = y_t + 0.01 * torch.randn_like(y_t)
    options = {"rbf_wide": dict(kernel="rbf", bandwidth=1e4), "rbf_narrow": dict(kernel="rbf", bandwidth=30.0),
               "outlier_t": dict(kernel="laplace"), "outlier_r": dict(kernel="rbf"),
               "outlier_energy": dict(kernel="energy")}[case]
    if case.startswith("outlier"):
        (y_r if case == "outlier_r" else y_t)[1, 0] = 1e30
    got = mmd_grads(y_t, y_r, 4, backend, **options)
    want = mmd_grads(y_t.double(), y_r.double(), 4, "reference", **options)
    for name, g, w in zip(("loss", "grad_t", "grad_r"), got, want):
        if w.abs().max() == 0:
            assert g.abs().max() == 0, f"{name}: {g.abs().max():.3g} where the answer is 0"
        else:
            assert rel_error(g, w) <= 1e-6, f"{name}: relative error {rel_error(g, w):.3g}"


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", ["laplace", "rbf", "energy"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivatives_of_mmd_loss(device, backend, kernel, reduction):
    """create_graph=True: Hessian-vector products and gradient penalties as the reference's (item 2)."""
    y_t = torch.randn(8, 5, device=device, dtype=torch.float64, requires_grad=True)
    y_r = torch.randn(8, 5, device=device, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(y_t)

    def hessian_vector(fn):
        loss = fn(y_t, y_r, 4, kernel=kernel, reduction=reduction, bandwidth=torch.tensor([1.5, 3.0], device=device,
                                                                                           dtype=torch.float64))
        (g_t, g_r) = torch.autograd.grad(loss.sum(), (y_t, y_r), create_graph=True)
        return torch.autograd.grad((g_t * v).sum() + g_r.square().sum(), (y_t, y_r))

    got = hessian_vector(lambda *a, **k: imm_kernels.mmd_loss(*a, backend=backend, **k))
    want = hessian_vector(reference.mmd_loss)
    for g, w in zip(got, want):
        assert rel_error(g, w) <= 1e-10


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("op", ["interpolate_pair", "imm_output"])
def test_second_derivatives_of_the_interpolant_ops(device, backend, op):
    """A gradient penalty through the linear ops: the gradient's own gradient flows to what made it."""
    x = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    other = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.rand(4, device=device, dtype=torch.float64)
    weights = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)

    def penalty_grads(module, **backend_option):
        hidden = torch.tanh(weights * x)  # something the gradient depends on nonlinearly
        if op == "interpolate_pair":
            a, b = module.interpolate_pair(hidden, other, t, t * 0.5, **backend_option)
            out = (a * b).sum()
        else:
            out = (module.imm_output(hidden, other, t * 0.3, t, **backend_option) ** 3).sum()
        (g,) = torch.autograd.grad(out, weights, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (weights, x, other))

    for g, w in zip(penalty_grads(imm_kernels, backend=backend), penalty_grads(reference)):
        assert rel_error(g, w) <= 1e-10


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_expanded_and_overlapping_rows(device, backend):
    """Rows with stride 0 or a row stride below D are read as they are (item 7)."""
    base = torch.randn(40, device=device, dtype=torch.float64)
    overlapping = base.as_strided((8, 6), (3, 1))  # row i starts 3 elements after row i - 1
    expanded = torch.randn(1, 6, device=device, dtype=torch.float64).expand(8, 6)
    for y_t, y_r in ((overlapping, expanded), (expanded, overlapping)):
        got = mmd_grads(y_t, y_r, 4, backend)
        want = mmd_grads(y_t.contiguous(), y_r.contiguous(), 4, "reference")
        for g, w in zip(got, want):
            assert rel_error(g, w) <= 1e-12
    for fn in (imm_kernels.interpolate_pair, imm_kernels.imm_output):
        got = fn(expanded, overlapping, 0.25, 0.5, backend=backend)
        want = getattr(reference, fn.__name__)(expanded.contiguous(), overlapping.contiguous(), 0.25, 0.5)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert rel_error(g, w) <= 1e-12


@pytest.mark.skipif("cpu" not in imm_kernels.available_backends("cpu"), reason="needs the C++ CPU backend")
def test_one_huge_group_runs_where_it_fits():
    """M = 12000 rows in one group: the per-thread O(M^2) scratch made this abort the process with
    std::bad_alloc (item 1). Run in a child process, so a regression fails this test instead of killing the run."""
    script = textwrap.dedent("""
        import torch, imm_kernels
        torch.manual_seed(0)
        torch.set_num_threads(2)
        y_t, y_r = torch.randn(12000, 2), torch.randn(12000, 2) * 1.1
        with torch.no_grad():
            got = imm_kernels.mmd_loss(y_t, y_r, 12000, kernel="laplace", bandwidth=3.0, backend="cpu")
        # float64 by blocks of rows: sum_ij k over the three pair sets, V statistic.
        def kernel_sum(a, b):
            return sum(torch.exp(-3.0 * torch.cdist(a[i:i + 2000], b) / 2).sum() for i in range(0, len(a), 2000))
        t, r = y_t.double(), y_r.double()
        want = (kernel_sum(t, t) + kernel_sum(r, r) - 2 * kernel_sum(t, r)) / 12000 ** 2
        print(abs(got.double() - want).item() / want.item())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) < 1e-5


@pytest.mark.skipif("cpu" not in imm_kernels.available_backends("cpu"), reason="needs the C++ CPU backend")
def test_a_gradient_too_large_for_memory_is_a_python_error():
    y_t = torch.randn(300_000, 1).expand(300_000, 1).requires_grad_()  # M^2 coefficients: hundreds of GB
    with pytest.raises((RuntimeError, MemoryError)):
        imm_kernels.mmd_loss(y_t, torch.randn(300_000, 1), 300_000, backend="cpu")


def test_autograd_functions_are_not_public():
    """They took raw per-group tensors unchecked (item 4): the ops' public entry points are mmd_loss, MMDLoss,
    the interpolant functions and the torch.library ops."""
    assert not hasattr(imm_kernels, "MMDLossFunction") and not hasattr(imm_kernels, "CombineFunction")
    assert not {"MMDLossFunction", "CombineFunction"} & set(imm_kernels.__all__)


def _plain_variants():
    """mmd_loss's arguments, each entry one change from a valid common case (None: the case itself)."""
    y_t, y_r = torch.randn(8, 5), torch.randn(8, 5)
    nan, inf = float("nan"), float("inf")
    return [
        None, dict(group_size=8), dict(group_size=2, estimator="u"), dict(kernel="rbf", reduction="none"),
        dict(eps=0.0), dict(y_t=y_t.double(), y_r=y_r.double()), dict(y_t=y_t[:, None], y_r=y_r[:, None]),
        dict(group_size=3), dict(group_size=0), dict(group_size=-4), dict(group_size=True), dict(group_size=4.0),
        dict(group_size=1, estimator="u"), dict(group_size=1, estimator="unpaired"), dict(group_size=2, estimator="unpaired"),
        dict(kernel="gauss"), dict(kernel=["laplace"]), dict(kernel=None),
        dict(estimator="w"), dict(reduction="max"), dict(eps=-1.0), dict(eps=inf), dict(eps=nan), dict(eps=1),
        dict(bandwidth=0.0), dict(bandwidth=-1.0), dict(bandwidth=nan), dict(bandwidth=inf), dict(bandwidth=1),
        dict(bandwidth=torch.tensor(1.0)), dict(weight=1.0), dict(y_r=y_r.double()), dict(y_r=y_r[:, :4]),
        dict(y_r=y_r[:4]), dict(y_r=y_r.reshape(8, 5, 1)), dict(y_t=y_t.int(), y_r=y_r.int()),
        dict(y_t=torch.tensor(1.0), y_r=torch.tensor(2.0)), dict(y_t=y_t[:0], y_r=y_r[:0]),
        dict(y_t=y_t[:, :0], y_r=y_r[:, :0]), dict(y_r=y_r.to("meta")), dict(y_r=y_r.numpy()),
        dict(y_t=torch.nn.Parameter(y_t)),
    ]


@pytest.mark.parametrize("change", _plain_variants(), ids=lambda change: repr(change)[:60])
def test_the_common_case_test_passes_nothing_the_full_checks_refuse(change):
    """_validate.plain_mmd_device, mmd_loss's one-expression test of the common case (which then skips the full
    checks), passes only arguments that the full checks accept, with a plain float bandwidth and no weight; and it
    does take the valid common cases (else every call would pay for the full checks)."""
    arguments = {**dict(y_t=torch.randn(8, 5), y_r=torch.randn(8, 5), group_size=4, kernel="laplace", bandwidth=1.0,
                        weight=None, estimator="v", eps=1e-8, reduction="mean"), **(change or {})}
    try:
        _validate.full_mmd_options(**arguments)
        accepted = True
    except (TypeError, ValueError):
        accepted = False
    device = _validate.plain_mmd_device(**arguments)
    plain = (type(arguments["y_t"]) is torch.Tensor and type(arguments["bandwidth"]) is float
             and type(arguments["eps"]) is float and arguments["weight"] is None)
    assert (device is not None) == (accepted and plain), f"accepted={accepted}, plain={plain}"
    if device is not None:
        assert device == arguments["y_t"].device


@pytest.mark.parametrize("call,match", [
    (lambda y, b: torch.ops.imm_kernels.mmd_forward(y, y, b[:1].expand(3), 0.0, None, 1.0, 4, "laplace", "v", 1e-8,
                                                    "mean", False, False, "cpu"), "bandwidth"),
    (lambda y, b: torch.ops.imm_kernels.mmd_forward(y, y, b.half(), 0.0, None, 1.0, 4, "laplace", "v", 1e-8, "mean",
                                                    False, False, "cpu"), "bandwidth"),
    (lambda y, b: torch.ops.imm_kernels.combine(y, y, b[:3], 0.0, None, 0.5, "interpolate", 2, False, True, True, "fm",
                                                "simple_edm", 1.0, "cpu"), "time0"),
    (lambda y, b: torch.ops.imm_kernels.combine(y, y[:4], None, 0.2, None, 0.5, "interpolate", 2, False, True, True,
                                                "fm", "simple_edm", 1.0, "cpu"), "same shape"),
    (lambda y, b: torch.ops.imm_kernels.mmd_forward(y, y[:4], None, 1.0, None, 1.0, 4, "laplace", "v", 1e-8, "mean",
                                                    False, False, "cpu"), "same shape"),
    (lambda y, b: torch.ops.imm_kernels.mmd_forward(y, y, None, 1.0, None, 1.0, 3, "laplace", "v", 1e-8, "mean",
                                                    False, False, "cpu"), "multiple of group_size"),
    (lambda y, b: torch.ops.imm_kernels.mmd_backward(torch.ones(()), y, y, _saved(y)[:-1], 4, True, True, "cpu"),
     "saved"),
    (lambda y, b: torch.ops.imm_kernels.mmd_backward(torch.ones(()), y, y, _saved(y).double(), 4, True, True, "cpu"),
     "saved"),
    (lambda y, b: torch.ops.imm_kernels.mmd_backward(torch.ones(1), y, y, _saved(y), 4, True, True, "cpu"),
     "grad_output"),
    (lambda y, b: torch.ops.imm_kernels.loss_head_forward(y, y, y, y[:4], _mix(2), None, 1.0, None, 1.0, 4, "laplace",
                                                          "v", 1e-8, "mean", True, True, "cpu"), "same shape"),
    (lambda y, b: torch.ops.imm_kernels.loss_head_forward(y, y, y, y, _mix(1), None, 1.0, None, 1.0, 4, "laplace",
                                                          "v", 1e-8, "mean", True, True, "cpu"), "coefficients"),
    (lambda y, b: torch.ops.imm_kernels.loss_head_backward(torch.ones(()), y, y, y, y, _mix(2), _saved(y)[:5], 4, True,
                                                           True, "cpu"), "saved"),
])
def test_the_custom_ops_refuse_operands_that_would_read_out_of_bounds(call, match):
    """torch.ops callers reach the ops without the public functions' checks: every operand the kernels index is
    checked in the op itself."""
    y = torch.randn(8, 3)
    with pytest.raises(ValueError, match=match):
        call(y, torch.ones(2))


def _saved(y):
    """mmd_forward's saved state for y against itself in groups of 4 (cpu)."""
    return torch.ops.imm_kernels.mmd_forward(y, y, None, 1.0, None, 1.0, 4, "laplace", "v", 1e-8, "mean", True, True,
                                             "cpu")[1]


def _mix(groups):
    return torch.rand(groups, 4, dtype=torch.float64)


@pytest.mark.skipif("cpu" not in imm_kernels.available_backends("cpu"), reason="needs the C++ CPU backend")
def test_the_custom_ops_work_before_any_public_call():
    """A fresh process calling torch.ops.imm_kernels.* first (an exported program would): the ops load their
    extension themselves."""
    script = textwrap.dedent("""
        import torch, imm_kernels
        y = torch.randn(8, 3)
        loss, _ = torch.ops.imm_kernels.mmd_forward(y, y * 2, None, 1.0, None, 1.0, 4, "laplace", "v", 1e-8, "mean",
                                                    False, False, "cpu")
        out, _ = torch.ops.imm_kernels.combine(y, y, None, 0.2, None, 0.5, "interpolate", 1, False, True, False, "fm",
                                               "simple_edm", 1.0, "cpu")
        print(loss.item() > 0, bool(torch.isfinite(out).all()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_compile_with_dynamic_shapes(device, backend):
    """fullgraph=True, dynamic=True: Python floats become symbolic, and the defaults still check out (item 5)."""
    torch._dynamo.reset()

    def step(y_t, y_r, x, g, s, t):
        return imm_kernels.mmd_loss(y_t, y_r, 4, backend=backend) + imm_kernels.imm_output(x, g, s, t,
                                                                                           backend=backend).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (8, 12):
        arguments = (torch.randn(batch, 5, device=device), torch.randn(batch, 5, device=device),
                     torch.randn(batch, 3, device=device), torch.randn(batch, 3, device=device), 0.25, 0.75)
        assert rel_error(compiled(*arguments), step(*arguments)) <= 1e-6


BAD_VALUES = [
    ("negative bandwidth", lambda d, b: imm_kernels.mmd_loss(torch.randn(8, 3, device=d), torch.randn(8, 3, device=d), 4,
                                                             bandwidth=torch.tensor([1.0, -1.0], device=d), backend=b),
     "bandwidth must be > 0"),
    ("t above 1", lambda d, b: imm_kernels.interpolate_pair(torch.randn(4, 3, device=d), torch.randn(4, 3, device=d),
                                                            torch.tensor([0.1, 0.2, 1.5, 0.3], device=d), 0.5,
                                                            backend=b), "t must lie in"),
    ("s after t", lambda d, b: imm_kernels.imm_output(torch.randn(4, 3, device=d), torch.randn(4, 3, device=d),
                                                      torch.tensor([0.5, 0.9, 0.1, 0.2], device=d),
                                                      torch.tensor([0.6, 0.8, 0.2, 0.3], device=d), backend=b),
     "s must be <= t"),
]


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[0] == "cpu"])
@pytest.mark.parametrize("name,call,match", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bad_values_in_cpu_tensors_are_refused_eager_and_compiled(device, backend, name, call, match, compiled):
    """The checks live inside the ops, so torch.compile cannot skip them (item 6)."""
    torch._dynamo.reset()
    run = torch.compile(call, fullgraph=True, backend="aot_eager") if compiled else call
    with pytest.raises(ValueError, match=match):
        run(device, backend)


def test_mmd_loss_module_keeps_its_tensors_as_state():
    """Tensor bandwidth / weight are buffers: saved, moved and shown; the constructor checks (item 8)."""
    module = imm_kernels.MMDLoss(4, bandwidth=torch.tensor([1.0, 2.0]), weight=torch.tensor([0.5, 1.5]))
    assert set(module.state_dict()) == {"bandwidth", "weight"}
    assert "bandwidth=tensor of shape (2,)" in repr(module) and "weight=tensor of shape (2,)" in repr(module)
    module.double()
    assert module.bandwidth.dtype == module.weight.dtype == torch.float64
    y_t, y_r = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    expected = reference.mmd_loss(y_t, y_r, 4, bandwidth=torch.tensor([1.0, 2.0]).double(),
                                  weight=torch.tensor([0.5, 1.5]).double())
    assert rel_error(module(y_t, y_r), expected) <= 1e-12
    restored = imm_kernels.MMDLoss(4, bandwidth=torch.ones(2), weight=torch.ones(2))
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored.bandwidth, module.bandwidth.float())
    if "cuda" in DEVICES:
        assert module.to("cuda").bandwidth.device.type == "cuda"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bandwidth=torch.tensor([1.0, -2.0])), ValueError, "bandwidth must be > 0"),
    (dict(bandwidth=0.0), ValueError, "bandwidth must be > 0"),
    (dict(weight=torch.ones(2, 2)), ValueError, "weight must be a float or a 0-d or"),
    (dict(kernel="gauss"), ValueError, "kernel must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
])
def test_mmd_loss_module_checks_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        imm_kernels.MMDLoss(4, **kwargs)

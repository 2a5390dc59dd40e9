"""imm_mmd_loss, the fused loss head, on every native backend: against the float64 reference of the composition
(imm_output twice, then mmd_loss) and against the composition of the same backend's ops, with per-group times;
the paths that compose instead of fusing; torch.compile, opcheck; bad input."""

import pytest
import torch
from conftest import BACKEND_CASES, rel_error, rtol, skip_where_refused, threads

import imm_kernels
from imm_kernels import imm, reference

KERNELS = ["laplace", "rbf", "energy"]
SCHEDULES = [("fm", "simple_edm"), ("fm", "euler_fm"), ("cosine", "simple_edm"), ("fm", "identity")]


def group_times(groups, device="cpu"):
    """Per-group (s, r, t), s < r < t, float64, away from the ends."""
    t = 0.1 + 0.85 * torch.rand(groups, dtype=torch.float64, device=device)
    s = t * torch.rand(groups, dtype=torch.float64, device=device) * 0.9
    return s, s + (t - s) * (0.5 + 0.4 * torch.rand(groups, dtype=torch.float64, device=device)), t


def composed(x_t, g_t, x_r, g_r, s, r, t, group_size, backend, schedule="fm", param="simple_edm", **options):
    """The loss as the user would write it from the ops (float64 `reference` gives the oracle)."""
    rows = [v.repeat_interleave(group_size) for v in (s, r, t)]
    coefficients = dict(schedule=schedule, param=param)
    if backend == "reference":
        y_t = reference.imm_output(x_t, g_t, rows[0], rows[2], **coefficients)
        y_r = reference.imm_output(x_r, g_r, rows[0], rows[1], **coefficients)
        return reference.mmd_loss(y_t, y_r, group_size, **options)
    y_t = imm_kernels.imm_output(x_t, g_t, rows[0], rows[2], backend=backend, **coefficients)
    y_r = imm_kernels.imm_output(x_r, g_r, rows[0], rows[1], backend=backend, **coefficients)
    return imm_kernels.mmd_loss(y_t, y_r, group_size, backend=backend, **options)


def loss_and_gradients(fn, inputs, wanted, probe):
    """fn(*inputs) and the gradients of <probe, fn> for the inputs at `wanted` (fresh leaves)."""
    inputs = [x.detach().clone().requires_grad_(index in wanted) if isinstance(x, torch.Tensor) else x
              for index, x in enumerate(inputs)]
    loss = fn(*inputs)
    grads = torch.autograd.grad((loss.double() * probe).sum(), [inputs[i] for i in wanted])
    return [loss, *grads]


def compare(device, backend, dtype, group_size=4, features=37, groups=3, wanted=(1,), near=False, tolerance=None,
            schedule="fm", param="simple_edm", layout=None, **options):
    """The fused head against the float64 reference and against the backend's own composition."""
    shape = (groups * group_size, features) if layout is None else (groups * group_size, *layout)
    x_t, g_t = (torch.randn(shape, dtype=torch.float64, device=device) for _ in range(2))
    if near:  # late in training: the two outputs nearly agree
        x_r, g_r = x_t + 1e-4 * torch.randn_like(x_t), g_t + 1e-4 * torch.randn_like(g_t)
        t = 0.1 + 0.85 * torch.rand(groups, dtype=torch.float64, device=device)
        s, r = t * 0.5, t * (1 - 1e-5)
    else:
        x_r, g_r = (torch.randn(shape, dtype=torch.float64, device=device) for _ in range(2))
        s, r, t = group_times(groups, device)
    inputs = [x_t, g_t, x_r, g_r]
    if layout is not None and len(layout) == 3:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    skip_where_refused(device, backend, options.get("estimator", "v"))
    options = dict(schedule=schedule, param=param, **options)
    probe = torch.randn(groups if options.get("reduction") == "none" else (), dtype=torch.float64, device=device)

    def fused(x_t, g_t, x_r, g_r):
        return imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, group_size, backend=backend, **options)

    def composition(name):
        return lambda x_t, g_t, x_r, g_r: composed(x_t, g_t, x_r, g_r, s, r, t, group_size, name, **options)

    inputs = [x.to(dtype) for x in inputs]  # the reference of the values given
    got = loss_and_gradients(fused, inputs, wanted, probe)
    want = loss_and_gradients(composition("reference"), [x.double() for x in inputs], wanted, probe)
    ops = loss_and_gradients(composition(backend), inputs, wanted, probe)
    bound = tolerance or rtol(dtype, device, backend)
    for name, g, w, o in zip(["loss"] + [f"grad {i}" for i in wanted], got, want, ops):
        assert g.dtype == dtype and g.shape == w.shape
        if near:  # forming y = c_skip x + c_out g in dtype costs ulp(y) / |y_t - y_r|, in the composition too
            bound = max(tolerance, 2 * rel_error(o, w))
        assert rel_error(g, w) <= bound, f"{name} against the reference: {rel_error(g, w):.3g} > {bound:.1g}"
        # The composition rounds y_t, y_r to dtype once more: within two bounds of each other.
        assert rel_error(g, o) <= 2 * bound, f"{name} against the composition: {rel_error(g, o):.3g}"
    return got, inputs


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["v", "u", "unpaired"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference_and_composition(device, backend, kernel, estimator, reduction, dtype):
    if estimator == "unpaired" and dtype not in (torch.float64, torch.float32):
        pytest.skip("unpaired differs from u in its pair weights only: the narrow dtypes are u's and v's")
    groups = 3
    # float16: weights that keep the gradients above its subnormals (6e-5), where it has no digits to compare
    scale = 1000 if dtype == torch.float16 else 1
    compare(device, backend, dtype, groups=groups, kernel=kernel, estimator=estimator, reduction=reduction,
            bandwidth=torch.rand(groups, dtype=torch.float64, device=device) + 0.5,
            weight=scale * (torch.rand(groups, dtype=torch.float64, device=device) + 0.1))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("schedule,param", SCHEDULES)
def test_every_parametrization(device, backend, schedule, param):
    compare(device, backend, torch.float64, schedule=schedule, param=param, bandwidth=2.0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("group_size,features", [(1, 5), (3, 1), (16, 33), (4, 3072)])
def test_group_sizes_and_widths(device, backend, group_size, features):
    compare(device, backend, torch.float32, group_size=group_size, features=features, wanted=(1, 3))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["v", "u"])  # unpaired's second-order loss: test_mmd.py
def test_near_duplicates_float32(device, backend, kernel, estimator):
    """x_r ~ x_t, g_r ~ g_t, r ~ t: the loss within the pair sums' 1e-4 (test_mmd.py); the gradients, where
    rounding the formed outputs to float32 alone costs about 5e-4, no worse than the composition's."""
    compare(device, backend, torch.float32, near=True, tolerance=1e-4, kernel=kernel, estimator=estimator,
            bandwidth=torch.rand(3, dtype=torch.float64, device=device) + 0.5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_autocast(device, backend):
    x_t, g_t, x_r, g_r = (torch.randn(8, 6, device=device) for _ in range(4))
    s, r, t = group_times(2, device)
    with torch.autocast(device, dtype=torch.bfloat16):  # the network's bf16 output meets float32 x_t
        loss = imm_kernels.imm_mmd_loss(x_t, g_t.bfloat16(), x_r, g_r.bfloat16(), s, r, t, 4, backend=backend)
    want = composed(x_t.double(), g_t.bfloat16().double(), x_r.double(), g_r.bfloat16().double(), s, r, t, 4,
                    "reference")
    assert loss.dtype == torch.float32 and rel_error(loss, want) < 1e-5


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_layouts(device, backend):
    """Images in channels-last keep their layout in the gradient; row-strided views are read in place."""
    (_, grad), inputs = compare(device, backend, torch.float32, layout=(3, 4, 5))
    assert grad.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(12, 20, dtype=torch.float64, device=device)
    views = [x[:, :7], x[:, 7:14], x[:, 1:8], x[:, 13:]]
    s, r, t = group_times(3, device)
    got = imm_kernels.imm_mmd_loss(*views, s, r, t, 4, backend=backend)
    assert rel_error(got, composed(*views, s, r, t, 4, "reference")) < 1e-12


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_outputs_packed_for_the_kernel(device, backend):
    """Network outputs whose features are not one strided run (an image with its last two dims swapped) are packed
    into copies that the kernels read: the copies must live until the kernels return, forward and backward. At
    1.5 MB a copy is unmapped when freed (glibc), so a pointer that outlives it crashes rather than reading stale
    values."""
    x_t, g_t, x_r, g_r = (torch.randn(8, 3, 128, 128, device=device) for _ in range(4))
    g_t, g_r = (g.transpose(2, 3).requires_grad_() for g in (g_t, g_r))
    s, r, t = group_times(2, device)
    loss = imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, 4, backend=backend)
    grads = torch.autograd.grad(loss, (g_t, g_r))
    want = composed(x_t.double(), g_t.double(), x_r.double(), g_r.double(), s, r, t, 4, "reference")
    want_grads = torch.autograd.grad(want, (g_t, g_r))
    assert rel_error(loss, want) <= rtol(torch.float32, device, backend)
    for got, expected in zip(grads, want_grads):
        assert rel_error(got, expected) <= rtol(torch.float32, device, backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_split_features(device, backend):
    """Few groups of many features: the backends split each group's features over threads (cpu) or programs
    (triton), forward and backward."""
    with threads(2):
        compare(device, backend, torch.float32, group_size=4, groups=1, features=20000, wanted=(1, 3))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_other_inputs_compose(device, backend):
    """x_t, x_r, the times, bandwidth and weight get their gradients from the composition: all of them, and g's."""
    groups = 2
    x_t, g_t, x_r, g_r = (torch.randn(8, 5, dtype=torch.float64, device=device) for _ in range(4))
    s, r, t = group_times(groups, device)
    bw, w = torch.rand(groups, dtype=torch.float64) + 0.5, torch.rand(groups, dtype=torch.float64)
    inputs = [x_t, g_t, x_r, g_r, s, r, t, bw, w]

    def head(backend):
        def fn(x_t, g_t, x_r, g_r, s, r, t, bw, w):
            return imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, 4, bandwidth=bw, weight=w, backend=backend)
        return fn

    wanted = tuple(range(len(inputs)))
    got = loss_and_gradients(head(backend), inputs, wanted, torch.tensor(1.0, dtype=torch.float64))
    want = loss_and_gradients(head("reference"), inputs, wanted, torch.tensor(1.0, dtype=torch.float64))
    for index, (g, w) in enumerate(zip(got, want)):
        assert g is not None and rel_error(g, w) < 1e-10, index
    assert torch.autograd.gradcheck(head(backend), [x.detach().requires_grad_(i in (0, 1, 6)) for i, x in
                                                    enumerate(inputs)])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("other", ["x_t", "x_r", "s", "r", "t", "bandwidth", "weight"])
def test_one_other_input_requires_grad(device, backend, other):
    """g_t and one more input that requires grad: both get their gradient (never a silent None)."""
    names = ["x_t", "g_t", "x_r", "g_r", "s", "r", "t", "bandwidth", "weight"]
    values = [torch.randn(8, 5, dtype=torch.float64, device=device) for _ in range(4)]
    values += [*group_times(2, device), torch.rand(2, dtype=torch.float64, device=device) + 0.5,
               torch.rand(2, dtype=torch.float64, device=device)]
    wanted = (1, names.index(other))

    def head(backend):
        def fn(x_t, g_t, x_r, g_r, s, r, t, bandwidth, weight):
            return imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, 4, bandwidth=bandwidth, weight=weight,
                                            backend=backend)
        return fn

    one = torch.tensor(1.0, dtype=torch.float64)
    for g, w in zip(loss_and_gradients(head(backend), values, wanted, one),
                    loss_and_gradients(head("reference"), values, wanted, one)):
        assert rel_error(g, w) < 1e-10


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_second_order(device, backend):
    """create_graph=True: the fused backward's gradient is differentiable again (through the reference)."""
    x_t, g_t, x_r, g_r = (torch.randn(8, 5, dtype=torch.float64, device=device) for _ in range(4))
    s, r, t = group_times(2, device)

    def head(g_t, g_r):
        return imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, 4, kernel="rbf", backend=backend)

    g_t.requires_grad_(), g_r.requires_grad_()
    grads = torch.autograd.grad(head(g_t, g_r), (g_t, g_r), create_graph=True)
    want = torch.autograd.grad(composed(x_t, g_t, x_r, g_r, s, r, t, 4, "reference", kernel="rbf"), (g_t, g_r))
    assert all(g.requires_grad and rel_error(g, w) < 1e-12 for g, w in zip(grads, want))
    assert torch.autograd.gradgradcheck(head, (g_t, g_r))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_torch_func_composes(device, backend):
    """grad, jvp and vmap run the composition (imm_output, mmd_loss) with their rules."""
    x_t, g_t, x_r, g_r = (torch.randn(8, 5, dtype=torch.float64, device=device) for _ in range(4))
    s, r, t = group_times(2, device)
    grad = torch.func.grad(lambda g: imm_kernels.imm_mmd_loss(x_t, g, x_r, g_r, s, r, t, 4, backend=backend))(g_t)
    want = loss_and_gradients(lambda g: composed(x_t, g, x_r, g_r, s, r, t, 4, "reference"), [g_t], (0,),
                              torch.tensor(1.0, dtype=torch.float64))[1]
    assert rel_error(grad, want) < 1e-12
    tangent = torch.randn_like(g_t)
    _, derivative = torch.func.jvp(lambda g: imm_kernels.imm_mmd_loss(x_t, g, x_r, g_r, s, r, t, 4, backend=backend),
                                   (g_t,), (tangent,))
    assert rel_error(derivative, (want * tangent).sum()) < 1e-12
    batch = torch.stack([g_t, g_r, x_t])  # vmap over three problems' g_t
    losses = torch.vmap(lambda g: imm_kernels.imm_mmd_loss(x_t, g, x_r, g_r, s, r, t, 4, backend=backend))(batch)
    want = torch.stack([composed(x_t, g, x_r, g_r, s, r, t, 4, "reference") for g in batch])
    assert rel_error(losses, want) < 1e-12


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    x_t, g_t, x_r, g_r = (torch.randn(8, 6, device=device) for _ in range(4))
    s, r, t = group_times(2, device)
    bandwidth = imm.kernel_bandwidth(s, t)

    def head(g_t):
        return imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, 4, bandwidth=bandwidth, backend=backend)

    eager = loss_and_gradients(head, [g_t], (0,), torch.tensor(1.0, dtype=torch.float64))
    graph = torch._dynamo.explain(head)(g_t.requires_grad_()).graphs[0].graph
    assert "imm_kernels.loss_head_forward" in {str(node.target) for node in graph.nodes}  # fused, not composed
    compiled = loss_and_gradients(torch.compile(head, fullgraph=True, backend="aot_eager"), [g_t], (0,),
                                  torch.tensor(1.0, dtype=torch.float64))
    for e, c in zip(eager, compiled):
        assert rel_error(c, e) < 1e-6


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    """The custom ops' schemas, fakes and autograd registration; the registered autograd refuses a gradient
    for anything but g_t and g_r, rather than leaving it None."""
    x_t, g_t, x_r, g_r = (torch.randn(8, 5, device=device) for _ in range(4))
    s, r, t = group_times(2, device)
    coefficients = torch.stack([*imm.output_coefficients(s, t), *imm.output_coefficients(s, r)], 1)
    forward = torch.ops.imm_kernels.loss_head_forward.default
    for bandwidth, reduction, grads in ((torch.full((2,), 1.5, device=device), "mean", (True, False)),
                                        (None, "none", (True, True)), (None, "sum", (False, False))):
        arguments = (x_t, g_t, x_r, g_r, coefficients, bandwidth, 1.5, None, 1.0, 4, "laplace", "v", 1e-8,
                     reduction, *grads, backend)
        torch.library.opcheck(forward, arguments)
        out, saved = forward(*arguments)
        if any(grads):
            torch.library.opcheck(torch.ops.imm_kernels.loss_head_backward.default,
                                  (torch.rand_like(out), x_t, g_t, x_r, g_r, coefficients, saved, 4, *grads, backend))
    with pytest.raises(RuntimeError, match="x_t requires grad"):
        forward(x_t.requires_grad_(), g_t, x_r, g_r, coefficients, None, 1.0, None, 1.0, 4, "laplace", "v", 1e-8,
                "mean", False, False, backend)


def test_cuda_and_reference_backends_compose(monkeypatch):
    """Where no fused kernel runs (reference here; cuda likewise), imm_mmd_loss is the composition itself."""
    calls = []
    monkeypatch.setattr(imm_kernels.loss_head, "mmd_loss", lambda *a, **k: calls.append(k["backend"]) or 0.0)
    x = torch.randn(8, 3)
    s, r, t = group_times(2)
    imm_kernels.imm_mmd_loss(x, x, x, x, s, r, t, 4, backend="reference")
    assert calls == ["reference"]


def test_bad_input():
    x = torch.randn(8, 3)
    s, r, t = group_times(2)
    cases = [
        (dict(g_t=torch.randn(8, 4)), ValueError, "g_t must have x_t's shape"),
        (dict(x_r=torch.randn(8, 4)), ValueError, "y_r|x_r"),
        (dict(g_r="g"), TypeError, "g_r"),
        (dict(g_t=torch.randn(8, 3, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(group_size=3), ValueError, "group_size|multiple"),
        (dict(t=torch.tensor([0.5, 1.5], dtype=torch.float64)), ValueError, "t must lie in"),
        (dict(s=t + 0.01), ValueError, "s must be <= r"),
        (dict(r=t + 0.01), ValueError, "r must be <= t"),
        (dict(s=torch.rand(3)), ValueError, r"s must be a float or a tensor of shape \(2,\)"),
        (dict(schedule="linear"), ValueError, "schedule"),
    ]
    for change, error, match in cases:
        arguments = dict(x_t=x, g_t=x, x_r=x, g_r=x, s=s, r=torch.minimum(r, t), t=t, group_size=4)
        arguments.update(change)
        with pytest.raises(error, match=match):
            imm_kernels.imm_mmd_loss(**arguments)

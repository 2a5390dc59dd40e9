"""mmd_loss on every native backend against the float64 reference: values, gradients, edge cases, bad input."""

import pytest
import torch
from conftest import BACKEND_CASES, DEVICES, rel_error, rtol, skip_where_refused

import imm_kernels
from imm_kernels import reference

KERNELS = ["laplace", "rbf", "energy"]
ESTIMATORS = ["v", "u", "unpaired"]


def fused_and_reference(y_t, y_r, group_size, backend, **options):
    """Loss and gradients (of a random linear functional of the output) from `backend` and from the float64
    reference on the same values."""
    skip_where_refused(y_t.device, backend, options.get("estimator", "v"))
    y_t, y_r = y_t.detach().requires_grad_(), y_r.detach().requires_grad_()
    loss = imm_kernels.mmd_loss(y_t, y_r, group_size, backend=backend, **options)
    probe = torch.randn(loss.shape, dtype=torch.float64)
    (loss.double().cpu() * probe).sum().backward()
    y64 = [y.detach().double().requires_grad_() for y in (y_t, y_r)]
    options64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    expected = reference.mmd_loss(*y64, group_size, **options64)
    (expected.cpu() * probe).sum().backward()
    return (loss, y_t.grad, y_r.grad), (expected, y64[0].grad, y64[1].grad)


def assert_close(got, want, rtol, what="", floor=0.0):
    """floor: the least norm errors are relative to (a gradient that cancels to rounding noise has no scale)."""
    for name, g, w in zip(("loss", "grad_t", "grad_r")[-len(got):], got, want):
        err = rel_error(g, w, floor)
        assert err <= rtol, f"{what} {name}: relative error {err:.3g} > {rtol:.1g}"


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("features", [1, 7, 3072])
@pytest.mark.parametrize("per_group", [False, True], ids=["scalar", "per_group"])
def test_matches_reference(device, backend, kernel, estimator, group_size, features, per_group):
    if estimator != "v" and group_size == 1:
        pytest.skip("the u-statistics need group_size >= 2")
    if estimator == "unpaired" and features == 3072:
        pytest.skip("unpaired differs from u in its pair weights only, which v and u cover at every width")
    groups = 3
    y_t = torch.randn(groups * group_size, features, device=device, dtype=torch.float64)
    y_r = torch.randn_like(y_t)
    if per_group:
        options = dict(bandwidth=torch.rand(groups, dtype=torch.float64, device=device) * 4 + 0.1,
                       weight=torch.randn(groups, dtype=torch.float64, device=device))
    else:
        options = dict(bandwidth=2.5, weight=None)
    got, want = fused_and_reference(y_t, y_r, group_size, backend, kernel=kernel, estimator=estimator, **options)
    # In 1-D the energy kernel's gradients are sums of signs: with M = 2, u-statistics can cancel them exactly.
    assert_close(got, want, rtol(torch.float64, device, backend), floor=1e-3)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_low_precision_inputs(device, backend, dtype, kernel):
    y_t = torch.randn(4 * 4, 3, 5, device=device).to(dtype)
    y_r = torch.randn_like(y_t)
    got, want = fused_and_reference(y_t, y_r, 4, backend, kernel=kernel, bandwidth=3.0)
    assert all(g.dtype == dtype for g in got)
    assert_close(got, want, rtol(dtype, device, backend), str(dtype))
    if dtype != torch.float32:  # no worse than the same-precision reference (which also computes in dtype)
        same = reference.mmd_loss(y_t, y_r, 4, kernel=kernel, bandwidth=3.0)
        one_rounding = rtol(dtype, device, backend) / 2
        assert rel_error(got[0], want[0]) <= max(rel_error(same, want[0]), one_rounding)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("group_size,features", [(2, 1), (4, 7), (4, 3072), (16, 257)])
def test_near_duplicates_float32(device, backend, kernel, estimator, group_size, features):
    """Late in training y_r ~ y_t: the loss is a tiny difference of O(1) kernel values, and a float32
    reference that sums them loses most digits. The fused kernels keep 1e-4 relative."""
    y_t = torch.randn(5 * group_size, features, device=device)
    y_r = y_t + 1e-4 * torch.randn_like(y_t)
    got, want = fused_and_reference(y_t, y_r, group_size, backend, kernel=kernel, estimator=estimator,
                                    bandwidth=torch.rand(5, device=device) + 0.5)
    if estimator == "unpaired":  # no partner pair: the two sides' first-order terms cancel, the loss is second order
        got, want, loss_error = got[1:], want[1:], rel_error(got[0], want[0])  # in the float32 distance sums' error
        assert loss_error <= 1e-2, f"near-duplicate loss: relative error {loss_error:.3g} > 1e-2"
    assert_close(got, want, 1e-4, "near-duplicate")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(device, backend, reduction):
    y_t = torch.randn(6 * 4, 11, device=device, dtype=torch.float64)
    got, want = fused_and_reference(y_t, torch.randn_like(y_t), 4, backend, reduction=reduction,
                                    weight=torch.rand(6, dtype=torch.float64, device=device))
    assert got[0].shape == want[0].shape == ((6,) if reduction == "none" else ())
    assert_close(got, want, rtol(torch.float64, device, backend), reduction)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_image_shaped_and_noncontiguous(device, backend):
    base = torch.randn(8, 3, 6, 10, device=device, dtype=torch.float64)
    y_t = base[..., ::2]  # (8, 3, 6, 5), non-contiguous
    y_r = torch.randn(8, 5, 6, 3, device=device, dtype=torch.float64).permute(0, 3, 2, 1)
    assert not y_t.is_contiguous() and not y_r.is_contiguous()
    got, want = fused_and_reference(y_t, y_r, 4, backend, kernel="laplace", bandwidth=1.5)
    assert got[1].shape == y_t.shape
    assert_close(got, want, rtol(torch.float64, device, backend))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_gradient_only_where_required(device, backend):
    y_t = torch.randn(8, 5, device=device, dtype=torch.float64, requires_grad=True)
    y_r = torch.randn(8, 5, device=device, dtype=torch.float64)
    imm_kernels.mmd_loss(y_t, y_r, 4, backend=backend).backward()
    expected = torch.autograd.grad(reference.mmd_loss(y_t, y_r, 4), y_t)[0]
    assert y_r.grad is None
    assert rel_error(y_t.grad, expected) <= rtol(torch.float64, device, backend)
    with torch.no_grad():
        value = imm_kernels.mmd_loss(y_t, y_r, 4, backend=backend)
    assert rel_error(value, reference.mmd_loss(y_t, y_r, 4)) <= rtol(torch.float64, device, backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_identical_rows_give_finite_zero_gradient_terms(device, backend, kernel):
    """d = 0 between identical particles: the gradient exists (0 from that pair), never NaN."""
    y_t = torch.randn(8, 6, device=device, dtype=torch.float64)
    y_t[1] = y_t[0]
    y_r = y_t.clone()
    got, want = fused_and_reference(y_t, y_r, 4, backend, kernel=kernel)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert torch.allclose(g.double().cpu(), w.cpu(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(device, backend, kernel):
    y_t = torch.randn(6, 3, device=device, dtype=torch.float64, requires_grad=True)
    y_r = torch.randn(6, 3, device=device, dtype=torch.float64, requires_grad=True)
    bandwidth = torch.rand(2, dtype=torch.float64, device=device) + 0.5
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: imm_kernels.mmd_loss(a, b, 3, kernel=kernel, bandwidth=bandwidth, reduction=reduction,
                                              backend=backend), (y_t, y_r))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_nan_in_nan_out(device, backend):
    y_t = torch.randn(8, 5, device=device)
    y_r = torch.randn_like(y_t)
    y_t[3, 2] = float("nan")
    out = imm_kernels.mmd_loss(y_t, y_r, 4, reduction="none", backend=backend)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    y_t[3, 2] = float("inf")
    out = imm_kernels.mmd_loss(y_t, y_r, 4, reduction="none", backend=backend)
    assert not torch.isfinite(out[0]) and torch.isfinite(out[1])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_module_form(device, backend):
    y_t = torch.randn(8, 5, device=device, dtype=torch.float64)
    y_r = torch.randn_like(y_t)
    module = imm_kernels.MMDLoss(4, kernel="rbf", bandwidth=2.0, backend=backend)
    assert "kernel='rbf'" in repr(module)
    expected = reference.mmd_loss(y_t, y_r, 4, kernel="rbf", bandwidth=2.0)
    assert rel_error(module(y_t, y_r), expected) <= rtol(torch.float64, device, backend)
    bw = torch.tensor([1.0, 3.0], dtype=torch.float64, device=device)
    expected = reference.mmd_loss(y_t, y_r, 4, kernel="rbf", bandwidth=bw)
    assert rel_error(module(y_t, y_r, bandwidth=bw), expected) <= rtol(torch.float64, device, backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    """The custom ops' schemas, fakes and autograd registration, as torch.compile relies on them."""
    y_t = torch.randn(8, 5, device=device)
    y_r = torch.randn_like(y_t)
    bandwidths = [(torch.full((2,), 1.5, device=device), 0.0), (None, 1.5)]
    weights = [(torch.rand(2, device=device), 0.0), (None, 1.0)]
    forward = torch.ops.imm_kernels.mmd_forward.default
    for (bw, bw_value), (w, w_value), reduction, grads in zip(bandwidths * 2, weights[::-1] * 2, ("mean", "none") * 2,
                                                              ((True, False), (True, True), (False, False),
                                                               (False, True))):
        arguments = (y_t, y_r, bw, bw_value, w, w_value, 4, "laplace", "v", 1e-8, reduction, *grads, backend)
        torch.library.opcheck(forward, arguments)
        out, saved = forward(*arguments)
        if any(grads):
            torch.library.opcheck(torch.ops.imm_kernels.mmd_backward.default,
                                  (torch.rand_like(out), y_t, y_r, saved, 4, *grads, backend))


def test_auto_picks_a_native_backend_on_cpu():
    from imm_kernels import _dispatch

    assert _dispatch.resolve("mmd", "auto", torch.device("cpu")) == "cpu"


BAD_CALLS = [
    (dict(y_t=torch.randn(7, 3), y_r=torch.randn(7, 3)), ValueError, "multiple of group_size"),
    (dict(y_r=torch.randn(8, 4)), ValueError, "same shape"),
    (dict(y_r=torch.randn(8, 3, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(y_t=torch.randint(0, 3, (8, 3)), y_r=torch.randint(0, 3, (8, 3))), TypeError, "y_t must be float32"),
    (dict(y_t=torch.ones(8, 3, dtype=torch.bool), y_r=torch.ones(8, 3, dtype=torch.bool)), TypeError, "y_t must be"),
    (dict(y_t=[[1.0]]), TypeError, "y_t must be a torch.Tensor"),
    (dict(group_size=0), ValueError, "group_size must be >= 1"),
    (dict(group_size=1, estimator="u"), ValueError, "group_size must be >= 2"),
    (dict(group_size=1, estimator="unpaired"), ValueError, "group_size must be >= 2"),
    (dict(group_size=2.0), TypeError, "group_size must be an int"),
    (dict(bandwidth=0.0), ValueError, "bandwidth must be > 0"),
    (dict(bandwidth=-1.0), ValueError, "bandwidth must be > 0"),
    (dict(bandwidth=float("nan")), ValueError, "bandwidth must be finite"),
    (dict(bandwidth=torch.ones(3)), ValueError, r"bandwidth must be a float or a tensor of shape \(2,\)"),
    (dict(bandwidth=torch.tensor([1.0, -1.0])), ValueError, "bandwidth must be > 0 for every group"),
    (dict(weight=torch.ones(2, 1)), ValueError, "weight must be a float or a tensor of shape"),
    (dict(weight="heavy"), TypeError, "weight must be a float"),
    (dict(kernel="gauss"), ValueError, "kernel must be one of"),
    (dict(estimator="w"), ValueError, "estimator must be one of"),
    (dict(reduction="max"), ValueError, "reduction must be one of"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(y_t=torch.randn(0, 3), y_r=torch.randn(0, 3)), ValueError, "non-empty"),
    (dict(y_t=torch.randn(8, 0), y_r=torch.randn(8, 0)), ValueError, "non-empty"),
    (dict(y_t=torch.tensor(1.0), y_r=torch.tensor(1.0)), ValueError, "non-empty batch"),
]


@pytest.mark.parametrize("change,error,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input(change, error, match):
    call = {"y_t": torch.randn(8, 3), "y_r": torch.randn(8, 3), "group_size": 4, **change}
    functions = [imm_kernels.mmd_loss] + ([] if "backend" in change else [reference.mmd_loss])
    for fn in functions:  # the reference checks the same way
        args = dict(call)
        with pytest.raises(error, match=match):
            fn(args.pop("y_t"), args.pop("y_r"), args.pop("group_size"), **args)


@pytest.mark.skipif("cuda" in DEVICES, reason="the message is for machines without a GPU")
def test_unavailable_backend_says_how_to_get_it():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*CUDA tensors"):
        imm_kernels.mmd_loss(torch.randn(8, 3), torch.randn(8, 3), 4, backend="cuda")


def test_verified_cuda_kernels_refuse_the_unpaired_estimator_before_any_launch():
    """The GPU-verified kernels predate "unpaired" (their native binding would reject its code): a ValueError
    that says where it runs, raised before anything touches a device (here with CPU tensors)."""
    from imm_kernels import mmd

    y = torch.randn(8, 3)
    with pytest.raises(ValueError, match="estimator='unpaired' is not in the GPU-verified CUDA kernels.*triton"):
        mmd._verified_cuda_forward(y, y, None, 1.0, None, 1.0, 4, "laplace", "unpaired", 1e-8, "mean", True, True,
                                   "cuda")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_laplace_gradients_at_the_eps_floor(device, backend, dtype, estimator):
    """eps > 0 with distances on both sides of it: a pair closer than eps has a constant kernel and gives no
    gradient, a farther one the usual gradient (near-duplicate and textbook forms both occur)."""
    y_t = torch.randn(8, 3, device=device, dtype=torch.float64)
    y_t[1] = y_t[0] + 0.1  # a self pair at distance 0.17
    y_r = y_t + 0.05 * torch.randn_like(y_t)  # partners at about 0.09
    y_r[5] += 1.0  # and one far above the floor
    got, want = fused_and_reference(y_t.to(dtype), y_r.to(dtype), 4, backend, kernel="laplace", estimator=estimator,
                                    eps=0.5, bandwidth=torch.tensor([2.0, 6.0], device=device))
    assert_close(got, want, rtol(dtype, device, backend), "eps floor")

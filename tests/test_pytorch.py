"""Every way PyTorch calls an op (docs/pytorch.md has the table these tests back): gradients of every floating input
against the float64 reference and gradcheck, no silent None gradient, torch.func (grad, vjp, jvp, vmap) and
forward-mode AD, the autocast policy, channels-last layouts, and the custom ops' own autograd registrations
(opcheck with inputs that require grad). Each public op runs on every backend here, the reference included."""

import weakref

import pytest
import torch
from conftest import BACKEND_CASES, rel_error, rtol, skip_where_refused

import imm_kernels
from imm_kernels import reference

CASES = BACKEND_CASES + [pytest.param("cpu", "reference", id="cpu-reference")]
GROUP = 4  # mmd_loss: rows per group


def inputs(op: str, device: str, dtype=torch.float64, batch: int = 8, features=(5,)):
    """The op's floating inputs, all tensors (random, never zeros): (B, *features) data and per-group or
    per-sample operands, with times 0.1 <= s < t <= 0.9."""
    generator = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    def uniform(low, high, count):
        return (low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)).to(device)

    data = randn(batch, *features), randn(batch, *features)
    if op == "mmd_loss":
        return (*data, uniform(0.5, 2.0, batch // GROUP), uniform(0.5, 1.5, batch // GROUP))
    t = uniform(0.1, 0.9, batch)
    if op == "interpolate":
        return (*data, t)
    return (*data, t * uniform(0.1, 0.9, batch), t)  # (.., s or r, t)


def run(op: str, backend: str, *tensors, **options):
    """The public op with every floating input positional (mmd_loss: y_t, y_r, bandwidth, weight; the others their
    data, then their times; interpolate_pair as (x, noise, r, t))."""
    if op == "mmd_loss":
        y_t, y_r, bandwidth, weight = tensors
        skip_where_refused(y_t.device, backend, options.get("estimator", "v"))
        return imm_kernels.mmd_loss(y_t, y_r, GROUP, bandwidth=bandwidth, weight=weight, backend=backend, **options)
    if op == "interpolate_pair":
        x, noise, r, t = tensors
        return imm_kernels.interpolate_pair(x, noise, t, r, backend=backend, **options)
    return getattr(imm_kernels, op)(*tensors, backend=backend, **options)


OPS = ["mmd_loss", "interpolate", "interpolate_pair", "imm_output", "ddim"]
MMD_OPTIONS = [dict(kernel=k, estimator=e, reduction=r) for k in ("laplace", "rbf", "energy") for e in ("v", "u", "unpaired")
               for r in ("mean", "sum", "none")]
OP_VARIANTS = ([pytest.param("mmd_loss", o, id="mmd_loss-" + "-".join(o.values())) for o in MMD_OPTIONS]
               + [pytest.param(op, dict(schedule=s), id=f"{op}-{s}") for op in OPS[1:] for s in ("fm", "cosine")]
               + [pytest.param("imm_output", dict(param=p), id=f"imm_output-{p}") for p in ("euler_fm", "identity")])


def outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def scalar(result, cotangents) -> torch.Tensor:
    return sum((o * c).sum() for o, c in zip(outputs(result), cotangents))


def cotangents_for(result) -> list:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device, o.dtype)
            for o in outputs(result)]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op,options", OP_VARIANTS)
def test_gradient_of_every_input_matches_the_reference(device, backend, op, options):
    """float64, every floating input requiring grad at once: data, bandwidth, weight, times."""
    leaves = [x.requires_grad_() for x in inputs(op, device)]
    result = run(op, backend, *leaves, **options)
    cotangents = cotangents_for(result)
    grads = torch.autograd.grad(scalar(result, cotangents), leaves)
    expected = torch.autograd.grad(scalar(run(op, "reference", *leaves, **options), cotangents), leaves,
                                   allow_unused=True, materialize_grads=True)
    for name, got, want in zip("abcd", grads, expected):
        assert rel_error(got, want) <= rtol(torch.float64, device, backend) * 10, f"input {name}"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
def test_no_input_gets_a_silent_none_gradient(device, backend, op):
    """Each floating input alone requiring grad (float32 data, as in training) gets a gradient: the call records
    autograd for any of them, not only for the data."""
    for index in range(len(inputs(op, device))):
        tensors = list(inputs(op, device, dtype=torch.float32))
        tensors[index].requires_grad_()
        result = run(op, backend, *tensors)
        scalar(result, [torch.ones_like(o) for o in outputs(result)]).backward()
        assert tensors[index].grad is not None and torch.isfinite(tensors[index].grad).all(), f"input {index}"


GRADCHECK_VARIANTS = [pytest.param("mmd_loss", dict(kernel="laplace"), id="mmd_loss-laplace"),
                      pytest.param("mmd_loss", dict(kernel="rbf", estimator="u", reduction="none"),
                                   id="mmd_loss-rbf-u-none"),
                      *[pytest.param(op, dict(schedule="cosine"), id=op) for op in OPS[1:]]]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op,options", GRADCHECK_VARIANTS)
def test_gradcheck_every_input(device, backend, op, options):
    """Finite differences in float64 against the analytic first and second derivatives of every input."""
    leaves = tuple(x.requires_grad_() for x in inputs(op, device, batch=4 if op != "mmd_loss" else 8, features=(3,)))
    assert torch.autograd.gradcheck(lambda *x: run(op, backend, *x, **options), leaves)
    assert torch.autograd.gradgradcheck(lambda *x: run(op, backend, *x, **options), leaves)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
def test_func_grad_and_vjp_match_autograd(device, backend, op):
    tensors = inputs(op, device)
    cotangents = cotangents_for(run(op, backend, *tensors))
    every = tuple(range(len(tensors)))
    grads = torch.func.grad(lambda *x: scalar(run(op, backend, *x), cotangents), argnums=every)(*tensors)
    _, pullback = torch.func.vjp(lambda *x: run(op, backend, *x), *tensors)
    vjps = pullback(tuple(cotangents) if len(cotangents) > 1 else cotangents[0])
    leaves = [x.clone().requires_grad_() for x in tensors]
    expected = torch.autograd.grad(scalar(run(op, "reference", *leaves), cotangents), leaves, allow_unused=True,
                                   materialize_grads=True)
    for got_grad, got_vjp, want in zip(grads, vjps, expected):
        assert rel_error(got_grad, want) <= rtol(torch.float64, device, backend) * 10
        assert rel_error(got_vjp, want) <= rtol(torch.float64, device, backend) * 10


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
def test_jvp_and_forward_ad_match_the_reference(device, backend, op):
    """Forward mode with a tangent for every input at once, through torch.func.jvp and through
    torch.autograd.forward_ad's dual tensors."""
    tensors = inputs(op, device)
    generator = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device) for x in tensors)
    _, got = torch.func.jvp(lambda *x: run(op, backend, *x), tensors, tangents)
    _, want = torch.func.jvp(lambda *x: run(op, "reference", *x), tensors, tangents)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(x, t) for x, t in zip(tensors, tangents)]
        dual_tangents = [torch.autograd.forward_ad.unpack_dual(o).tangent for o in outputs(run(op, backend, *duals))]
    for a, b, w in zip(outputs(got), dual_tangents, outputs(want)):
        assert rel_error(a, w) <= rtol(torch.float64, device, backend) * 10
        assert rel_error(b, w) <= rtol(torch.float64, device, backend) * 10


VMAP_DIMS = {  # in_dims of the op's inputs: all batched, some shared across the batch, a batch dim that is not first
    "all": lambda count: (0,) * count,
    "shared": lambda count: (0, None) + (None, 0)[:count - 2],
    "inner": lambda count: (1, 0) + (None,) * (count - 2),
}


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dims", VMAP_DIMS)
def test_vmap_over_problems_matches_a_loop(device, backend, op, dims):
    """torch.vmap over 3 problems (a batched rule: one launch for all of them) and vmap of grad."""
    problems = [inputs(op, device) for _ in range(3)]
    problems = [tuple(x + i * 0.01 for x in p) for i, p in enumerate(problems)]  # not three equal problems
    in_dims = VMAP_DIMS[dims](len(problems[0]))
    stacked = [torch.stack([p[k] for p in problems], dim=d or 0) if d is not None else problems[0][k]
               for k, d in enumerate(in_dims)]
    per_problem = [[problems[i][k] if d is not None else problems[0][k] for k, d in enumerate(in_dims)]
                   for i in range(3)]
    got = outputs(torch.vmap(lambda *x: run(op, backend, *x), in_dims=in_dims)(*stacked))
    looped = [outputs(run(op, "reference", *p)) for p in per_problem]
    for index, out in enumerate(got):
        assert rel_error(out, torch.stack([o[index] for o in looped])) <= rtol(torch.float64, device, backend) * 10

    def first_output_sum(*x):
        return outputs(run(op, backend, *x))[0].sum()

    grads = torch.vmap(torch.func.grad(first_output_sum), in_dims=in_dims)(*stacked)
    for i, p in enumerate(per_problem):
        leaf = p[0].clone().requires_grad_()
        (want,) = torch.autograd.grad(outputs(run(op, "reference", leaf, *p[1:]))[0].sum(), leaf)
        assert rel_error(grads[i], want) <= rtol(torch.float64, device, backend) * 10


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_run_in_the_wider_one_under_autocast(device, backend, op):
    """The policy: under torch.autocast two data inputs of different dtypes run in the wider one (the result is
    then that of the wider dtype's call); outside autocast they are refused."""
    data_a, data_b, *rest = (x.float() for x in inputs(op, device))
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = run(op, backend, data_a.bfloat16(), data_b, *rest)
        mixed_other_way = run(op, backend, data_a, data_b.bfloat16(), *rest)
    wide = run(op, backend, data_a.bfloat16().float(), data_b, *rest)
    wide_other_way = run(op, backend, data_a, data_b.bfloat16().float(), *rest)
    for got, want in ((mixed, wide), (mixed_other_way, wide_other_way)):
        for a, b in zip(outputs(got), outputs(want)):
            assert a.dtype == torch.float32 and torch.equal(a, b)
    with pytest.raises(TypeError, match="same dtype.*autocast"):
        run(op, backend, data_a.bfloat16(), data_b, *rest)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
def test_channels_last_in_channels_last_out(device, backend, op):
    """4-D images in channels-last memory: outputs (and, from the kernels, input gradients) keep that format, values
    as the reference's."""
    tensors = inputs(op, device, features=(3, 2, 5))
    images = [x.contiguous(memory_format=torch.channels_last).requires_grad_() for x in tensors[:2]]
    result = run(op, backend, *images, *tensors[2:])
    cotangents = cotangents_for(result)
    grads = torch.autograd.grad(scalar(result, cotangents), images)
    plain = [x.detach().contiguous().requires_grad_() for x in images]
    expected = run(op, "reference", *plain, *tensors[2:])
    want_grads = torch.autograd.grad(scalar(expected, cotangents), plain)
    for got, want in zip(outputs(result), outputs(expected)):
        assert rel_error(got, want) <= rtol(torch.float64, device, backend)
        if got.dim() == 4:
            assert got.is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(grads, want_grads):
        assert rel_error(got, want) <= rtol(torch.float64, device, backend)
        # The kernels make gradients in the inputs' memory order; the reference's follow ATen's rules instead.
        assert got.is_contiguous(memory_format=torch.channels_last) or backend == "reference"


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck_with_inputs_that_require_grad(device, backend):
    """opcheck's every check (schema, autograd registration, fake tensors, AOT dispatch with dynamic shapes) on the
    ops whose inputs require grad: their autograd is registered on the ops themselves."""
    y_t, y_r, bandwidth, weight = (x.float().requires_grad_() for x in inputs("mmd_loss", device))
    torch.library.opcheck(torch.ops.imm_kernels.mmd_forward.default,
                          (y_t, y_r, bandwidth, 0.0, weight, 0.0, GROUP, "laplace", "v", 1e-8, "mean", True, True,
                           backend))
    torch.library.opcheck(torch.ops.imm_kernels.mmd_forward.default,
                          (y_t, y_r.detach(), None, 2.0, weight, 0.0, GROUP, "rbf", "u", 1e-8, "none", True, False,
                           backend))
    x, g, s, t = (v.float().requires_grad_() for v in inputs("imm_output", device))
    combine = torch.ops.imm_kernels.combine.default
    torch.library.opcheck(combine, (x, g, s, 0.0, t, 0.0, "imm_output", 1, False, True, False, "fm", "simple_edm", 0.5,
                                    backend))
    torch.library.opcheck(combine, (x, g, s, 0.0, None, 0.7, "interpolate", 2, False, True, True, "cosine",
                                    "simple_edm", 0.5, backend))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_the_custom_ops_give_gradients_of_every_input(device, backend):
    """torch.ops.imm_kernels.* called directly: bandwidth, weight and times get their gradients too, and a gradient
    the forward's flags did not prepare for is a clear error, not a None."""
    y_t, y_r, bandwidth, weight = (x.requires_grad_() for x in inputs("mmd_loss", device))
    loss = torch.ops.imm_kernels.mmd_forward(y_t, y_r, bandwidth, 0.0, weight, 0.0, GROUP, "laplace", "v", 1e-8,
                                             "mean", True, True, backend)[0]
    grads = torch.autograd.grad(loss, (y_t, y_r, bandwidth, weight))
    expected = torch.autograd.grad(run("mmd_loss", "reference", y_t, y_r, bandwidth, weight),
                                   (y_t, y_r, bandwidth, weight))
    for got, want in zip(grads, expected):
        assert rel_error(got, want) <= rtol(torch.float64, device, backend) * 10
    loss = torch.ops.imm_kernels.mmd_forward(y_t, y_r, None, 1.0, None, 1.0, GROUP, "laplace", "v", 1e-8, "mean",
                                             False, True, backend)[0]
    with pytest.raises(RuntimeError, match="grad_t=True"):
        torch.autograd.grad(loss, y_t)
    x, g, s, t = (v.requires_grad_() for v in inputs("imm_output", device))
    out = torch.ops.imm_kernels.combine(x, g, s, 0.0, t, 0.0, "imm_output", 1, False, True, False, "fm",
                                        "simple_edm", 0.5, backend)[0]
    grads = torch.autograd.grad(out.sum(), (x, g, s, t))
    expected = torch.autograd.grad(run("imm_output", "reference", x, g, s, t).sum(), (x, g, s, t))
    for got, want in zip(grads, expected):
        assert rel_error(got, want) <= rtol(torch.float64, device, backend) * 10


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_gradients_of_weight_bandwidth_and_times(device, backend, dynamic):
    """torch.compile(fullgraph=True): the ops' registered autograd gives the eager gradients of every input."""
    torch._dynamo.reset()
    y_t, y_r, bandwidth, weight = inputs("mmd_loss", device, dtype=torch.float32)
    x, g, s, t = inputs("imm_output", device, dtype=torch.float32)

    def step(y_t, bandwidth, weight, x, s, t):
        return (imm_kernels.mmd_loss(y_t, y_r, GROUP, bandwidth=bandwidth, weight=weight, backend=backend)
                + imm_kernels.imm_output(x, g, s, t, backend=backend).square().mean())

    leaves = [v.clone().requires_grad_() for v in (y_t, bandwidth, weight, x, s, t)]
    eager = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for got, want in zip(torch.autograd.grad(compiled(*leaves), leaves), eager):
        assert rel_error(got, want) <= 1e-5


SECOND_ORDER = {
    "jacfwd(jacrev)": lambda f, every: torch.func.jacfwd(torch.func.jacrev(f, argnums=every), argnums=every),
    "jacrev(jacrev)": lambda f, every: torch.func.jacrev(torch.func.jacrev(f, argnums=every), argnums=every),
    "jacrev(jacfwd)": lambda f, every: torch.func.jacrev(torch.func.jacfwd(f, argnums=every), argnums=every),
}


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("order", SECOND_ORDER)
def test_second_derivatives_through_torch_func(device, backend, op, order):
    """Hessians of every input pair by nested torch.func transforms, forward over reverse (torch.func.hessian),
    reverse over reverse and reverse over forward: the derivatives they differentiate again switch to the
    reference formulation, never to a silently non-differentiable kernel result."""
    tensors = inputs(op, device, batch=4 if op != "mmd_loss" else 8, features=(3,))
    weights = cotangents_for(run(op, "reference", *tensors))
    every = tuple(range(len(tensors)))
    got = SECOND_ORDER[order](lambda *x: scalar(run(op, backend, *x), weights), every)(*tensors)
    want = torch.func.hessian(lambda *x: scalar(run(op, "reference", *x), weights), argnums=every)(*tensors)
    for got_row, want_row in zip(got, want):
        for a, b in zip(got_row, want_row):
            assert rel_error(a, b, floor=1e-3) <= rtol(torch.float64, device, backend) * 10


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_the_graph_keeps_pytorchs_contract_between_the_passes(device, backend):
    """What autograd promises of a saved graph holds for mmd_loss: retain_graph=True gives the same gradients twice,
    a second backward without it is refused, and so is a backward after an input was modified in place."""
    y_t, y_r = (torch.randn(8, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    loss = imm_kernels.mmd_loss(y_t, y_r, 4, backend=backend)
    first = torch.autograd.grad(loss, (y_t, y_r), retain_graph=True)
    second = torch.autograd.grad(loss, (y_t, y_r))
    expected = torch.autograd.grad(reference.mmd_loss(y_t, y_r, 4), (y_t, y_r))
    for a, b, w in zip(first, second, expected):
        assert torch.equal(a, b) and rel_error(a, w) <= rtol(torch.float64, device, backend)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, (y_t, y_r))
    for modified in range(2):
        inputs = [(y * 2).detach().requires_grad_() for y in (y_t, y_r)]
        loss = imm_kernels.mmd_loss(*inputs, 4, backend=backend)
        with torch.no_grad():
            inputs[modified].add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_saved_tensor_hooks_own_what_autograd_saves(device, backend):
    """Under torch.autograd.graph.saved_tensors_hooks (offloading, checkpointing) the hooks decide what stays
    alive: nothing else in mmd_loss may hold y_t and y_r between the passes, and the gradients stay right."""
    leaf_t, leaf_r = (torch.randn(8, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    y_t, y_r = leaf_t * 2, leaf_r * 3  # not leaves: freed once nothing holds them
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x.clone(), lambda x: x):
        loss = imm_kernels.mmd_loss(y_t, y_r, 4, backend=backend)
    alive = [weakref.ref(y_t), weakref.ref(y_r)]
    del y_t, y_r
    assert [ref() for ref in alive] == [None, None]
    got = torch.autograd.grad(loss, (leaf_t, leaf_r))
    expected = torch.autograd.grad(reference.mmd_loss(leaf_t * 2, leaf_r * 3, 4), (leaf_t, leaf_r))
    for g, w in zip(got, expected):
        assert rel_error(g, w) <= rtol(torch.float64, device, backend)

"""On a GPU: no op syncs the host, and a whole IMM training step (interpolate_pair, a small network, imm_output,
mmd_loss, backward, an optimizer step) is captured in a CUDA graph and replayed to the eager step's results,
also through torch.compile(mode="reduce-overhead"). Skipped on machines without CUDA (tests/gpu_check.sh runs
them where there is one)."""

import pytest
import torch
from conftest import BACKEND_CASES, rel_error

import imm_kernels
from imm_kernels import imm

CUDA_CASES = [case for case in BACKEND_CASES if case.values[0] == "cuda"]
pytestmark = pytest.mark.skipif(not CUDA_CASES, reason="needs a CUDA device and a GPU backend")

BATCH, GROUP, FEATURES = 64, 4, 48


def make_step(backend: str, seed: int = 0):
    """A fresh network, optimizer and static inputs, and the IMM step over them (returns the loss)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.SiLU(), torch.nn.Linear(64, FEATURES)).cuda()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(BATCH, FEATURES, device="cuda")
    noise = torch.randn_like(x) * 0.5
    s, r, t = (v.repeat_interleave(GROUP) for v in imm.sample_times(BATCH // GROUP, device="cuda"))
    bandwidth = imm.kernel_bandwidth(s[::GROUP], t[::GROUP])
    weight = imm.time_weight(t[::GROUP])

    def step():
        x_t, x_r = imm_kernels.interpolate_pair(x, noise, t, r, backend=backend)
        y_t = imm_kernels.imm_output(x_t, net(x_t), s, t, backend=backend)
        with torch.no_grad():
            y_r = imm_kernels.imm_output(x_r, net(x_r), s, r, backend=backend)
        loss = imm_kernels.mmd_loss(y_t, y_r, GROUP, bandwidth=bandwidth, weight=weight, backend=backend)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return net, step


def eager_reference(backend: str, steps: int):
    net, step = make_step(backend)
    losses = [step().clone() for _ in range(steps)]
    return losses, [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("device,backend", CUDA_CASES)
def test_ops_never_sync_the_host(device, backend):
    y_t = torch.randn(16, 40, device=device, requires_grad=True)
    y_r = torch.randn(16, 40, device=device)
    t = torch.rand(16, device=device)

    def run():
        loss = imm_kernels.mmd_loss(y_t, y_r, 4, bandwidth=t[::4] + 1, weight=t[::4], backend=backend)
        a, b = imm_kernels.interpolate_pair(y_t, y_r, t, t * 0.5, backend=backend)
        out = imm_kernels.imm_output(a, b, t * 0.25, t, backend=backend)
        torch.autograd.backward([loss, out.sum()])

    run()  # first calls compile and allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device,backend", CUDA_CASES)
def test_a_whole_step_captures_in_a_cuda_graph(device, backend):
    want_losses, want_params = eager_reference(backend, steps=4)
    net, step = make_step(backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first step eagerly (warm-up, as capture wants)
        first = step().clone()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    losses = [first]
    for _ in range(3):
        graph.replay()
        losses.append(loss.clone())
    torch.cuda.synchronize()
    for got, want in zip(losses, want_losses):
        assert rel_error(got, want) <= 1e-5
    for got, want in zip(net.parameters(), want_params):
        assert rel_error(got, want) <= 1e-5


@pytest.mark.parametrize("device,backend", CUDA_CASES)
def test_a_whole_step_compiles_with_reduce_overhead(device, backend):
    torch._dynamo.reset()
    want_losses, want_params = eager_reference(backend, steps=4)
    net, step = make_step(backend)
    compiled = torch.compile(step, mode="reduce-overhead")
    losses = [compiled().clone() for _ in range(4)]
    torch.cuda.synchronize()
    for got, want in zip(losses, want_losses):
        assert rel_error(got, want) <= 1e-5
    for got, want in zip(net.parameters(), want_params):
        assert rel_error(got, want) <= 1e-5

"""torch.compile(fullgraph=True) of a small IMM training step (forward traced whole, backward compiled by
AOTAutograd): no graph break, and the eager loss and gradients."""

import subprocess
import sys

import pytest
import torch
from conftest import BACKEND_CASES, rel_error

import imm_kernels
from imm_kernels import _dispatch, imm


def imm_step(net, x, noise, s, r, t, group_size, backend):
    x_t, x_r = imm_kernels.interpolate_pair(x, noise, t, r, backend=backend)
    y_t = imm_kernels.imm_output(x_t, net(x_t), s, t, backend=backend)
    with torch.no_grad():
        y_r = imm_kernels.imm_output(x_r, net(x_r), s, r, backend=backend)
    groups = x.shape[0] // group_size
    bandwidth = imm.kernel_bandwidth(s, t)[::group_size]
    weight = imm.time_weight(t, a=1.0, b=5.0)[::group_size]
    assert groups == bandwidth.shape[0]
    return imm_kernels.mmd_loss(y_t, y_r, group_size, bandwidth=bandwidth, weight=weight, backend=backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_training_step(device, backend, compiler):
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)).to(device)
    x, noise = torch.randn(8, 6, device=device), torch.randn(8, 6, device=device) * 0.5
    s, r, t = (v.repeat_interleave(4) for v in imm.sample_times(2, device=device))
    eager = imm_step(net, x, noise, s, r, t, 4, backend)
    eager.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(imm_step, fullgraph=True, backend=compiler)
    loss = compiled(net, x, noise, s, r, t, 4, backend)  # AOTAutograd compiles the backward with it
    loss.backward()
    assert rel_error(loss, eager) < 1e-5
    for p, g in zip(net.parameters(), grads):
        assert rel_error(p.grad, g) < 1e-5


def test_backend_resolved_while_tracing():
    """The first mmd_loss of a process inside torch.compile: the backend choice (imports, probing) is taken as
    a constant instead of traced, which is what resolve's dynamo marker does."""
    torch._dynamo.reset()
    _dispatch._RESOLVED.clear()
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    x, noise = torch.randn(8, 6), torch.randn(8, 6) * 0.5
    s, r, t = (v.repeat_interleave(4) for v in imm.sample_times(2))
    compiled = torch.compile(imm_step, fullgraph=True, backend="aot_eager")(net, x, noise, s, r, t, 4, "auto")
    assert rel_error(compiled, imm_step(net, x, noise, s, r, t, 4, "auto")) < 1e-5


def test_import_does_not_load_the_compiler():
    """`import imm_kernels` stays cheap (torch._dynamo alone takes over a second to import)."""
    code = "import sys, imm_kernels; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

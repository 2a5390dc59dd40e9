"""One whole IMM training step (interpolate_pair, two network passes, imm_output, mmd_loss, backward,
AdamW) with a small MLP on flattened 3x32x32 images, every IMM op on one imm_kernels backend or on the
eager reference. Shows what the fused ops are worth where the network is small."""

from __future__ import annotations

import pytest
import torch

import imm_kernels
from imm_kernels import imm, reference

from .harness import DEVICES, SMOKE, native_providers, peak_extra_bytes, record, sync, time_ms

FEATURES, GROUP = 3 * 32 * 32, 4
BATCH = {"cuda": 4096, "cpu": 256}
if SMOKE:
    BATCH = {device: 16 for device in BATCH}


def make_step(ops, net, optimizer):
    """The IMM step of docs/math.md section 4 written against `ops` (imm_kernels with a backend, or the reference)."""

    def step(x, noise, s, r, t):
        x_t, x_r = ops.interpolate_pair(x, noise, t, r)
        y_t = ops.imm_output(x_t, net(x_t), s, t)
        with torch.no_grad():
            y_r = ops.imm_output(x_r, net(x_r), s, r)
        bandwidth = imm.kernel_bandwidth(s[::GROUP], t[::GROUP])
        weight = imm.time_weight(t[::GROUP])
        loss = ops.mmd_loss(y_t, y_r, GROUP, bandwidth=bandwidth, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


class BackendOps:
    """imm_kernels' ops with the backend fixed, in the reference module's call shape."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name):
        fn = getattr(imm_kernels, name)
        return lambda *args, **kwargs: fn(*args, backend=self.backend, **kwargs)


def check_against_float64_step(provider, nets, initial, fresh_step, inputs):
    """After one step, the gradients and the parameter updates (AdamW's first step) of `nets` (the provider's and
    the float32 reference's, from the same `initial` parameters) against the same step with the reference ops in
    float64: the provider's no farther from it than twice the float32 reference's (which measured 2e-6 (smoke) and
    9e-4 (full size) for the gradients, 1e-5 and 2e-3 for the updates)."""
    step64, net64 = fresh_step(reference, torch.float64)
    step64(*(x.double() for x in inputs))

    def errors(net):
        """(gradients, updates) relative to the float64 step's, over all parameters."""
        found = []
        for got, want in (([p.grad for p in net.parameters()], [p.grad for p in net64.parameters()]),
                          ([p.detach() - p0 for p, p0 in zip(net.parameters(), initial)],
                           [p.detach() - p0 for p, p0 in zip(net64.parameters(), initial)])):
            got, want = torch.cat([g.reshape(-1).double() for g in got]), torch.cat([w.reshape(-1) for w in want])
            found.append(((got - want).norm() / want.norm()).item())
        return found

    for what, error, bound in zip(("gradients", "updates"), errors(nets[0]), errors(nets[1])):
        if error > 2 * bound:
            pytest.fail(f"{provider}: {what} after one step differ from the float64 step's by {error:.3g} (relative), "
                        f"more than twice the float32 reference's {bound:.3g}")


def providers(device: str) -> list[str]:
    return native_providers(device) + ["eager"]


CASES = [pytest.param(d, p, id=f"{d}-{p}") for d in DEVICES for p in providers(d)]


@pytest.mark.parametrize("device,provider", CASES)
def test_train_step(benchmark, device, provider):
    batch = BATCH[device]
    torch.manual_seed(0)
    data = torch.randn(batch, FEATURES, device=device) * 0.5
    noise = torch.randn_like(data) * 0.5
    s, r, t = (v.repeat_interleave(GROUP) for v in imm.sample_times(batch // GROUP, device=device))

    def fresh_step(ops, dtype=torch.float32):
        """The step on a network freshly initialized (always the same way), and the network."""
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 512), torch.nn.SiLU(),
                                  torch.nn.Linear(512, FEATURES)).to(device, dtype)
        return make_step(ops, net, torch.optim.AdamW(net.parameters(), lr=1e-4)), net

    ops = reference if provider == "eager" else BackendOps(provider.removeprefix("imm_"))
    step, net = fresh_step(ops)
    initial = [p.detach().double() for p in net.parameters()]
    got = step(data, noise, s, r, t)
    reference_step, reference_net = fresh_step(reference)
    want = reference_step(data, noise, s, r, t)
    if abs(got.item() - want.item()) > 1e-4 * abs(want.item()):
        pytest.fail(f"{provider}: loss {got.item()} differs from the reference's {want.item()}")
    check_against_float64_step(provider, (net, reference_net), initial, fresh_step, (data, noise, s, r, t))
    inputs = [(data, noise, s, r, t)]
    median = time_ms(lambda a: step(*a), inputs, device)
    peak = peak_extra_bytes(lambda: step(*inputs[0]), device)
    benchmark.pedantic(lambda: (step(*inputs[0]), sync(device)), rounds=1 if SMOKE else 3, iterations=1)
    tensor = batch * FEATURES * 4
    record(benchmark, device=device, provider=provider, op="imm_train_step", mode="step",
           shape=(batch // GROUP, GROUP, FEATURES), dtype=torch.float32, median_ms=median, min_bytes=2 * tensor,
           peak_bytes=peak, input_bytes=2 * tensor)


class ConventionMLP(torch.nn.Module):
    """The same small MLP with IMMGenerator's network convention: (c_in x_t, 1000 t, 1000 s, labels)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(FEATURES + 2, 512)
        self.out = torch.nn.Linear(512, FEATURES)

    def forward(self, x, noise_t, noise_s, labels=None):
        return self.out(torch.nn.functional.silu(self.inp(torch.cat([x, noise_t[:, None] / 1000,
                                                                     noise_s[:, None] / 1000], 1))))


def composed_loss(ops, net, x, generator):
    """IMMGenerator.loss written out with `ops` (imm_kernels or the reference), drawing in the same order."""
    groups = x.shape[0] // GROUP
    s, r, t = imm.sample_times(groups, generator=generator, dtype=torch.float64)
    noise = (0.5 * torch.randn(x.shape, generator=generator)).to(x.device)
    s_, r_, t_ = (v.repeat_interleave(GROUP).to(x.device) for v in (s, r, t))
    x_t, x_r = ops.interpolate_pair(x, noise, t_, r_)

    def f(x_in, s_in, t_in):
        c_in = imm.c_in(t_in).float()[:, None]
        return ops.imm_output(x_in, net(c_in * x_in, 1000 * t_in.float(), 1000 * s_in.float()), s_in, t_in)

    y_t = f(x_t, s_, t_)
    with torch.no_grad():
        y_r = f(x_r, s_, r_)
    return ops.mmd_loss(y_t, y_r, GROUP, bandwidth=imm.kernel_bandwidth(s, t).to(x.device),
                        weight=imm.time_weight(t).to(x.device))


GENERATOR_PROVIDERS = ("imm_generator", "imm_hand_written", "eager")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", GENERATOR_PROVIDERS)
def test_generator_step(benchmark, device, provider):
    """A whole IMM step through IMMGenerator.loss (imm_generator) against the same objective written out by hand
    from the ops (imm_hand_written, and eager with the reference ops): what the wrapper costs over the hand-written
    step. Every provider's loss is checked against the eager one's before timing."""
    batch = BATCH[device]
    torch.manual_seed(0)
    data = torch.randn(batch, FEATURES, device=device) * 0.5
    torch.manual_seed(1)
    net = ConventionMLP().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = imm_kernels.IMMGenerator(net)
    losses = {"imm_generator": lambda g: gen.loss(data, group_size=GROUP, generator=g),
              "imm_hand_written": lambda g: composed_loss(imm_kernels, net, data, g),
              "eager": lambda g: composed_loss(reference, net, data, g)}
    got = losses[provider](torch.Generator().manual_seed(2)).item()
    want = losses["eager"](torch.Generator().manual_seed(2)).item()
    if abs(got - want) > 1e-4 * abs(want):
        pytest.fail(f"{provider}: loss {got} differs from the eager composition's {want}")

    def step(_):
        loss = losses[provider](torch.Generator().manual_seed(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    median = time_ms(step, [None], device)
    benchmark.pedantic(lambda: (step(None), sync(device)), rounds=1 if SMOKE else 3, iterations=1)
    tensor = batch * FEATURES * 4
    record(benchmark, device=device, provider=provider, op="imm_generator_step", mode="step",
           shape=(batch // GROUP, GROUP, FEATURES), dtype=torch.float32, median_ms=median, min_bytes=2 * tensor,
           peak_bytes=peak_extra_bytes(lambda: step(None), device), input_bytes=2 * tensor)

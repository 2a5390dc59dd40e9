"""IMMGenerator: the wrapper's loss against the objective composed by hand from the low-level ops (float64, loss and
parameter gradients), its sampler against a hand-written pushforward / restart loop (bit for bit), the network
convention, torch.compile(fullgraph=True) of .loss, DistributedDataParallel with two gloo ranks, and bad input."""

import os
import socket

import pytest
import torch
from conftest import BACKEND_CASES, rel_error

import imm_kernels
from imm_kernels import IMMGenerator, imm, time_grid


class Net(torch.nn.Module):
    """A small conditional network of the convention: (c_in x, 1000 t, 1000 u, labels) -> x's shape."""

    def __init__(self, dim: int = 3, classes: int = 2, width: int = 16, dtype=torch.float64):
        super().__init__()
        self.null_label = classes if classes else None
        self.inp = torch.nn.Linear(dim + 2, width, dtype=dtype)
        self.label = torch.nn.Embedding(classes + 1, width, dtype=dtype) if classes else None
        self.out = torch.nn.Linear(width, dim, dtype=dtype)

    def forward(self, x, noise_t, noise_second, labels=None):
        times = torch.stack([noise_t, noise_second], 1).to(self.inp.weight.dtype) / 1000
        h = self.inp(torch.cat([x.to(self.inp.weight.dtype), times], 1))
        if labels is not None:
            h = h + self.label(labels)
        return self.out(torch.nn.functional.silu(h))


def trained(net) -> list:
    """The parameters an unconditional call trains (the label embedding is unused there)."""
    return [p for name, p in net.named_parameters() if not name.startswith("label")]


def hand_composed_loss(net, x, labels, generator, *, group_size, k, a, b, bandwidth_scale, schedule, param,
                       time_embedding, backend, partner_weight=1.0, partner="kernel", r_spacing="eta"):
    """The objective of docs/math.md section 4 from the low-level ops, drawing from the generator in the order the
    wrapper documents (label dropout, times, noise)."""
    groups = x.shape[0] // group_size
    sigma_data = 0.5
    dropped = torch.rand(groups, generator=generator) < 0.25
    labels = torch.where(dropped.repeat_interleave(group_size), net.null_label, labels)
    s, r, t = imm.sample_times(groups, schedule=schedule, k=k, r_spacing=r_spacing, generator=generator,
                               dtype=torch.float64)
    noise = sigma_data * torch.randn(x.shape, generator=generator).to(x.dtype)
    s_rows, r_rows, t_rows = (v.repeat_interleave(group_size) for v in (s, r, t))
    x_t, x_r = imm_kernels.interpolate_pair(x, noise, t_rows, r_rows, schedule=schedule, backend=backend)

    def f(x_in, s_, t_):
        c_in = imm.c_in(t_, schedule=schedule, sigma_data=sigma_data).float()
        second = s_ if time_embedding == "s" else t_ - s_
        g = net(x_in.float() * c_in[:, None], 1000 * t_.float(), 1000 * second.float(), labels).to(x.dtype)
        return imm_kernels.imm_output(x_in, g, s_, t_, schedule=schedule, param=param, sigma_data=sigma_data,
                                      backend=backend)

    y_t = f(x_t, s_rows, t_rows)
    with torch.no_grad():
        y_r = f(x_r, s_rows, r_rows)
    bandwidth = bandwidth_scale * imm.kernel_bandwidth(s, t, schedule=schedule, param=param)
    weight = imm.time_weight(t, a=a, b=b, schedule=schedule)
    if partner_weight == 1 and partner == "kernel":
        return imm_kernels.mmd_loss(y_t, y_r, group_size, backend=backend, bandwidth=bandwidth, weight=weight)
    # The V-statistic's pair sums with the partners' cross terms (and the constant self diagonals) weighed
    # partner_weight, from distances of their own.
    m, features = group_size, y_t.shape[1]
    a_, b_ = y_t.reshape(groups, m, -1), y_r.reshape(groups, m, -1)
    kernel = [torch.exp(-bandwidth.view(groups, 1, 1) * torch.cdist(u, v).clamp_min(1e-8) / features)
              for u, v in ((a_, a_), (b_, b_), (a_, b_))]
    pair = torch.full((m, m), 1.0, dtype=y_t.dtype, device=y_t.device)
    pair.fill_diagonal_(partner_weight if partner == "kernel" else 0.0)
    per_group = ((kernel[0] + kernel[1] - 2 * kernel[2]) * pair / m**2).sum((1, 2))
    if partner == "mean":  # (2/M) mean_i |d_i|^2 / (2 c h), c the mean |d_i| held fixed, h = D / bandwidth; r > s only
        distance = (a_ - b_).norm(dim=2)
        typical = distance.mean(1).detach()
        partners = (2 / m) * (distance.square() / (2 * typical * features / bandwidth).view(groups, 1)).mean(1)
        per_group = per_group + partner_weight * torch.where(r > s, partners, 0)
    return (weight.to(per_group) * per_group).mean()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("schedule,param,time_embedding,bandwidth_scale,partner_weight,partner,r_spacing", [
    ("fm", "simple_edm", "s", 1.0, 1.0, "kernel", "eta"), ("cosine", "identity", "stride", 1.0, 1.0, "kernel", "eta"),
    ("fm", "euler_fm", "s", 1.0, 1.0, "kernel", "angle"), ("fm", "simple_edm", "s", 0.25, 1.0, "kernel", "eta"),
    ("fm", "simple_edm", "s", 1.0, 0.25, "kernel", "eta"), ("cosine", "simple_edm", "s", 1.0, 0.0, "kernel", "eta"),
    ("fm", "simple_edm", "s", 1.0, 1.0, "mean", "angle"), ("cosine", "simple_edm", "stride", 0.5, 3.0, "mean", "eta")])
def test_loss_equals_the_hand_composed_objective(device, backend, schedule, param, time_embedding, bandwidth_scale,
                                                 partner_weight, partner, r_spacing):
    """float64: the loss and every parameter's gradient within 1e-12 of the composition of the low-level ops."""
    net = Net().to(device)
    x = torch.randn(32, 3, dtype=torch.float64, device=device) * 0.5
    labels = torch.randint(0, 2, (32,), device=device)
    gen = IMMGenerator(net, schedule=schedule, param=param, time_embedding=time_embedding)
    # r(s, t) = s in some of the 8 groups and above s in others (partner="mean" treats them apart): k = 8 takes
    # eta steps of 0.65, k = 3 angle steps of 0.2 rad
    options = dict(group_size=4, k=8 if r_spacing == "eta" else 3, a=2.0, b=4.0, bandwidth_scale=bandwidth_scale,
                   partner_weight=partner_weight,
                   partner=partner, r_spacing=r_spacing)
    loss, parts = gen.loss(x, labels, label_dropout=0.25, generator=torch.Generator().manual_seed(1), backend=backend,
                           return_parts=True, **options)
    assert bool((parts["r"] == parts["s"]).any() and (parts["r"] > parts["s"]).any())
    grads = torch.autograd.grad(loss, list(net.parameters()))
    want = hand_composed_loss(net, x, labels, torch.Generator().manual_seed(1), schedule=schedule, param=param,
                              time_embedding=time_embedding, backend=backend, **options)
    want_grads = torch.autograd.grad(want, list(net.parameters()))
    assert rel_error(loss, want) <= 1e-12
    for got, expected in zip(grads, want_grads):
        assert rel_error(got, expected) <= 1e-12


def test_loss_parts_and_a_separate_target():
    net, target = Net(), Net()
    target.load_state_dict(net.state_dict())
    gen = IMMGenerator(net)
    x = torch.randn(16, 3, dtype=torch.float64) * 0.5
    loss, parts = gen.loss(x, generator=torch.Generator().manual_seed(0), return_parts=True)
    assert parts["per_group"].shape == (4,) and parts["s"].shape == parts["r"].shape == parts["t"].shape == (4,)
    assert bool((parts["s"] <= parts["r"]).all() and (parts["r"] <= parts["t"]).all())
    assert rel_error(loss, parts["per_group"].mean()) <= 1e-15
    same = gen.loss(x, generator=torch.Generator().manual_seed(0), target=target)
    assert rel_error(same, loss) <= 1e-12  # an identical copy as the target changes nothing
    with torch.no_grad():
        target.out.bias.add_(1.0)
    assert rel_error(gen.loss(x, generator=torch.Generator().manual_seed(0), target=target), loss) > 1e-3


def reference_sampler(net, n, steps, sampler, *, middle_eta, guidance, labels, generator):
    """Today's examples sampler, written out: pushforward or restart on time_grid, noise drawn on the CPU generator,
    the state in float64."""
    times = time_grid(steps, schedule="fm", middle_eta=middle_eta)
    gen = IMMGenerator(net)

    def noise():
        return 0.5 * torch.randn((n, 3), generator=generator, dtype=torch.float64)

    def f(x, s, t):
        full_s, full_t = (torch.full((n,), float(v), dtype=torch.float64) for v in (s, t))
        g = gen.network_output(x, full_s, full_t, labels, guidance=guidance).to(x.dtype)
        return imm_kernels.imm_output(x, g, full_s, full_t)

    x = noise()
    for t, s in zip(times[:-1], times[1:]):
        if sampler == "pushforward":
            x = f(x, s, t)
        else:
            x = f(x, 0.0, t)
            if float(s) > 0:
                x = imm_kernels.interpolate(x, noise(), torch.full((n,), float(s), dtype=torch.float64))
    return x


@pytest.mark.parametrize("sampler", ["pushforward", "restart"])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_sample_matches_the_written_out_sampler_bit_for_bit(sampler, steps, guidance):
    net = Net()
    labels = torch.arange(10) % 2
    got = IMMGenerator(net).sample(10, (3,), steps=steps, sampler=sampler, middle_eta=0.6, labels=labels,
                                   guidance=guidance, generator=torch.Generator().manual_seed(4))
    want = reference_sampler(net, 10, steps, sampler, middle_eta=0.6, guidance=guidance, labels=labels,
                             generator=torch.Generator().manual_seed(4))
    assert got.dtype == torch.float64 and torch.equal(got, want)
    chunked = IMMGenerator(net).sample(10, (3,), steps=steps, sampler=sampler, middle_eta=0.6, labels=labels,
                                       guidance=guidance, generator=torch.Generator().manual_seed(4), batch=4)
    assert chunked.shape == got.shape and torch.isfinite(chunked).all()


def test_time_grids():
    assert time_grid(1).tolist() == [0.994, 0.0]
    assert time_grid(2, middle_eta=1.4)[1].item() == pytest.approx(1.4 / 2.4)
    assert time_grid(2, middle_eta=0.6)[1].item() == pytest.approx(0.375)
    edm = time_grid(8, schedule="cosine", T=0.99, eps_t=0.006)
    assert edm[0].item() == 0.99 and edm[-1].item() == 0.006 and bool((edm[1:] < edm[:-1]).all())
    assert time_grid(4, "uniform").tolist() == pytest.approx([0.994, 0.7455, 0.497, 0.2485, 0.0])
    with pytest.raises(ValueError, match="grid 'eta' is defined for 1 or 2 steps"):
        time_grid(4, "eta")


def test_the_network_sees_the_documented_inputs():
    """c_in(t) x_t, 1000 t and 1000 s (or 1000 (t - s) with stride), labels, in that order; f at s = t is x_t."""
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x_in, noise_t, noise_second, labels):
            seen.update(x_in=x_in, noise_t=noise_t, noise_second=noise_second, labels=labels)
            return torch.zeros_like(x_in)

    x_t = torch.randn(4, 3, dtype=torch.float64)
    s, t = torch.full((4,), 0.2, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    labels = torch.arange(4)
    for embedding, second in (("s", 0.2), ("stride", 0.5)):
        IMMGenerator(Recorder(), time_embedding=embedding)(x_t, s, t, labels)
        c_in = 1 / (0.5 * (0.3**2 + 0.7**2) ** 0.5)
        assert seen["x_in"].dtype == torch.float32 and torch.allclose(seen["x_in"], (c_in * x_t).float())
        assert seen["noise_t"].tolist() == pytest.approx([700.0] * 4)
        assert seen["noise_second"].tolist() == pytest.approx([1000 * second] * 4, rel=1e-6)
        assert seen["labels"] is labels
    assert torch.equal(IMMGenerator(Net())(x_t, 0.4, 0.4), x_t)


def test_label_dropout_is_per_group():
    """Whole groups train unconditionally (their labels all null_label), the others keep every label."""
    seen = []

    class Recorder(Net):
        def forward(self, x, noise_t, noise_second, labels=None):
            seen.append(labels.clone())
            return super().forward(x, noise_t, noise_second, labels)

    labels = torch.arange(64) % 2
    IMMGenerator(Recorder()).loss(torch.randn(64, 3, dtype=torch.float64) * 0.5, labels, group_size=4,
                                  label_dropout=0.5, generator=torch.Generator().manual_seed(0))
    groups = seen[0].view(16, 4)
    dropped = (groups == 2).all(1)
    assert 0 < int(dropped.sum()) < 16, "the draw dropped no group or every group"
    assert torch.equal(groups[~dropped], labels.view(16, 4)[~dropped]) and not (groups[~dropped] == 2).any()
    assert torch.equal(seen[1], seen[0])  # the stop-gradient pass sees the same labels


def test_bfloat16_network_output_under_autocast():
    """A network whose output is bfloat16 (autocast) meets float32 x_t: the loss is float32 and trains."""
    net = Net(dtype=torch.float32)
    gen = IMMGenerator(net)
    x = torch.randn(16, 3) * 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gen.loss(x, torch.arange(16) % 2, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_compile_fullgraph_of_the_loss():
    torch._dynamo.reset()
    net = Net(dtype=torch.float32)
    gen = IMMGenerator(net)
    x = torch.randn(16, 3) * 0.5
    s, r, t = (torch.full((4,), v, dtype=torch.float64) for v in (0.2, 0.5, 0.6))

    def step(x, noise):  # the loss's body with given times and noise (the random draws stay outside the graph)
        s_rows, r_rows, t_rows = (v.repeat_interleave(4) for v in (s, r, t))
        x_t, x_r = imm_kernels.interpolate_pair(x, noise, t_rows, r_rows)
        y_t = gen(x_t, s_rows, t_rows)
        with torch.no_grad():
            y_r = gen(x_r, s_rows, r_rows)
        return imm_kernels.mmd_loss(y_t, y_r, 4, bandwidth=imm.kernel_bandwidth(s, t), weight=imm.time_weight(t))

    noise = torch.randn(16, 3) * 0.5
    eager = step(x, noise)
    grads = torch.autograd.grad(eager, trained(net))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, noise)
    assert rel_error(compiled, eager) <= 1e-6
    for got, want in zip(torch.autograd.grad(compiled, trained(net)), grads):
        assert rel_error(got, want) <= 1e-5
    whole = torch.compile(lambda x: gen.loss(x, generator=torch.Generator().manual_seed(0)), backend="aot_eager")
    assert rel_error(whole(x), gen.loss(x, generator=torch.Generator().manual_seed(0))) <= 1e-6


def _ddp_worker(rank: int, port: int, wrap: str, results) -> None:
    """One gloo rank: half of the batch each, gradients averaged by DDP around the network or the generator."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = Net(classes=0)  # every parameter trained: DDP reduces a bucket once all of its gradients are in
    x = (torch.randn(16, 3, dtype=torch.float64) * 0.5)[rank * 8:(rank + 1) * 8]
    generator = torch.Generator().manual_seed(10 + rank)
    if wrap == "network":  # (the DDP module must live until backward: its reducer does the averaging)
        gen = IMMGenerator(DistributedDataParallel(net))
        loss = gen.loss(x, generator=generator)
    else:
        gen = IMMGenerator(net)
        online = DistributedDataParallel(gen)
        loss = gen.loss(x, generator=generator, online=online)
    loss.backward()
    results[rank] = [p.grad.clone() for p in net.parameters()]
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("wrap", ["network", "generator"])
def test_two_rank_gloo_ddp_step(wrap):
    """Each rank's gradient is the mean of the two ranks' single-process gradients."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, wrap, results), nprocs=2, join=True)
    torch.manual_seed(0)
    net = Net(classes=0)
    x = torch.randn(16, 3, dtype=torch.float64) * 0.5
    single = []
    for rank in range(2):
        net.zero_grad()
        loss = IMMGenerator(net).loss(x[rank * 8:(rank + 1) * 8], generator=torch.Generator().manual_seed(10 + rank))
        loss.backward()
        single.append([p.grad.clone() for p in net.parameters()])
    for rank in range(2):
        for got, a, b in zip(results[rank], *single):
            assert rel_error(got, (a + b) / 2) <= 1e-12


class WrongShape(torch.nn.Module):
    def forward(self, x, noise_t, noise_second, labels=None):
        return x[:, :1]


BAD = [
    ("a network returning the wrong shape", lambda gen, x: IMMGenerator(WrongShape()).loss(x),
     ValueError, r"the network must return a floating tensor of its input's shape \(16, 3\); got shape \(16, 1\)"),
    ("a batch not divisible by the group size", lambda gen, x: gen.loss(x[:15]), ValueError,
     "batch size 15 of x must be a multiple of group_size=4"),
    ("a target network of another shape", lambda gen, x: gen.loss(x, target=WrongShape()), ValueError,
     "input's shape"),
    ("a time above 1", lambda gen, x: gen(x, 0.5, 1.5), ValueError, r"t must lie in \[0, 1\]"),
    ("a negative time tensor", lambda gen, x: gen(x, torch.full((16,), -0.1, dtype=torch.float64), 0.5), ValueError,
     r"s must lie in \[0, 1\]"),
    ("s after t", lambda gen, x: gen(x, torch.full((16,), 0.6, dtype=torch.float64), 0.5), ValueError,
     "s must be <= t"),
    ("T outside [0, 1]", lambda gen, x: IMMGenerator(Net(), T=1.2), ValueError, "0 <= eps_t < T <= 1"),
    ("an unknown time embedding", lambda gen, x: IMMGenerator(Net(), time_embedding="t"), ValueError,
     "time_embedding must be one of"),
    ("labels of the wrong shape", lambda gen, x: gen.loss(x, torch.zeros(3, dtype=torch.long)), ValueError,
     r"labels must be a tensor of shape \(16,\)"),
    ("label dropout of 1", lambda gen, x: gen.loss(x, label_dropout=1.0), ValueError, "label_dropout must be < 1"),
    ("a bandwidth scale of 0", lambda gen, x: gen.loss(x, bandwidth_scale=0.0), ValueError,
     "bandwidth_scale must be > 0"),
    ("a negative partner weight", lambda gen, x: gen.loss(x, partner_weight=-0.5), ValueError,
     "partner_weight must be >= 0"),
    ("a partner weight with the u estimator", lambda gen, x: gen.loss(x, estimator="u", partner_weight=0.5),
     ValueError, "partner_weight=0.5, partner='kernel' need estimator='v'"),
    ("an unknown partners' term", lambda gen, x: gen.loss(x, partner="median"), ValueError,
     "partner must be one of 'kernel', 'mean'; got 'median'"),
    ("the mean partners' term with the unpaired estimator",
     lambda gen, x: gen.loss(x, estimator="unpaired", partner="mean"), ValueError,
     "partner_weight=1.0, partner='mean' need estimator='v'"),
    ("an unknown sampler", lambda gen, x: gen.sample(4, (3,), sampler="euler"), ValueError, "sampler must be one of"),
    ("a network that is not callable", lambda gen, x: IMMGenerator(3), TypeError, "network must be a callable"),
]


@pytest.mark.parametrize("case,call,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_clearly(case, call, error, match):
    gen = IMMGenerator(Net())
    with pytest.raises(error, match=match):
        call(gen, torch.randn(16, 3, dtype=torch.float64))

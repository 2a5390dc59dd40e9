"""IMMGenerator: Inductive Moment Matching around any network, with the paper's training objective and samplers
(docs/math.md sections 3-5). A training step is three lines:

    gen = IMMGenerator(net)                      # once
    loss = gen.loss(x, group_size=4)             # x: a batch of data scaled to standard deviation sigma_data
    loss.backward()

The network convention (the one thing a network must follow): it is called as

    network(c_in(t) * x_t, c_noise(t), c_noise(u), labels)  ->  a tensor of x_t's shape

with c_in(t) = 1 / (sigma_data sqrt(alpha_t^2 + sigma_t^2)), c_noise(t) = 1000 t, u = s (time_embedding "s") or
t - s ("stride"), the times as (B,) float32 tensors (t before the second time), and labels a (B,) long tensor
or None. Its input is float32; its output may be in any floating dtype (bfloat16 under autocast, say): it is
converted to x_t's dtype before c_skip x_t + c_out G is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate, imm, schedules
from .interpolant import imm_output, interpolate, interpolate_pair
from .loss_head import imm_mmd_loss

TIME_EMBEDDINGS = ("s", "stride")
SAMPLERS = ("pushforward", "restart")
PARTNERS = ("kernel", "mean")
GRIDS = ("auto", "uniform", "eta", "edm")
EDM_RHO = 7  # the edm grid's spacing in eta


def time_grid(steps: int, grid: str = "auto", *, schedule: str = "fm", T: float | None = None, eps_t: float = 0.0,
              middle_eta: float = 1.4) -> Tensor:
    """Sampling times t_N = T > ... > t_0 = eps_t (float64, N = steps) of docs/math.md section 5. grid: "uniform"
    (linspace), "eta" (1 or 2 steps; the middle point t_1 has eta(t_1) = middle_eta, the paper's 1.4), "edm"
    (spaced in eta with rho = 7, dense near the data), or "auto": eta for 1-2 steps, edm beyond."""
    _validate.positive_int("steps", steps)
    _validate.choice("grid", grid, GRIDS)
    _validate.choice("schedule", schedule, schedules.SCHEDULES)
    T = schedules.DEFAULT_T[schedule] if T is None else T
    _validate.time_range(T, eps_t)
    if grid == "auto":
        grid = "eta" if steps <= 2 else "edm"
    if grid == "uniform":
        return torch.linspace(T, eps_t, steps + 1, dtype=torch.float64)
    if grid == "eta":
        if steps > 2:
            raise ValueError(f"grid 'eta' is defined for 1 or 2 steps; got steps={steps}")
        middle_eta = _validate.real("middle_eta", middle_eta, positive=True)
        middle = [float(schedules.eta_inv(middle_eta, schedule))] if steps == 2 else []
        return torch.tensor([T, *middle, eps_t], dtype=torch.float64)
    eta_max, eta_min = float(schedules.eta(T, schedule)), float(schedules.eta(eps_t, schedule))
    fraction = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    etas = (eta_max ** (1 / EDM_RHO) + fraction * (eta_min ** (1 / EDM_RHO) - eta_max ** (1 / EDM_RHO))) ** EDM_RHO
    times = schedules.eta_inv(etas, schedule)
    times[0], times[-1] = T, eps_t  # exact ends despite rounding
    return times


class IMMGenerator(torch.nn.Module):
    """f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) G(c_in(t) x_t, c_noise(t), c_noise(s or t - s), labels) around
    `network` (the convention in this module's docstring), with the training objective (.loss) and few-step
    sampling (.sample).

    schedule: "fm" or "cosine"; param: "simple_edm", "euler_fm" (fm only) or "identity"; sigma_data: the data's
    standard deviation and the prior noise's (0.5: scale images to [-1, 1] and other data to std 0.5);
    time_embedding: "s" or "stride" (t - s) as the network's second time; eps_t, T: the smallest and largest
    times (eps_t 0.006 for pixels, 0 for latents and points; T the schedule's default). null_label: the label
    the network reads as "no class" (label dropout, guidance); default network.null_label if it has one.
    """

    def __init__(self, network: torch.nn.Module, *, schedule: str = "fm", param: str = "simple_edm",
                 sigma_data: float = 0.5, time_embedding: str = "s", eps_t: float = 0.0, T: float | None = None,
                 null_label: int | None = None):
        super().__init__()
        if not callable(network):
            raise TypeError(f"network must be a callable module; got {type(network).__name__}")
        self.sigma_data = _validate.imm_output_options(schedule, param, sigma_data)
        _validate.choice("time_embedding", time_embedding, TIME_EMBEDDINGS)
        T = schedules.DEFAULT_T[schedule] if T is None else T
        _validate.time_range(T, eps_t)
        self.network, self.schedule, self.param, self.time_embedding = network, schedule, param, time_embedding
        self.eps_t, self.T = float(eps_t), float(T)
        self.null_label = getattr(network, "null_label", None) if null_label is None else null_label

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule!r}, param={self.param!r}, sigma_data={self.sigma_data}, "
                f"time_embedding={self.time_embedding!r}, eps_t={self.eps_t}, T={self.T}")

    def _times(self, x_t: Tensor, s, t) -> tuple[Tensor, Tensor]:
        """s and t as (B,) tensors on x_t's device (floats broadcast), checked: in [0, 1], s <= t."""
        batch = x_t.shape[0]
        out = []
        for name, value in (("s", s), ("t", t)):
            tensor, number = _validate.time_operand(name, value, batch, x_t.device)
            _validate.time_values(name, tensor)
            out.append(tensor if tensor is not None  # (B,): time_operand expands one value to the batch
                       else torch.full((batch,), number, dtype=torch.float64, device=x_t.device))
        _validate.ordered_values("s", out[0], "t", out[1])
        return out[0], out[1]

    def network_output(self, x_t: Tensor, s, t, labels: Tensor | None = None, *, guidance: float = 1.0,
                       network: torch.nn.Module | None = None) -> Tensor:
        """G(c_in(t) x_t, c_noise(t), c_noise(s or t - s), labels) of x_t's shape, in float32 at least (float64 if
        the network gives float64); guidance w != 1 mixes G_null + w (G_labels - G_null) (classifier-free guidance,
        one batch of both halves)."""
        _validate.float_tensor("x_t", x_t)
        s, t = self._times(x_t, s, t)
        network = self.network if network is None else network
        scale = imm.c_in(t.double(), schedule=self.schedule, sigma_data=self.sigma_data).to(torch.float32)
        x_in = x_t.to(torch.float32) * scale.view(-1, *([1] * (x_t.dim() - 1)))
        second = s if self.time_embedding == "s" else t - s
        noise_t, noise_second = 1000 * t.to(torch.float32), 1000 * second.to(torch.float32)
        if labels is None or guidance == 1.0:
            return self._checked(network(x_in, noise_t, noise_second, labels), x_t.shape)
        if self.null_label is None:
            raise ValueError("guidance needs null_label (the network's 'no class' label): pass it to IMMGenerator")
        null = torch.full_like(labels, self.null_label)
        both = network(torch.cat([x_in, x_in]), torch.cat([noise_t, noise_t]), torch.cat([noise_second, noise_second]),
                       torch.cat([labels, null]))
        g_cond, g_null = self._checked(both, (2 * x_t.shape[0], *x_t.shape[1:])).chunk(2)
        return g_null + guidance * (g_cond - g_null)

    @staticmethod
    def _checked(g, shape) -> Tensor:
        """The network's output in float32 at least (bfloat16 and float16 converted, float64 kept), once it is seen
        to be a floating tensor of its input's shape."""
        if not isinstance(g, Tensor) or g.shape != shape or not g.is_floating_point():
            got = f"shape {tuple(g.shape)} ({g.dtype})" if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"the network must return a floating tensor of its input's shape {tuple(shape)}; "
                             f"got {got}")
        return g.to(torch.promote_types(g.dtype, torch.float32))

    def forward(self, x_t: Tensor, s, t, labels: Tensor | None = None, *, guidance: float = 1.0,
                network: torch.nn.Module | None = None, network_output_only: bool = False) -> Tensor:
        """f_{s,t}(x_t) in x_t's dtype: s <= t floats or (B,) tensors; `network` in place of the wrapped one (an
        EMA copy, say). network_output_only: G of f = c_skip x_t + c_out G instead (in x_t's dtype), which .loss
        asks of a DistributedDataParallel wrapper (its forward is this one)."""
        g = self.network_output(x_t, s, t, labels, guidance=guidance, network=network).to(x_t.dtype)
        if network_output_only:
            return g
        return imm_output(x_t, g, s, t, schedule=self.schedule, param=self.param, sigma_data=self.sigma_data)

    def loss(self, x: Tensor, labels: Tensor | None = None, *, group_size: int = 4, k: float = 12,
             r_spacing: str = "eta", kernel: str = "laplace", estimator: str = "v", a: float = 1.0, b: float = 5.0,
             bandwidth_scale: float = 1.0, partner_weight: float = 1.0, partner: str = "kernel",
             label_dropout: float = 0.0,
             target: torch.nn.Module | None = None,
             online=None, generator: torch.Generator | None = None, delta: float | None = None,
             return_parts: bool = False, backend: str = "auto"):
        """The IMM objective of one batch (docs/math.md section 4): the weighted grouped MMD between
        f_{s,t}(x_t) and the stop-gradient f_{s,r}(x_r), one (s, r, t) per group of group_size consecutive rows,
        x_t and x_r from the same (x, eps).

        x: (B, ...) data scaled to standard deviation sigma_data, B a multiple of group_size. labels: (B,) or None;
        label_dropout: the probability that a group trains unconditionally (its labels set to null_label).
        k: r(s, t)'s eta decrement (eta(T) - eta(eps_t)) / 2^k, or with r_spacing "angle" the same number of equal
        steps in atan(eta) (imm.r_from_st; docs/few_step.md); kernel, estimator: as mmd_loss; a, b: the time
        weight w(t) of paper Eq. 13. The kernel's bandwidth is bandwidth_scale / |c_out(s, t)| (the paper's: 1);
        a scale below 1 widens the kernel, which changes how the maps behave over several steps on low-dimensional
        data (docs/few_step.md). partner_weight (estimator "v" only): the weight of the partners' cross terms
        k(f_{s,t}(x_t^i), f_{s,r}(x_r^i)), made from one (x, eps), relative to the V-statistic's (1, the paper's):
        partner_weight * V + (1 - partner_weight) (1 - 1/M) * the "unpaired" estimate, every other pair weighed as in
        V. The partners' regression is what narrows the maps; below 1 it weighs less (docs/gaussian.md). Two passes
        of the loss head where it is not 1. partner (estimator "v" only): "kernel" (the paper's) or "mean": the
        partners' kernel terms replaced by a squared-distance term, partner_weight (2/M) mean_i |d_i|^2 / (2 c h) with
        d_i = f_{s,t}(x_t^i) - f_{s,r}(x_r^i), c = mean_i |d_i| (no gradient) and h = D / bandwidth, in groups with
        r > s only: the Laplace kernel's pull at the typical partner distance, toward the conditional mean of the
        chained target instead of its median, which keeps multi-step sampling of low-dimensional data from drifting
        wider with every step (docs/few_step.md). Every other pair is weighed as in V. target: the network of the
        stop-gradient pass (an EMA or frozen copy of the wrapped one's shape), default the wrapped network under
        no_grad. online: what to call for the pass with gradient, default this generator; pass DDP(generator)
        when the generator is wrapped in DistributedDataParallel (keep the DDP module referenced until backward:
        its reducer averages the gradients). generator: the torch.Generator of the times,
        noise and label dropout (its device is where they are drawn). delta: r <= t - delta (default 1e-4 under
        float16 autocast, where r and t could round to one value).

        Returns the scalar loss; with return_parts, (loss, parts): parts["per_group"] the (G,) weighted losses
        (the loss is their mean) and parts["s"], ["r"], ["t"] the (G,) times.
        """
        _validate.float_tensor("x", x)
        _validate.positive_int("group_size", group_size, minimum=_validate.smallest_group(estimator))
        if x.shape[0] % group_size:
            raise ValueError(f"the batch size {x.shape[0]} of x must be a multiple of group_size={group_size}")
        label_dropout = _validate.real("label_dropout", label_dropout, nonnegative=True)
        if label_dropout >= 1:
            raise ValueError(f"label_dropout must be < 1; got {label_dropout}")
        bandwidth_scale = _validate.real("bandwidth_scale", bandwidth_scale, positive=True)
        partner_weight = _validate.real("partner_weight", partner_weight, nonnegative=True)
        _validate.choice("partner", partner, PARTNERS)
        if (partner_weight != 1 or partner != "kernel") and (estimator != "v" or group_size < 2):
            raise ValueError(f"partner_weight={partner_weight}, partner={partner!r} need estimator='v' and "
                             f"group_size >= 2; got estimator={estimator!r}, group_size={group_size}")
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != x.shape[:1]):
            raise ValueError(f"labels must be a tensor of shape ({x.shape[0]},) or None")
        groups, device = x.shape[0] // group_size, x.device
        draw_on = generator.device if generator is not None else device
        if labels is not None and label_dropout and self.null_label is None:
            raise ValueError("label_dropout needs null_label (the network's 'no class' label)")
        if labels is not None:  # per group, drawn before the times (the examples' order)
            dropped = torch.rand(groups, generator=generator, device=draw_on) < label_dropout
            labels = torch.where(dropped.repeat_interleave(group_size).to(labels.device),
                                 self.null_label if self.null_label is not None else 0, labels).to(device)
        if delta is None and torch.is_autocast_enabled(device.type) and (
                torch.get_autocast_dtype(device.type) == torch.float16):
            delta = 1e-4
        s, r, t = imm.sample_times(groups, schedule=self.schedule, k=k, T=self.T, eps_t=self.eps_t, delta=delta,
                                   r_spacing=r_spacing, generator=generator, device=draw_on, dtype=torch.float64)
        noise = (self.sigma_data * torch.randn(x.shape, generator=generator, device=draw_on)).to(device, x.dtype)
        s_rows, r_rows, t_rows = (v.repeat_interleave(group_size).to(device) for v in (s, r, t))
        x_t, x_r = interpolate_pair(x, noise, t_rows, r_rows, schedule=self.schedule, backend=backend)
        g_t = (self if online is None else online)(x_t, s_rows, t_rows, labels, network_output_only=True)
        with torch.no_grad():
            g_r = self(x_r, s_rows, r_rows, labels, network=target, network_output_only=True)
        bandwidth = bandwidth_scale * imm.kernel_bandwidth(s, t, schedule=self.schedule, param=self.param,
                                                           sigma_data=self.sigma_data)
        weight = imm.time_weight(t, a=a, b=b, schedule=self.schedule)
        # The loss head: mmd_loss of f_{s,t}(x_t) and f_{s,r}(x_r), the outputs formed inside its kernels.
        options = dict(schedule=self.schedule, param=self.param, sigma_data=self.sigma_data, kernel=kernel,
                       bandwidth=bandwidth.to(device), backend=backend, reduction="mean" if not return_parts else "none")
        times = [v.to(device) for v in (s, r, t)]
        weight = weight.to(device)

        def head(estimator, weight):
            return imm_mmd_loss(x_t, g_t, x_r, g_r, *times, group_size, estimator=estimator, weight=weight, **options)

        unpaired_weight = (1 - 1 / group_size) * weight  # V = (1 - 1/M) unpaired + the partners' terms
        if partner == "mean":
            partners = self._mean_partner_loss(x_t, g_t, x_r, g_r, times, group_size, bandwidth.to(device), backend)
            options["reduction"] = "none"
            loss = head("unpaired", unpaired_weight)
            loss = loss + (partner_weight * weight * partners).to(loss.dtype)
            loss = loss if return_parts else loss.mean()
        elif partner_weight == 1:
            loss = head(estimator, weight)
        else:  # V with the partners' cross terms weighed partner_weight: a mix of V and the unpaired estimate
            loss = head("v", partner_weight * weight) + head("unpaired", (1 - partner_weight) * unpaired_weight)
        if not return_parts:
            return loss
        return loss.mean(), {"per_group": loss, "s": s, "r": r, "t": t}

    def _mean_partner_loss(self, x_t, g_t, x_r, g_r, times, group_size, bandwidth, backend) -> Tensor:
        """(G,) float64: (2/M) mean_i |d_i|^2 / (2 c h) of each group with r > s (0 where r = s), .loss's
        partner="mean"."""
        s, r, t = (v.repeat_interleave(group_size) for v in times)
        options = dict(schedule=self.schedule, param=self.param, sigma_data=self.sigma_data, backend=backend)
        difference = imm_output(x_t, g_t, s, t, **options) - imm_output(x_r, g_r, s, r, **options)
        distance = difference.flatten(1).to(torch.float64).norm(dim=1).view(-1, group_size)
        typical = distance.detach().mean(1).clamp_min(torch.finfo(torch.float64).tiny)
        width = difference[0].numel() / bandwidth.double()  # h = D / bandwidth, the Laplace kernel's length
        partners = distance.square().mean(1) / (group_size * typical * width)
        return torch.where(times[1] > times[0], partners, 0)

    @torch.no_grad()
    def sample(self, n: int, sample_shape, *, steps: int = 1, sampler: str = "pushforward", grid: str = "auto",
               middle_eta: float = 1.4, labels: Tensor | None = None, guidance: float = 1.0,
               generator: torch.Generator | None = None, device=None, batch: int = 4096,
               network: torch.nn.Module | None = None) -> Tensor:
        """n samples of shape sample_shape in float64 on `device` (default: the network's), from noise
        sigma_data eps at T down to eps_t in `steps` network calls on time_grid(steps, grid, middle_eta=...).
        sampler: "pushforward" (x <- f_{t_{i-1}, t_i}(x)) or "restart" (jump to eps_t with f_{eps_t, t_i}, then
        re-noise with fresh noise to t_{i-1}). labels: (n,) classes or None; guidance: classifier-free guidance
        w. network: in place of the wrapped one (sample with the EMA weights: pass the EMA copy). The state stays
        in float64 between steps; the noise is drawn on the generator's device (CPU by default), so a seed gives
        the same samples on every device; `batch` samples per network call."""
        _validate.positive_int("n", n)
        _validate.positive_int("batch", batch)
        _validate.choice("sampler", sampler, SAMPLERS)
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (n,)):
            raise ValueError(f"labels must be a tensor of shape ({n},) or None")
        sample_shape = tuple(sample_shape)
        if device is None:
            parameter = next(iter((network or self.network).parameters()), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
        times = time_grid(steps, grid, schedule=self.schedule, T=self.T, eps_t=self.eps_t, middle_eta=middle_eta)
        chunks = []
        for start in range(0, n, batch):
            size = min(batch, n - start)
            chunk_labels = None if labels is None else labels[start:start + size].to(device)
            chunks.append(self._sample_chunk(size, sample_shape, times, sampler, chunk_labels, guidance, generator,
                                             device, network))
        return torch.cat(chunks)

    def _sample_chunk(self, n, sample_shape, times, sampler, labels, guidance, generator, device, network):
        draw_on = generator.device if generator is not None else "cpu"

        def noise():
            return (self.sigma_data * torch.randn((n, *sample_shape), generator=generator, dtype=torch.float64,
                                                  device=draw_on)).to(device)

        def full(value):
            return torch.full((n,), float(value), dtype=torch.float64, device=device)

        x = noise()
        for t, s in zip(times[:-1], times[1:]):
            if sampler == "pushforward":
                x = self(x, full(s), full(t), labels, guidance=guidance, network=network)
            else:
                x = self(x, full(self.eps_t), full(t), labels, guidance=guidance, network=network)
                if float(s) > self.eps_t:
                    x = interpolate(x, noise(), full(s), schedule=self.schedule)
        return x

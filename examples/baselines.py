"""The baselines IMM is compared with (docs/REPRODUCTION.md), on the same path, network, data and budget:

fm  flow matching (a diffusion model in velocity form): G(x_t, t, t) regresses the fm path's velocity
    (eps - x) / sigma_d; sampled by Euler or Heun steps of dx/dt = v (sample.py).
ct  consistency training (Song et al. 2023, with the choices of improved CT: no EMA teacher, pseudo-Huber
    metric): f_{eps_t,t}(x_t) is pulled towards the stop-gradient f_{eps_t,r}(x_r) on the same (x, eps),
    r one eta-step below t by IMM's own mapping r(s, t) with the same k; sampled by multistep consistency
    sampling, which is sample.py's restart sampler. IMM with --group-size 1 is the paper's other consistency
    special case.

Each loss has train.imm_loss's signature, so the training loop runs all three alike.
"""

from __future__ import annotations

import math

import torch

import imm_kernels
from common import SIGMA_DATA, autocast, drop_labels, imm_generator, velocity
from imm_kernels import imm

# Improved CT's pseudo-Huber constant c = 0.00054 sqrt(D), chosen there for images in [-1, 1]; used as is for
# every data set here (ours are scaled to a similar range).
PSEUDO_HUBER_PER_SQRT_D = 0.00054


def _times(batch: int, generator: torch.Generator, config: dict) -> torch.Tensor:
    """t ~ U(eps_t, T) per row, float64: the same time distribution IMM draws per group."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return config["eps_t"] + (config["T"] - config["eps_t"]) * u


def fm_loss(model, online, x, labels, generator: torch.Generator, config: dict, device) -> torch.Tensor:
    """Mean squared velocity error over sigma_d^2 (so an untrained network starts near 2, like G's target)."""
    labels = drop_labels(model, labels, 1, generator, config, device)
    t = _times(x.shape[0], generator, config)
    eps = SIGMA_DATA * torch.randn(x.shape, generator=generator)
    x, eps, t = x.to(device), eps.to(device), t.to(device)
    x_t = imm_kernels.interpolate(x, eps, t, schedule=config["schedule"])
    with autocast(config, device):
        v = velocity(online, x_t, t, labels, config=config)
    return ((v.float() - (eps - x)) ** 2).mean() / SIGMA_DATA**2


def ct_loss(model, online, x, labels, generator: torch.Generator, config: dict, device) -> torch.Tensor:
    """Mean pseudo-Huber distance sqrt(|y_t - y_r|^2 + c^2) - c between the two consistency outputs.
    Unit weight: improved CT weights by 1 / (sigma_t - sigma_r) in its variance-exploding sigma, which is our
    eta; IMM's mapping keeps eta_t - eta_r constant (except where r is clamped at eps_t), so that weight is a
    constant too."""
    labels = drop_labels(model, labels, 1, generator, config, device)
    t = _times(x.shape[0], generator, config)
    s = torch.full_like(t, config["eps_t"])
    delta = 1e-4 if config["precision"] == "fp16" else None  # keeps r < t where fp16 cannot tell them apart
    r = imm.r_from_st(s, t, k=config["k"], schedule=config["schedule"], T=config["T"], eps_t=config["eps_t"],
                      delta=delta)
    eps = SIGMA_DATA * torch.randn(x.shape, generator=generator)
    x, eps, s, r, t = (v.to(device) for v in (x, eps, s, r, t))
    x_t, x_r = imm_kernels.interpolate_pair(x, eps, t, r, schedule=config["schedule"])
    with autocast(config, device):
        y_t = imm_generator(online, config)(x_t, s, t, labels)
        with torch.no_grad():
            y_r = imm_generator(model, config)(x_r, s, r, labels)
    squared = ((y_t.float() - y_r.float()) ** 2).flatten(1).sum(1)
    c = PSEUDO_HUBER_PER_SQRT_D * math.sqrt(y_t[0].numel())
    return (torch.sqrt(squared + c * c) - c).mean()

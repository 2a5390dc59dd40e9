"""Noise schedules of the interpolant x_t = alpha_t x + sigma_t eps (docs/math.md section 1).

Every function takes a float or a tensor of times and returns a tensor (float64 for Python floats).
"""

from __future__ import annotations

import math

import torch

from . import _validate

SCHEDULES = ("fm", "cosine")
#: The largest training / sampling time of each schedule.
DEFAULT_T = {"fm": 0.994, "cosine": 0.996}


def _time(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)


def alpha(t, schedule: str = "fm") -> torch.Tensor:
    """alpha_t: 1 - t (fm), cos(pi t / 2) (cosine)."""
    _validate.choice("schedule", schedule, SCHEDULES)
    t = _time(t)
    return 1 - t if schedule == "fm" else torch.cos(t * (math.pi / 2))


def sigma(t, schedule: str = "fm") -> torch.Tensor:
    """sigma_t: t (fm), sin(pi t / 2) (cosine)."""
    _validate.choice("schedule", schedule, SCHEDULES)
    t = _time(t)
    return t.clone() if schedule == "fm" else torch.sin(t * (math.pi / 2))


def logsnr(t, schedule: str = "fm") -> torch.Tensor:
    """lambda_t = 2 log(alpha_t / sigma_t)."""
    return 2 * (torch.log(alpha(t, schedule)) - torch.log(sigma(t, schedule)))


def eta(t, schedule: str = "fm") -> torch.Tensor:
    """eta_t = sigma_t / alpha_t."""
    _validate.choice("schedule", schedule, SCHEDULES)
    t = _time(t)
    return t / (1 - t) if schedule == "fm" else torch.tan(t * (math.pi / 2))


def eta_inv(e, schedule: str = "fm") -> torch.Tensor:
    """The time whose eta is e: eta / (1 + eta) (fm), (2 / pi) atan(eta) (cosine)."""
    _validate.choice("schedule", schedule, SCHEDULES)
    e = _time(e)
    return e / (1 + e) if schedule == "fm" else torch.atan(e) * (2 / math.pi)

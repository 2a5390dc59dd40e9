"""What every example script shares: the error users see, the CLI wrapper that prints it, the IMM one-step
map f_{s,t} and the flow-matching velocity built from a network (used by training and by the samplers alike),
and the training precision and label dropout of every training objective."""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

import imm_kernels
from imm_kernels import imm

SIGMA_DATA = 0.5  # docs/math.md section 1: prior noise eps ~ N(0, sigma_d^2), data scaled to match


class ExampleError(Exception):
    """A problem the user can fix (bad argument, unreadable file, corrupt checkpoint): printed, exit code 2."""


def cli(main):
    """Runs main() and turns an ExampleError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except ExampleError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def c_noise(t: torch.Tensor) -> torch.Tensor:
    """The network's time input, 1000 t (docs/math.md section 3)."""
    return 1000 * t


def network_output(model, x_t, s, t, labels, *, config: dict, guidance: float = 1.0) -> torch.Tensor:
    """G_theta(c_in(t) x_t, c_noise(s or t - s), c_noise(t)) as float32 of x_t's shape.

    s, t: (B,) times. labels: (B,) class indices (the null class for "unconditional") or None.
    guidance: classifier-free guidance G_u + w (G_c - G_u); w = 1 is the plain conditional output.
    """
    schedule = config["schedule"]
    scale = imm.c_in(t.double(), schedule=schedule, sigma_data=SIGMA_DATA).to(torch.float32)
    x_in = x_t.to(torch.float32) * scale.view(-1, *([1] * (x_t.dim() - 1)))
    second = s if config["time_embedding"] == "s" else t - s
    noise_t, noise_second = c_noise(t.to(torch.float32)), c_noise(second.to(torch.float32))
    if labels is None or guidance == 1.0:
        return model(x_in, noise_t, noise_second, labels).float()
    # Conditional and unconditional halves in one batch.
    null = torch.full_like(labels, model.null_label)
    g_cond, g_uncond = model(torch.cat([x_in, x_in]), torch.cat([noise_t, noise_t]),
                             torch.cat([noise_second, noise_second]), torch.cat([labels, null])).float().chunk(2)
    return g_uncond + guidance * (g_cond - g_uncond)


def one_step(model, x_t, s, t, labels, *, config: dict, guidance: float = 1.0) -> torch.Tensor:
    """f_{s,t}(x_t) in x_t's dtype (float64 for the samplers' state, float32 in training)."""
    g = network_output(model, x_t, s, t, labels, config=config, guidance=guidance).to(x_t.dtype)
    return imm_kernels.imm_output(x_t, g, s, t, schedule=config["schedule"], param=config["param"],
                                  sigma_data=SIGMA_DATA)


def velocity(model, x_t, t, labels, *, config: dict, guidance: float = 1.0) -> torch.Tensor:
    """The flow-matching baseline's v(x_t, t) = sigma_d G(x_t, t, t), in x_t's dtype: the same network with
    s = t (it has no second time), trained to regress the fm path's velocity eps - x."""
    g = network_output(model, x_t, t, t, labels, config=config, guidance=guidance)
    return (SIGMA_DATA * g).to(x_t.dtype)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(config: dict, device: torch.device):
    """The network's precision in training (--precision): autocast for bf16 / fp16, nothing for fp32."""
    if config["precision"] not in AMP_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[config["precision"]])


def drop_labels(model, labels, group_size: int, generator: torch.Generator, config: dict, device):
    """Label dropout per group of group_size rows (the null class trains the unconditional output); None stays
    None (unlabelled data)."""
    if labels is None:
        return None
    dropped = torch.rand(labels.shape[0] // group_size, generator=generator) < config["label_dropout"]
    return torch.where(dropped.repeat_interleave(group_size), model.null_label, labels).to(device)


def resolve_device(name: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ExampleError(f"--device {name!r} is not a device name: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExampleError(f"--device {name}: no CUDA device is available")
    return device

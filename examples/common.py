"""What every example script shares: the error users see, the CLI wrapper that prints it, the IMMGenerator of a
run (f_{s,t}, the IMM loss and samplers) and the flow-matching velocity built from a network, and the training
precision and the baselines' label dropout."""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

from imm_kernels import IMMGenerator

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


def imm_generator(model, config: dict) -> IMMGenerator:
    """The IMM map f_{s,t} around `model` with the run's parameterisation (its loss and samplers come with it)."""
    return IMMGenerator(model, schedule=config["schedule"], param=config["param"], sigma_data=SIGMA_DATA,
                        time_embedding=config["time_embedding"], eps_t=config["eps_t"], T=config["T"])


def velocity(model, x_t, t, labels, *, config: dict, guidance: float = 1.0) -> torch.Tensor:
    """The flow-matching baseline's v(x_t, t) = sigma_d G(x_t, t, t), in x_t's dtype: the same network with
    s = t (it has no second time), trained to regress the fm path's velocity eps - x."""
    g = imm_generator(model, config).network_output(x_t, t, t, labels, guidance=guidance)
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

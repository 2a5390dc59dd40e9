"""imm_kernels: fused kernels for training Inductive Moment Matching (IMM) generators.

Public names: IMMGenerator (IMM around any network: f_{s,t}, the training loss, sampling) and time_grid; the ops
mmd_loss, MMDLoss, imm_mmd_loss (the loss head: mmd_loss of two imm_outputs, fused), interpolate, interpolate_pair, ddim, imm_output; available_backends; and the modules schedules,
imm and reference. The ops are also torch.library custom ops (torch.ops.imm_kernels.*), which
is how torch.compile sees them.
"""

from . import imm, reference, schedules
from ._dispatch import available_backends
from .interpolant import ddim, imm_output, interpolate, interpolate_pair
from .mmd import MMDLoss, mmd_loss
from .loss_head import imm_mmd_loss
from .generator import IMMGenerator, time_grid  # noqa: E402  (after the ops it composes)

__version__ = "0.1.0"

__all__ = [
    "IMMGenerator", "time_grid", "mmd_loss", "MMDLoss", "imm_mmd_loss", "interpolate", "interpolate_pair", "ddim", "imm_output",
    "available_backends", "schedules", "imm", "reference", "__version__",
]

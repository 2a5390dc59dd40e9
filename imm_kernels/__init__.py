"""imm_kernels: fused kernels for training Inductive Moment Matching (IMM) generators.

Public names: mmd_loss, MMDLoss, interpolate, interpolate_pair, ddim, imm_output, available_backends, and the
modules schedules, imm and reference. The ops are also torch.library custom ops (torch.ops.imm_kernels.*), which
is how torch.compile sees them.
"""

from . import imm, reference, schedules
from ._dispatch import available_backends
from .interpolant import ddim, imm_output, interpolate, interpolate_pair
from .mmd import MMDLoss, mmd_loss

__version__ = "0.1.0"

__all__ = [
    "mmd_loss", "MMDLoss", "interpolate", "interpolate_pair", "ddim", "imm_output", "available_backends",
    "schedules", "imm", "reference", "__version__",
]

"""imm_kernels: fused kernels for training Inductive Moment Matching (IMM) generators.

Public names: mmd_loss, MMDLoss, MMDLossFunction, interpolate, interpolate_pair, ddim, imm_output,
available_backends, and the modules schedules, imm and reference.
"""

from . import imm, reference, schedules
from ._dispatch import available_backends
from .interpolant import CombineFunction, ddim, imm_output, interpolate, interpolate_pair
from .mmd import MMDLoss, MMDLossFunction, mmd_loss

__version__ = "0.1.0"

__all__ = [
    "mmd_loss", "MMDLoss", "MMDLossFunction", "interpolate", "interpolate_pair", "ddim", "imm_output",
    "CombineFunction", "available_backends", "schedules", "imm", "reference", "__version__",
]

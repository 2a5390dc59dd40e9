"""Training checkpoints: one file, DIR/checkpoint.pt, written atomically (a temporary file, fsync, rename),
so a run killed mid-write leaves the previous checkpoint intact. It holds everything needed to continue
bit for bit (model, EMA, optimizer, grad scaler, step, every rank's RNG state) and to sample (config,
data set shape and scaling)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common import ExampleError

FILE_NAME = "checkpoint.pt"
FORMAT = "imm_kernels-examples/1"
KEYS = ("format", "config", "data_info", "step", "model", "ema", "optimizer", "scaler", "rng_states")


def path_in(directory) -> Path:
    return Path(directory) / FILE_NAME


def save(directory, state: dict) -> None:
    path = path_in(directory)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_path(location) -> Path:
    """The checkpoint file of `location`: a training output folder, or the file itself."""
    location = Path(location)
    return location if location.is_file() else path_in(location)


def load(location) -> dict:
    """The checkpoint at `location` (see load_path); ExampleError if missing or unreadable."""
    path = load_path(location)
    if not path.is_file():
        raise ExampleError(f"no checkpoint at {path}")
    try:
        # weights_only: a checkpoint is tensors and plain containers, so nothing in it can run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file fails in zipfile, pickle or torch itself
        raise ExampleError(f"{path} is not a readable checkpoint (corrupt or truncated?): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in KEYS):
        raise ExampleError(f"{path} is not a checkpoint of examples/train.py (format {FORMAT})")
    # Written before train.py had the option: what the run trained with (the defaults for points moved since).
    for name, value in (("method", "imm"), ("partner", "kernel"), ("r_spacing", "eta"), ("time_frequency", 1.0)):
        state["config"].setdefault(name, value)
    return state


def build_model(state: dict, weights: str = "ema") -> torch.nn.Module:
    """The network of a checkpoint with its `weights` ("ema" for sampling, "model" for the online one)."""
    import models

    info = state["data_info"]
    config = state["config"]
    model = models.build(info["kind"], tuple(info["sample_shape"]), info["num_classes"], config["width"],
                         config["time_frequency"])
    model.load_state_dict(state[weights])
    return model.eval()

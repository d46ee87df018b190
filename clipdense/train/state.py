"""Training state on disk: `model.pt` (a plain state_dict open_clip can load) + `train_state.pt` beside it.

`train_state.pt` holds optimizer, step, epoch, batch position within the epoch, every rank's RNG states and the
task's own state: everything an exact resume needs (open_clip itself resumes only at epoch boundaries). Both files
hold only tensors and plain Python values (numpy's RNG state is stored as a tensor), so both load with
`weights_only=True`: loading a checkpoint never runs pickled code.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(directory: str | Path, model: nn.Module, train_state: dict) -> Path:
    """Write model.pt + train_state.pt into `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), directory / MODEL_FILE)
    torch.save(train_state, directory / STATE_FILE)
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict, dict]:
    """(model state_dict, train_state) from a checkpoint directory."""
    directory = Path(directory)
    model_sd = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # checkpoints written before the RNG state became tensors hold numpy arrays; they are our own files
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    return model_sd, state

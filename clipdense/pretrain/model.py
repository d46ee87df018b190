"""The model a pretraining run trains, built once at the stage's entry with what the rest of the run reads from it:
its preprocessing (size, mean, std), its parameter counts and its loss kind.

It is built under the seed the training workers built it with before (`train.seed`: torch's generator, which alone
draws a model's initial weights), so every rank starts from the weights it started from then; it travels to the
workers inside the task (pretrain/task.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip import CoCa
from torch import nn

from clipdense.config import ConfigError
from clipdense.models import create_clip
from clipdense.models.export import parameter_counts
from clipdense.models.open_clip_adapter import preprocess_cfg
from clipdense.pretrain.config import LossConfig, ModelConfig


@dataclass(frozen=True)
class Preprocess:
    """open_clip's image preprocessing of a model: square side and the normalisation."""
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class PretrainModel:
    """The model a run trains and what the run reads from it, resolved once."""
    name: str               # open_clip config name (tokenizer, export)
    module: nn.Module       # the open_clip model (output_dict=True), on CPU
    preprocess: Preprocess
    loss_kind: str          # clip | siglip | coca (`loss.kind` with auto resolved)
    params: dict[str, int]  # parameter counts, for the run's summary


def loss_kind(model: nn.Module, requested: str = "auto") -> str:
    """`loss.kind`, auto resolved from the model: coca for a CoCa, siglip when it has a logit_bias, else clip."""
    if requested != "auto":
        return requested
    if isinstance(model, CoCa):
        return "coca"
    return "siglip" if getattr(model, "logit_bias", None) is not None else "clip"


def build_model(cfg: ModelConfig, loss: LossConfig, seed: int) -> PretrainModel:
    """The model of `model:` with `loss:`'s kind; a bad name, checkpoint or loss choice is a one-line ConfigError."""
    try:
        with torch.random.fork_rng(devices=[]):  # this process's own stream stays as it was
            torch.manual_seed(seed)
            module = create_clip(cfg.name, cfg.pretrained, output_dict=True)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"model.pretrained {cfg.pretrained!r}: {str(e).splitlines()[0][:200]}") from None
    kind = loss_kind(module, loss.kind)
    if loss.distill.enabled and kind != "clip":
        raise ConfigError(f"loss.distill is DataCompDR's CLIP loss; {cfg.name} trains with {kind}")
    pp = preprocess_cfg(module)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    return PretrainModel(cfg.name, module, Preprocess(int(size), tuple(pp["mean"]), tuple(pp["std"])), kind,
                         parameter_counts(module))

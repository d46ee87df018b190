"""The fit probe's settings (the sweep's `fit:` section)."""
from __future__ import annotations

from pydantic import Field, field_validator

from clipdense.config import Config

POSITION_ONLY = "position-only"   # backbone.name of the baseline whose features are patch positions, no image content


def default_alphas() -> list[float]:
    """Ridge penalties 1e-6 .. 1e2 in half decades (per training row, on standardised features)."""
    return [10.0 ** (k / 2) for k in range(-12, 5)]


class FitProbeConfig(Config):
    layers: int = Field(1, ge=1, description="a patch's feature: its tokens after the last N blocks, concatenated "
                        "(a timm tower: its last N feature maps, resized to the first one's grid)")
    resolution: list[int] | None = Field(None, description="(h, w) every image is resized to before the trunk; "
                                         "default: the finetune config's data.crop_size")
    alphas: list[float] = Field(default_factory=default_alphas, min_length=1, description="ridge penalties "
                                "searched inside each training subset (per training row, standardised features)")
    folds: int = Field(5, ge=2, description="k-fold over training images (k = min(folds, images)); one image: GCV")
    position_patch: int = Field(8, ge=1, description="position-only: the side of a grid cell, px")
    batch_size: int = Field(16, ge=1, description="images per forward pass of the trunk")
    in_process: bool | None = Field(None, description="true: every (backbone, task) job in the sweep's process, "
                                    "one after another; false: one Ray task each; null: in process when there is "
                                    "one job, else Ray tasks")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError("resolution must be [h, w] with positive sides")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if any(a <= 0 for a in v):
            raise ValueError("alphas must be positive")
        return sorted(v)

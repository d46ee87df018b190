"""Config of `clipdense synth`: a preset (tiny | demo) plus optional per-dataset count overrides."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from clipdense.config import Config

# Every count a preset fixes; a `None` field in SynthConfig means "the preset's value".
PRESETS: dict[str, dict] = {
    "tiny": dict(web_images=128, shard_size=64, curated_fraction=0.125, ade_train=32, ade_val=16,
                 nyu_train=32, nyu_test=16, coco_train=32, coco_val=16, web_size=96, dense_size=128,
                 nyu_test_frames_per_room=16),
    "demo": dict(web_images=24000, shard_size=1000, curated_fraction=0.05, ade_train=2000, ade_val=500,
                 nyu_train=2000, nyu_test=500, coco_train=1000, coco_val=250, web_size=96, dense_size=128,
                 nyu_test_frames_per_room=16),
}


class SynthConfig(Config):
    out: str = Field(description="output directory")
    preset: Literal["tiny", "demo"] = "tiny"
    seed: int = Field(0, ge=0)
    # processes; None = all cores (1 for runs under 2000 images, where starting processes costs more); 1 = no pool
    workers: int | None = Field(None, ge=1)
    web_images: int | None = Field(None, ge=0)
    shard_size: int | None = Field(None, ge=1)
    curated_fraction: float | None = Field(None, ge=0.0, le=1.0, description="curated scenes per web image")
    ade_train: int | None = Field(None, ge=0)
    ade_val: int | None = Field(None, ge=0)
    nyu_train: int | None = Field(None, ge=0)
    nyu_test: int | None = Field(None, ge=0)
    # fewer frames per room spread a small depth test set over more rooms (NYUv2's own test set: ~3 per scene);
    # the training split keeps 16 per room (writers.NYU_FRAMES_PER_SCENE), like NYU's video sequences
    nyu_test_frames_per_room: int | None = Field(None, ge=1)
    coco_train: int | None = Field(None, ge=0)
    coco_val: int | None = Field(None, ge=0)
    web_size: int | None = Field(None, ge=16, le=1024, description="web/curated image side, px")
    dense_size: int | None = Field(None, ge=16, le=1024, description="ade/nyu/coco image side, px")
    max_objects: int = Field(4, ge=1, le=6)
    jpeg_quality: int = Field(90, ge=1, le=100)

    def resolved(self) -> dict:
        """The effective counts and sizes: the preset's values with this config's overrides applied."""
        values = dict(PRESETS[self.preset])
        for key in values:
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        values["curated_images"] = round(values["web_images"] * values["curated_fraction"])
        return values

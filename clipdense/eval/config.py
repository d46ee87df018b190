"""Eval stage config: `clipdense eval [--config FILE] [key=value ...]` (zero-shot classification, retrieval).

`ZeroShotConfig` is also the pretrain config's `eval.zeroshot`: the same evaluation runs during pretraining.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from clipdense.config import Config
from clipdense.data.storage import StorageKeys


class EvalModelConfig(Config):
    name: str = "clip-tiny"   # open_clip name (incl. configs/models/*.json)
    # open_clip tag, local state dict (.pt), or `local-dir:/path` / `hf-hub:org/repo` (open_clip then reads the
    # model config from there and `name` is only a label)
    pretrained: str | None = None


class ZeroShotConfig(Config):
    """An ImageFolder (one folder per class, classes in sorted folder order, as torchvision's ImageFolder)."""

    root: str | None = None
    classnames: str | None = Field(None, description="file, one class name per line in sorted folder order "
                                   "(default: the folder names, '_' read as a space)")
    templates: str | list[str] | None = Field(None, description="format strings with '{}' (a list, or a file with "
                                              "one per line); default: OpenAI's ImageNet templates (open_clip's)")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="DataLoader processes decoding images (0: in this process)")
    max_images: int | None = Field(None, ge=1, description="evaluate the first N images of the sorted listing")
    classes_per_batch: int = Field(10, ge=1, description="classes per text forward when building the classifier")

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("templates must not be empty")
            bad = [t for t in v if "{}" not in t]
            if bad:
                raise ValueError(f"template {bad[0]!r} has no '{{}}' for the class name")
        return v


class RetrievalConfig(StorageKeys):
    """Image-text shards (tar / Parquet, as `data.shards.read_shards` reads them; local or s3://): R@1/5/10 both
    ways."""

    shards: str | list[str] | None = None
    max_rows: int = Field(1000, ge=2, description="the first N usable rows")
    batch_size: int = Field(64, ge=1)


class EvalStageConfig(Config):
    model: EvalModelConfig = EvalModelConfig()
    zeroshot: ZeroShotConfig = ZeroShotConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    out: str = "runs/eval"
    device: Literal["auto", "cpu", "cuda"] = "auto"                  # auto: cuda when available
    precision: Literal["auto", "fp32", "bf16"] = "auto"              # auto: bf16 autocast on cuda, fp32 on cpu

    @model_validator(mode="after")
    def _something_to_do(self):
        if not self.zeroshot.root and not self.retrieval.shards:
            raise ValueError("set zeroshot.root and/or retrieval.shards")
        return self

"""Dense finetuning (ADE20k segmentation, NYUv2 depth, COCO detection) on CLIP / timm backbones.

`clipdense finetune --config configs/finetune/X.yaml [a.b=v ...]` -> `run(FinetuneConfig)`: backbone pyramid +
head trained by the one runner (clipdense.train), evaluated, `metrics.json` written with backbone provenance."""
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.run import run

__all__ = ["FinetuneConfig", "run"]

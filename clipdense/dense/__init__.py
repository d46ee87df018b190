"""Dense finetuning (ADE20k segmentation, NYUv2 depth, COCO detection) on CLIP / timm backbones.

`clipdense finetune --config configs/finetune/X.yaml [a.b=v ...]` -> `run(cfg)`, cfg the task's config that
`load_config(FinetuneConfig, ...)` returns: backbone pyramid + head trained by the one runner (clipdense.train),
evaluated, `metrics.json` written with backbone provenance. Each task is a package under dense/tasks/."""
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.run import run

__all__ = ["FinetuneConfig", "run"]

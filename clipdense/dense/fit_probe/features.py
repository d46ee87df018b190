"""Frozen features of every train and eval image, computed once per (backbone, task) and cached on disk.

Layers and resolution: every image is resized (bilinear, antialiased; aspect not kept) to `fit.resolution`
(default: the finetune config's `data.crop_size`), normalised with the tower's mean and std, and passed once through
the trunk the dense stage builds for the config's `backbone` (`dense.backbones.resolve_backbone`, frozen: the stored
position table, interpolated to the input's grid; a tower without weights is seeded by `backbone.init_seed`, else
0). A patch's feature is its token after each of the last `fit.layers` blocks, concatenated (open_clip ViT:
`vit_block_maps`; timm: `forward_intermediates`' last maps, resized to the first one's grid). No augmentation.
`position-only` has no trunk: a patch's feature is one-hot(row) ++ one-hot(column) on a grid of
`fit.position_patch`-px cells, the same for every image: what position alone predicts.

Cache: `torch.save` of {key, train_ids, eval_ids, train [N, h, w, d], eval [M, h, w, d], info}; reused when the key
(backbone config, checkpoint file size and mtime, resolution, layers, data root, image ids) matches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipdense.dense.backbones import resolve_backbone
from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.fit_probe.config import POSITION_ONLY, FitProbeConfig
from clipdense.dense.heads import Normalize
from clipdense.dense.tasks import task_of
from clipdense.models import open_clip_adapter as oca
from clipdense.models.towers import create_tower

FEATURES_VERSION = 1   # bump when what a cached feature means changes


@dataclass
class FeatureSet:
    train: torch.Tensor          # [N, h, w, d]
    eval: torch.Tensor           # [M, h, w, d]
    info: dict                   # layers, resolution, grid, dim, backbone provenance
    reused: bool = False         # read from the cache instead of computed


def resolution_of(cfg: FinetuneBase, fit: FitProbeConfig) -> tuple[int, int]:
    size = fit.resolution or getattr(cfg.data, "crop_size", None)
    return int(size[0]), int(size[1])


def _checkpoint_stamp(checkpoint: str | None) -> list | None:
    path = Path(checkpoint) if checkpoint else None
    if path is None or not path.exists():
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def feature_key(cfg: FinetuneBase, fit: FitProbeConfig, train_ids: list[str], eval_ids: list[str]) -> str:
    payload = {"version": FEATURES_VERSION, "backbone": cfg.backbone.model_dump(mode="json"),
               "checkpoint": _checkpoint_stamp(cfg.backbone.checkpoint), "resolution": resolution_of(cfg, fit),
               "layers": fit.layers, "position_patch": fit.position_patch, "root": str(Path(cfg.data.root).resolve()),
               "train": train_ids, "eval": eval_ids}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class TowerEncoder:
    """Images [B, 3, h, w] in [0, 1] at the probe's resolution -> [B, d, h / patch, w / patch] frozen features (on
    the GPU when there is one, returned on the CPU)."""

    def __init__(self, cfg: FinetuneBase, layers: int):
        bb = cfg.backbone.model_copy(update={"frozen": True, "drop_path": 0.0})
        kind = task_of(cfg)
        spec = resolve_backbone(bb, kind.img_size(cfg), kind.neck(cfg))
        with torch.random.fork_rng():
            torch.manual_seed(bb.init_seed if bb.init_seed is not None else 0)
            tower = create_tower(spec.tower())
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = tower.module.eval().requires_grad_(False).to(self.device)
        self.vit = tower.vit
        self.normalize = Normalize(bb.mean or tower.mean, bb.std or tower.std).to(self.device)
        depth = oca.vit_shape(self.module).depth if self.vit else len(self.module.feature_info)
        self.blocks = list(range(max(0, depth - layers), depth))
        self.provenance = {"name": bb.name, "kind": spec.kind, "checkpoint": bb.checkpoint, "frozen": True,
                           "init_seed": bb.init_seed, "params": sum(p.numel() for p in self.module.parameters())}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images.to(self.device))
        if self.vit:
            maps = oca.vit_block_maps(self.module, x, self.blocks)
        else:
            maps = self.module.forward_intermediates(x, indices=self.blocks, intermediates_only=True)
            maps = [m if m.shape[-2:] == maps[0].shape[-2:] else F.interpolate(m, size=maps[0].shape[-2:],
                    mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(maps, 1).float().cpu()


class PositionEncoder:
    """one-hot(row) ++ one-hot(column) of each cell: position, no image content."""

    def __init__(self, resolution: tuple[int, int], cell: int):
        self.grid = (max(1, resolution[0] // cell), max(1, resolution[1] // cell))
        self.blocks: list[int] = []
        self.provenance = {"name": POSITION_ONLY, "kind": "position", "checkpoint": None, "params": 0,
                           "grid": list(self.grid)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        rows = torch.eye(h)[:, None, :].expand(h, w, h)
        cols = torch.eye(w)[None, :, :].expand(h, w, w)
        table = torch.cat([rows, cols], -1).permute(2, 0, 1)
        return table[None].expand(images.shape[0], -1, -1, -1).clone()


def make_encoder(cfg: FinetuneBase, fit: FitProbeConfig):
    if cfg.backbone.name == POSITION_ONLY:
        return PositionEncoder(resolution_of(cfg, fit), fit.position_patch)
    return TowerEncoder(cfg, fit.layers)


def encode_images(encoder, images: list[torch.Tensor], resolution: tuple[int, int], batch: int) -> torch.Tensor:
    """[N, h, w, d] features of uint8 CHW images of any size, each resized to `resolution` first."""
    out = []
    for start in range(0, len(images), batch):
        chunk = [F.interpolate(im[None].float(), size=resolution, mode="bilinear", align_corners=False,
                               antialias=True) for im in images[start:start + batch]]
        out.append(encoder(torch.cat(chunk).clamp(0, 255) / 255.0).permute(0, 2, 3, 1).contiguous())
    return torch.cat(out)


def load_cached(path: Path, key: str) -> FeatureSet | None:
    if not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError):
        return None                      # a torn or foreign file: computed again
    if not isinstance(doc, dict) or doc.get("key") != key:
        return None
    return FeatureSet(doc["train"], doc["eval"], json.loads(doc["info"]), reused=True)


def save_cache(path: Path, key: str, feats: FeatureSet) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "train": feats.train, "eval": feats.eval, "info": json.dumps(feats.info)}, tmp)
    tmp.replace(path)

"""One (backbone, task)'s fitted probe: read the task's images once, get their frozen features (cached), then fit a
ridge probe per training subset and score it on every eval image.

`FitProbe(cfg, fit, cache)` prepares; `run(fraction, seed)` fits on `subset_indices(N, fraction, seed)` (the subset
rule of the dense datasets, so the fit and finetune protocols train on the same images) with the penalty chosen
inside that subset (ridge.py), and returns the task's metrics and a `probe` record (layers, resolution, grid,
regulariser chosen, fit seconds). Equal subsets (every seed at fraction 1) are fitted once. Data: the task's
evaluation reader on both splits (no augmentation, labels at their own size), every eval image
(`data.max_eval_images` is not applied). Seg: ridge on per-patch class shares; depth: ridge on log-depth.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clipdense.dense.base_config import FinetuneBase
from clipdense.dense.dataset_common import subset_indices
from clipdense.dense.fit_probe.config import FitProbeConfig
from clipdense.dense.fit_probe.features import (
    FeatureSet,
    encode_images,
    feature_key,
    load_cached,
    make_encoder,
    resolution_of,
    save_cache,
)
from clipdense.dense.fit_probe.ridge import fit_ridge
from clipdense.dense.fit_probe.targets import as_label, probe_targets

HEAD = "ridge"


@dataclass
class SplitData:
    labels: list[torch.Tensor]
    images: list[torch.Tensor]


def read_split(dataset, label_key: str, keep_images: bool) -> SplitData:
    labels, images = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        labels.append(as_label(item, label_key))
        if keep_images:
            images.append(item["img"])
    return SplitData(labels, images)


class FitProbe:
    def __init__(self, cfg: FinetuneBase, fit: FitProbeConfig, cache: Path):
        self.cfg, self.fit = cfg, fit
        self.task = probe_targets(cfg)
        train_set, eval_set = self.task.sets(cfg)
        self.train_ids, self.eval_ids = self.task.ids(train_set), self.task.ids(eval_set)
        key = feature_key(cfg, fit, self.train_ids, self.eval_ids)
        self.features = load_cached(cache, key)
        fresh = self.features is None
        train = read_split(train_set, self.task.label_key, fresh)
        evaluation = read_split(eval_set, self.task.label_key, fresh)
        if fresh:
            self.features = self._extract(train, evaluation)
            save_cache(cache, key, self.features)
        self.eval_labels = evaluation.labels
        self.masks = self.task.atypical_masks(cfg, eval_set)
        self.y, self.valid = self._targets(train.labels)
        self._done: dict[tuple[int, ...], dict] = {}

    def _extract(self, train: SplitData, evaluation: SplitData) -> FeatureSet:
        t0 = time.perf_counter()
        encoder = make_encoder(self.cfg, self.fit)
        res = resolution_of(self.cfg, self.fit)
        feats = [encode_images(encoder, s.images, res, self.fit.batch_size) for s in (train, evaluation)]
        info = {"layers": encoder.blocks, "resolution": list(res), "grid": list(feats[0].shape[1:3]),
                "dim": int(feats[0].shape[-1]), "backbone": encoder.provenance,
                "extract_seconds": round(time.perf_counter() - t0, 3)}
        return FeatureSet(feats[0], feats[1], info)

    def _targets(self, labels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.features.info["grid"]
        pairs = [self.task.patch_targets(lab, grid, self.cfg) for lab in labels]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @property
    def backbone(self) -> dict:
        return self.features.info["backbone"]

    def run(self, fraction: float, seed: int) -> dict:
        """{"metrics", "probe", "data"} of the fit on one training subset."""
        idx = subset_indices(len(self.train_ids), fraction, seed)
        key = tuple(idx)
        if key not in self._done:
            self._done[key] = self._fit(idx)
        result = self._done[key]
        return {**result, "data": {**result["data"], "fraction": fraction, "seed": seed}}

    def _fit(self, idx: list[int]) -> dict:
        t0 = time.perf_counter()
        feats, d = self.features.train[idx], self.features.train.shape[-1]
        x, y, keep = feats.reshape(-1, d), self.y[idx].reshape(-1, self.y.shape[-1]), self.valid[idx].reshape(-1)
        groups = torch.arange(len(idx)).repeat_interleave(feats.shape[1] * feats.shape[2])
        fit = fit_ridge(x[keep], y[keep], groups[keep], self.fit.alphas, self.fit.folds)
        fit_seconds = time.perf_counter() - t0
        ev = self.features.eval
        maps = fit.predict(ev.reshape(-1, d)).reshape(*ev.shape[:3], -1).permute(0, 3, 1, 2)
        metrics = self.task.score(maps, self.eval_labels, self.cfg, self.masks)
        info = self.features.info
        probe = {"head": HEAD, "target": "class shares" if self.task.name == "seg" else "log-depth",
                 "layers": info["layers"], "resolution": info["resolution"], "grid": info["grid"],
                 "dim": info["dim"], "alpha": fit.alpha, "regulariser": fit.choice,
                 "fit_seconds": round(fit_seconds, 4), "train_rows": int(keep.sum()),
                 "features_reused": self.features.reused,
                 "extract_seconds": info.get("extract_seconds")}
        data = {"root": self.cfg.data.root, "train_samples": len(idx), "eval_samples": len(self.eval_ids)}
        return {"metrics": metrics, "probe": probe, "data": data}

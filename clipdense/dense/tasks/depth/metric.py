"""Depth metrics: BTS `compute_errors` per image in the (scaled) Eigen crop, averaged over images."""
from __future__ import annotations

import math

import numpy as np

NYU_EIGEN_CROP = (45, 471, 41, 601)  # rows 45:471, cols 41:601 on 480x640 (BTS `--eigen_crop`)
NYU_SIZE = (480, 640)


def eigen_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The Eigen crop (rows 45:471, cols 41:601 of 480x640) scaled proportionally to other image sizes, so a dataset
    rendered at another resolution is scored on the same field of view (rounded half up: 240x320 -> 23:236, 21:301)."""
    r0, r1, c0, c1 = NYU_EIGEN_CROP
    if (height, width) == NYU_SIZE:
        return r0, r1, c0, c1
    sh, sw = height / NYU_SIZE[0], width / NYU_SIZE[1]
    return int(r0 * sh + 0.5), int(r1 * sh + 0.5), int(c0 * sw + 0.5), int(c1 * sw + 0.5)  # round half up


DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")


def depth_errors(pred, gt, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = True) -> dict:
    """BTS `compute_errors` for one image: prediction clamped to [min, max] (non-finite -> bounds), valid pixels
    min < gt < max inside the (scaled) Eigen crop. Returns NaNs when no pixel is valid."""
    pred = np.asarray(pred, dtype=np.float64).copy()
    gt = np.asarray(gt, dtype=np.float64)
    pred[np.isinf(pred)] = max_depth
    pred[np.isnan(pred)] = min_depth
    pred = np.clip(pred, min_depth, max_depth)
    valid = (gt > min_depth) & (gt < max_depth)
    if eigen_crop:
        r0, r1, c0, c1 = eigen_crop_box(*gt.shape[-2:])
        crop = np.zeros_like(valid)
        crop[..., r0:r1, c0:c1] = True
        valid &= crop
    if not valid.any():
        return {k: float("nan") for k in DEPTH_KEYS}
    d, g = pred[valid], gt[valid]
    thresh = np.maximum(g / d, d / g)
    return {
        "abs_rel": float(np.mean(np.abs(g - d) / g)),
        "sq_rel": float(np.mean((g - d) ** 2 / g)),
        "rmse": float(np.sqrt(np.mean((g - d) ** 2))),
        "rmse_log": float(np.sqrt(np.mean((np.log(g) - np.log(d)) ** 2))),
        "log10": float(np.mean(np.abs(np.log10(d) - np.log10(g)))),
        "delta1": float(np.mean(thresh < 1.25)),
        "delta2": float(np.mean(thresh < 1.25 ** 2)),
        "delta3": float(np.mean(thresh < 1.25 ** 3)),
    }


class DepthMeter:
    """Averages per-image BTS errors over images (images without valid pixels are counted and skipped)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.skipped = 0

    def update(self, errors: dict) -> None:
        if math.isnan(errors["rmse"]):
            self.skipped += 1
        else:
            self.rows.append(errors)

    def compute(self) -> dict:
        out = {k: float(np.mean([r[k] for r in self.rows])) if self.rows else float("nan") for k in DEPTH_KEYS}
        out.update(images=len(self.rows), images_without_valid_pixels=self.skipped)
        return out

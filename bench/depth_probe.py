"""The demo's depth probe: DINOv2's linear protocol (256 depth bins, lr 3e-3) vs the sigmoid regression it replaced
(one output, sigmoid * max_depth, lr 1e-3), on the three towers of a finished default demo.

    python -m bench.depth_probe --demo runs/demo [--seeds 2]

Each probe is the demo sweep's own depth trial at fraction 1 (same config, frozen trunk, 200 steps), run in this
process. The peer is the regression probe on the same tower, data and seed; ratio = peer RMSE / ours (> 1: the bins
probe is closer to the truth). Two reference rows need no features at all: the per-pixel mean of the training depth
maps, and the global mean, scored on the same evaluation images (the per-pixel mean uses absolute pixel position,
which a probe trained on random crops can use only if the features encode it). Not part of `bench.run` (needs a
finished default demo).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import load_note, row, write_report
from clipdense.config import build_config, set_dotted
from clipdense.demo import preset_scale, sweep_config
from clipdense.dense.config import FinetuneConfig
from clipdense.dense.dataset_common import read_rgb
from clipdense.dense.run import run
from clipdense.dense.tasks.depth.dataset import load_depth, read_list
from clipdense.sweep.grid import expand

REGRESSION = {"head.depth_bins": 0, "train.optim.lr": 1e-3}  # the demo's depth probe before 2026-11-25


def probe_trials(demo: Path, seeds: int) -> list:
    """The demo sweep's depth trials at fraction 1, for `seeds` seeds."""
    p = preset_scale("default").model_copy(update={"fractions": [1.0], "seeds": seeds, "small_seeds": None,
                                                   "runs": 1, "random_init_seeds": 1, "probe": "sgd"})
    ckpts = {(c, 0): str(demo / f"pretrain/{c}/export/model.pt") for c in ("alt-text-clip", "recap-clip")}
    cfg = sweep_config(p, demo / "sweep-bench", demo / "world", ckpts, 0)
    return [t for t in expand(cfg) if t.task == "depth"]


def run_probe(finetune: dict, overrides: dict) -> dict:
    data = json.loads(json.dumps(finetune))
    for k, v in overrides.items():
        set_dotted(data, k, v)
    with tempfile.TemporaryDirectory(prefix="bench-depth-") as tmp:
        set_dotted(data, "out_dir", tmp)
        t0 = time.perf_counter()
        out = run(build_config(FinetuneConfig, data, "bench depth probe"))
        rows = [json.loads(ln) for ln in (Path(out["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    m = {k.removeprefix("eval/"): v for k, v in out["metrics"].items()}
    return {"rmse": m["rmse"], "delta1": m["delta1"], "final_loss": losses[-1], "wall_s": time.perf_counter() - t0}


def feature_free_baselines(nyu: Path, eval_images: int) -> dict[str, float]:
    """RMSE of the per-pixel mean / global mean training depth map on the first `eval_images` test images."""
    def maps(list_file: str, limit: int | None = None):
        items = read_list(nyu, list_file, "")[:limit]
        return np.stack([load_depth(d, read_rgb(r), r) for r, d, _ in items])

    train, test = maps("nyudepthv2_train_files_with_gt.txt"), maps("nyudepthv2_test_files_with_gt.txt", eval_images)
    valid = test > 1e-3

    def rmse(pred):
        return float(np.sqrt(np.mean((np.broadcast_to(pred, test.shape) - test)[valid] ** 2)))

    return {"per-pixel mean": rmse(train.mean(0)), "global mean": rmse(np.float32(train[train > 1e-3].mean()))}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.depth_probe")
    ap.add_argument("--demo", required=True, help="a finished default `clipdense demo --out` directory")
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args(argv)
    demo = Path(a.demo)
    results: dict[str, dict[str, list[dict]]] = {}
    for t in probe_trials(demo, a.seeds):
        for name, ov in (("bins", {}), ("regression", REGRESSION)):
            r = run_probe(t.finetune, ov)
            results.setdefault(t.backbone, {}).setdefault(name, []).append(r)
            print(f"{t.name} {name}: {r}", flush=True)
    rows = []
    for bb, by in results.items():
        ours, peer = ({k: float(np.mean([r[k] for r in by[n]])) for k in ("rmse", "delta1", "final_loss", "wall_s")}
                      for n in ("bins", "regression"))
        note = (f"{a.seeds} seeds, fraction 1; delta1 {ours['delta1']:.3f} vs {peer['delta1']:.3f}; final train "
                f"SigLoss {ours['final_loss']:.3f} vs {peer['final_loss']:.3f}; trial {ours['wall_s']:.0f}s vs "
                f"{peer['wall_s']:.0f}s; {load_note()}")
        rows.append(row("depth-probe", f"{bb} RMSE, 256 bins lr 3e-3", ours["rmse"], peer["rmse"],
                        "sigmoid regression lr 1e-3", "m", higher_is_better=False, notes=note))
    for name, v in feature_free_baselines(demo / "world" / "nyu", preset_scale("default").eval_images).items():
        rows.append(row("depth-probe", f"no features: {name} of the training depths, RMSE", v, None, "", "m",
                        higher_is_better=False, notes="same evaluation images as the probes"))
    print(write_report("depth_probe", "Depth probe protocol", __doc__, rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])

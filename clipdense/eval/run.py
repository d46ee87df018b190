"""`run(cfg)`: the eval stage's entry. It resolves the inputs once (the device, the zero-shot set, the retrieval
shards as `Storage` values) before loading the open_clip model with its eval preprocessing (eval/model.py), runs
zero-shot and/or retrieval and writes eval.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from clipdense.config import ConfigError
from clipdense.eval.config import EvalStageConfig
from clipdense.eval.model import load_model
from clipdense.eval.retrieval import evaluate_shards
from clipdense.eval.zeroshot import evaluate_zeroshot, resolve_zeroshot


def _device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """(the device, the autocast dtype or None): auto is cuda when available, bf16 autocast on cuda."""
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ConfigError("device: cuda requested but no CUDA device is available")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    return dev, torch.bfloat16 if precision == "bf16" or (precision == "auto" and dev.type == "cuda") else None


def _summary(result: dict) -> dict:
    summary = {}
    if "zeroshot" in result:
        z = result["zeroshot"]
        summary["zeroshot"] = {k: z[k] for k in ("top1", "top5", "mean_per_class", "images", "images_per_s")}
        summary["zeroshot"]["errors"] = len(z["errors"])
    if "retrieval" in result:
        summary["retrieval"] = {k: v for k, v in result["retrieval"].items() if k != "errors"}
    return summary


def run(cfg: EvalStageConfig) -> dict:
    device, dtype = _device(cfg.device, cfg.precision)
    zs = cfg.zeroshot
    rc = cfg.retrieval
    zset = resolve_zeroshot(zs) if zs.root else None  # checked before loading the model
    shards = [rc.storage(s) for s in ([rc.shards] if isinstance(rc.shards, str) else rc.shards or [])]
    model, preprocess, tokenizer = load_model(cfg.model.name, cfg.model.pretrained)
    model.to(device)
    result: dict = {"model": cfg.model.model_dump(), "device": device.type,
                    "precision": "bf16" if dtype is not None else "fp32"}
    if zset is not None:
        result["zeroshot"] = evaluate_zeroshot(model, tokenizer, preprocess, zset.index, zset.classnames,
                                               zset.templates, device=device, autocast_dtype=dtype,
                                               batch_size=zs.batch_size, workers=zs.workers,
                                               classes_per_batch=zs.classes_per_batch)
    if shards:
        result["retrieval"] = evaluate_shards(model, tokenizer, preprocess, shards, rc, device=device,
                                              autocast_dtype=dtype)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**result, "config": cfg.model_dump(mode="json")}, indent=2))
    return {"eval_json": str(out / "eval.json"), "model": cfg.model.name, **_summary(result)}

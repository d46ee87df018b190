"""`run(cfg)`: load an open_clip model with its eval preprocessing, run zero-shot and/or retrieval, write eval.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from clipdense.config import ConfigError, DataError
from clipdense.eval.config import EvalStageConfig

SCHEMAS = ("hf-hub:", "local-dir:")


def load_model(name: str, pretrained: str | None):
    """(model in eval mode, eval preprocess, tokenizer), as open_clip's create_model_and_transforms builds them."""
    import open_clip

    from clipdense.models.registry import create_clip_and_transforms, register_model_configs

    try:
        if pretrained and pretrained.startswith(SCHEMAS):  # open_clip takes these as the model name
            register_model_configs()
            model, _, preprocess = open_clip.create_model_and_transforms(pretrained)
            tokenizer = open_clip.get_tokenizer(pretrained)
        else:
            model, _, preprocess = create_clip_and_transforms(name, pretrained)
            tokenizer = open_clip.get_tokenizer(name)
    except ValueError as e:
        raise ConfigError(f"model: {str(e).splitlines()[0][:200]}") from None
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise ConfigError(f"model.pretrained {pretrained!r}: {str(e).splitlines()[0][:200]}") from None
    return model.eval(), preprocess, tokenizer


def retrieval_rows(shards, s3_endpoint: str | None, max_rows: int) -> tuple[list[dict], dict]:
    """The first `max_rows` usable rows of `shards` (read with Ray Data) and the skipped rows counted by error code."""
    from clipdense.data.paths import expand_shards
    from clipdense.data.shards import read_shards
    from clipdense.data.storage import Storage

    rows, skipped = [], {}
    listed = expand_shards([Storage(s, s3_endpoint) for s in ([shards] if isinstance(shards, str) else shards)])
    ds = read_shards(listed).select_columns(["key", "image_bytes", "caption", "error_code"])
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=256):
        for r in batch.to_pylist():
            # retrieval needs the real caption (the reader no longer flags rows without one)
            code = r["error_code"] or (None if (r["caption"] or "").strip() else "no_caption")
            if code is not None:
                skipped[code] = skipped.get(code, 0) + 1
            elif len(rows) < max_rows:
                rows.append(r)
        if len(rows) >= max_rows:
            break
    return rows, skipped


def run(cfg: EvalStageConfig) -> dict:
    from clipdense.eval.retrieval import evaluate_retrieval
    from clipdense.eval.zeroshot import evaluate_zeroshot, index_folder, resolve_prompts

    zs = cfg.zeroshot
    index = prompts = None
    if zs.root:  # check the inputs before loading the model
        index = index_folder(zs.root, zs.max_images)
        prompts = resolve_prompts(index, zs.classnames, zs.templates)
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device: cuda requested but no CUDA device is available")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") \
        else None
    model, preprocess, tokenizer = load_model(cfg.model.name, cfg.model.pretrained)
    model.to(device)
    result: dict = {"model": cfg.model.model_dump(), "device": device.type,
                    "precision": "bf16" if dtype is not None else "fp32"}
    if index is not None:
        result["zeroshot"] = evaluate_zeroshot(model, tokenizer, preprocess, index, *prompts, device=device,
                                               autocast_dtype=dtype, batch_size=zs.batch_size, workers=zs.workers,
                                               classes_per_batch=zs.classes_per_batch)
    if cfg.retrieval.shards:
        rc = cfg.retrieval
        rows, skipped = retrieval_rows(rc.shards, rc.s3_endpoint, rc.max_rows)
        if len(rows) < 2:
            raise DataError(f"retrieval.shards: {rc.shards!r}: {len(rows)} usable rows (skipped: {skipped})")
        result["retrieval"] = {**evaluate_retrieval(model, tokenizer, preprocess, rows, device=device,
                                                    autocast_dtype=dtype, batch_size=rc.batch_size),
                               "skipped": skipped}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**result, "config": cfg.model_dump(mode="json")}, indent=2))
    summary = {"eval_json": str(out / "eval.json"), "model": cfg.model.name}
    if "zeroshot" in result:
        z = result["zeroshot"]
        summary["zeroshot"] = {k: z[k] for k in ("top1", "top5", "mean_per_class", "images", "images_per_s")}
        summary["zeroshot"]["errors"] = len(z["errors"])
    if "retrieval" in result:
        summary["retrieval"] = {k: v for k, v in result["retrieval"].items() if k != "errors"}
    return summary

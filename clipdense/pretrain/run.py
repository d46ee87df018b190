"""`run(cfg)`: resolve the model, build the Ray datasets, train with the one runner, return a small summary."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from clipdense.config import ConfigError
from clipdense.pretrain.config import PretrainConfig
from clipdense.ray_session import data_context, ray_session


def model_preprocess(name: str, pretrained: str | None) -> tuple[dict, dict]:
    """(preprocess {size, mean, std}, parameter counts) of an open_clip model, built once on CPU."""
    import open_clip

    from clipdense.models import create_clip

    try:
        model = create_clip(name, pretrained)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"model.pretrained {pretrained!r}: {str(e).splitlines()[0][:200]}") from None
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    params = {"params": sum(p.numel() for p in model.parameters()),
              "visual_params": sum(p.numel() for p in model.visual.parameters())}
    return {"size": int(size), "mean": tuple(pp["mean"]), "std": tuple(pp["std"])}, params


def run(cfg: PretrainConfig) -> dict:
    from ray.train import DataConfig

    from clipdense.pretrain.data import build_datasets
    from clipdense.pretrain.task import ClipPretrainTask
    from clipdense.train.runner import fit, fit_local

    pp, params = model_preprocess(cfg.model.name, cfg.model.pretrained)
    if cfg.eval.zeroshot.root:  # a bad folder or prompt file is a one-line error before any worker starts
        from clipdense.eval.zeroshot import index_folder, resolve_prompts

        zs = cfg.eval.zeroshot
        resolve_prompts(index_folder(zs.root, zs.max_images, "eval.zeroshot.root"), zs.classnames, zs.templates,
                        "eval.zeroshot")
    quiet = {"enable_progress_bars": cfg.tracking.ray_data_progress}  # Ray Data's bars would drown ours
    with ray_session(cfg.ray), data_context(quiet):
        train_ds, eval_ds, counts = build_datasets(cfg, pp["size"])
        datasets = {"train": train_ds, **({"eval": eval_ds} if eval_ds is not None else {})}
        params_doc = cfg.model_dump(mode="json")
        factory = functools.partial(ClipPretrainTask, params_doc, pp)
        if cfg.ray.in_process:
            result = fit_local(factory, cfg.train, datasets=datasets, tracking=cfg.tracking, params=params_doc)
        else:
            options = DataConfig.default_ingest_options()
            options.preserve_order = True  # deterministic split among workers + order: exact resume
            # elastic: no split by worker count; each worker slices global batches by sample index (task.py)
            split = [] if cfg.train.scaling.elastic else ["train"]
            result = fit(factory, cfg.train, datasets=datasets, tracking=cfg.tracking, params=params_doc,
                         dataset_config=DataConfig(datasets_to_split=split, execution_options=options))
    summary = {"model": cfg.model.name, "policy": cfg.captions.policy, **params, "data": counts, **result}
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "config.yaml").write_text(cfg.to_yaml())
    return summary

"""Pretraining as open_clip_train defines it: the logit-scale clamp (after every optimizer step logit_scale <= ln 100,
for CLIP, SigLIP and CoCa) and zero-shot classification every `train.eval_every` steps, recorded in the metrics."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import open_clip
import pytest
import torch
from eval_files import write_folder
from shard_files import good_samples, write_tar

from clipdense.cli import main as cli_main
from clipdense.config import build_config, configs_dir
from clipdense.eval import EvalStageConfig
from clipdense.eval import run as run_eval
from clipdense.eval.zeroshot import resolve_zeroshot
from clipdense.models.registry import register_model_configs
from clipdense.pretrain import PretrainConfig
from clipdense.pretrain.model import Preprocess, build_model
from clipdense.pretrain.task import ClipPretrainTask
from clipdense.train import fit_local

START = math.log(1000.0)  # above open_clip_train's ceiling ln 100


def _register_hot(base: str, siglip: bool) -> str:
    """A tiny model config whose logit scale starts at ln 1000 (open_clip reads `init_logit_scale` from the JSON)."""
    register_model_configs()
    cfg = json.loads((configs_dir() / "models" / f"{base}.json").read_text())
    cfg["init_logit_scale"] = START
    if siglip:
        cfg["init_logit_bias"] = -10.0  # a logit_bias makes the pretrain task pick open_clip's SigLipLoss
    name = f"{base}-hot{'-bias' if siglip else ''}"  # not 'siglip': open_clip would pick a T5 tokenizer
    open_clip.factory._MODEL_CONFIGS[name] = cfg
    return name


def _model(cfg: PretrainConfig):
    """The run's model, fed 64 px images normalised with mean = std = 0.5."""
    return dataclasses.replace(build_model(cfg.model, cfg.loss, cfg.train.seed),
                               preprocess=Preprocess(64, (0.5,) * 3, (0.5,) * 3))


class InMemoryBatches(ClipPretrainTask):
    """The real pretrain task (model, open_clip loss, clamp) fed in-memory batches through its real collate, so the
    test needs no Ray Data pipeline."""

    def train_batches(self, ctx):
        rng = np.random.default_rng(ctx.epoch)
        collate = self._collate(ctx.epoch, True)
        for i in range(ctx.start_batch, 2):
            n = self.local_batch
            yield collate({"key": np.array([f"{i}-{j}" for j in range(n)], dtype=object),
                           "caption": np.array([f"a photo {j}" for j in range(n)], dtype=object),
                           "syn_captions": np.array([[f"shape {j}"] for j in range(n)] + [None], dtype=object)[:-1],
                           "pixels": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)})

    def loss(self, model, batch, ctx):
        self.seen_scales = getattr(self, "seen_scales", []) + [float(model.logit_scale.detach())]
        return super().loss(model, batch, ctx)


@pytest.mark.parametrize("base,siglip,kind", [("clip-tiny", False, "clip"), ("clip-tiny", True, "siglip"),
                                              ("coca-tiny", False, "coca")])
def test_logit_scale_clamped_after_each_step(tmp_path, base, siglip, kind):
    name = _register_hot(base, siglip)
    cfg = build_config(PretrainConfig, {
        "model": {"name": name}, "ray": {"in_process": True}, "data": {"batch_size": 4},
        "train": {"out_dir": str(tmp_path), "optim": {"lr": 1e-3}, "log_every": 1, "eval_every": 0,
                  "schedule": {"total_steps": 2, "warmup_steps": 0}, "checkpoint": {"every_steps": 0}}})
    tasks = []

    def factory():
        tasks.append(InMemoryBatches(cfg, _model(cfg)))
        return tasks[-1]

    fit_local(factory, cfg.train)
    task = tasks[0]
    assert task.kind == kind
    # step 0 trains at the initial scale; the clamp after step 0 brings step 1 down to exactly ln 100
    assert task.seen_scales[0] == pytest.approx(START, abs=1e-2)
    assert task.seen_scales[1] == pytest.approx(math.log(100), abs=1e-6)
    final = torch.load(tmp_path / "export" / "model.pt", weights_only=True)["logit_scale"]
    assert float(final) <= math.log(100) + 1e-6


def test_pretrain_records_zeroshot_metrics(tmp_path):
    root = write_folder(tmp_path / "folder")
    cfg = build_config(PretrainConfig, {
        "model": {"name": "clip-tiny"}, "ray": {"in_process": True}, "data": {"batch_size": 4},
        "eval": {"zeroshot": {"root": str(root), "templates": ["a photo of a {}."], "batch_size": 8}},
        "train": {"out_dir": str(tmp_path / "run"), "optim": {"lr": 1e-3}, "log_every": 1, "eval_every": 1,
                  "schedule": {"total_steps": 2, "warmup_steps": 0}, "checkpoint": {"every_steps": 0}}})
    zeroshot = resolve_zeroshot(cfg.eval.zeroshot, "eval.zeroshot")
    result = fit_local(lambda: InMemoryBatches(cfg, _model(cfg), zeroshot), cfg.train)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    at_step1 = [r for r in lines if r.get("step") == 1 and "eval/zeroshot_top1" in r]
    assert at_step1 and at_step1[0]["eval/zeroshot_images"] == 13  # every eval_every steps, not only at the end
    m = result["metrics"]
    assert 0.0 <= m["eval/zeroshot_top1"] <= m["eval/zeroshot_top5"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "run" / "zeroshot.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["templates"] == ["a photo of a {}."]
    # the same evaluation as `clipdense eval` on the exported weights
    ev = build_config(EvalStageConfig, {"model": {"name": "clip-tiny",
                                                  "pretrained": str(tmp_path / "run" / "export" / "model.pt")},
                                        "zeroshot": {"root": str(root), "templates": ["a photo of a {}."]},
                                        "out": str(tmp_path / "eval")})
    run_eval(ev)
    z = json.loads((tmp_path / "eval" / "eval.json").read_text())["zeroshot"]
    assert z["top1"] == pytest.approx(m["eval/zeroshot_top1"]) and z["per_class"] == records[-1]["per_class"]


def test_pretrain_bad_zeroshot_root_is_one_line_error(tmp_path, capsys):
    (tmp_path / "web").mkdir()  # shards that exist: the zero-shot root is what is wrong
    write_tar(tmp_path / "web" / "00000.tar", good_samples("00000", 4))
    rc = cli_main(["pretrain", "--config", "configs/pretrain/clip-tiny-shapes.yaml", f"train.out_dir={tmp_path}",
                   f"data.shards={tmp_path}/web", "data.recaptions=null", "captions.policy=real",
                   f"eval.zeroshot.root={tmp_path}/missing", "ray.in_process=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "eval.zeroshot.root: not a directory" in err and len(err.strip().splitlines()) == 1

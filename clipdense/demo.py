"""`clipdense demo [--quick] [--out DIR]`: the paper's claim end to end on the synthetic world, on local Ray.

1. generate the world            (synth)
2. train a CoCa captioner         (pretrain, CoCa loss, on the curated subset's accurate descriptions)
3. recaption the web corpus       (recaption, the captioner in a Ray Data actor pool)
4. pretrain two CLIPs, same budget (pretrain: alt texts vs recaptions)
5. sweep seg + depth probes       (sweep: fractions x alt-text / recap / random-init x seeds)
6. report                         (plots, tables, efficiency factor, a one-screen summary)

The world's ground-truth descriptions train only the captioner (curated subset) and score caption quality; they are
never pretraining text. Each step writes a `.done` marker, so a rerun continues where the last one stopped.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError, create_model, model_validator

from clipdense.config import (
    Config,
    ConfigError,
    OnRayConfig,
    RayConfig,
    build_config,
    configs_dir,
    deep_merge,
    read_yaml,
)
from clipdense.ray_session import ray_session
from clipdense.sweep.config import SmallFractionSeeds
from clipdense.synth.config import SynthConfig

# Scale of each step: a preset in configs/demo/ (`quick` proves the plumbing in minutes; `default` is the most the
# 30-minute budget on 2 cores holds), with the config's `scale` keys merged over it. Dense evaluation is the probe
# protocol (frozen trunk, linear head): with CPU-budget CLIPs, full finetuning rebuilds the features from the dense
# labels and hides what pretraining put in them (measured: README, Status).
PROBE = {"backbone.frozen": True, "head.kind": "linear", "train.optim.layer_decay": None}
# The depth probe is DINOv2's linear one: 256 depth bins, not a sigmoid regression. The regression probe was far from
# converged after 200 steps (delta1 0.22-0.34 for every tower), so it measured how fast one output unit finds the
# scene's scale; bins lower every tower's RMSE 1.19-1.37x at the same steps, and lr 3e-3 lowers every tower's final
# loss vs 1e-3 (bench/results/depth_probe.md).
DEPTH_PROBE = {"head.depth_bins": 256, "train.optim.lr": 3e-3}
PRESETS = ("quick", "default")

# The world: every `clipdense synth` key but the two the demo sets, with SynthConfig's own types and checks.
DemoWorld = create_model("DemoWorld", __base__=Config, **{k: (f.annotation, f) for k, f in
                                                          SynthConfig.model_fields.items() if k not in ("out", "seed")})


class DemoRecaption(Config):
    num_captions: int = Field(ge=1, description="synthetic captions per web image")
    seq_len: int = Field(ge=3, description="tokens per caption, start and end included")
    batch_size: int = Field(ge=1, description="images per captioner call")


class DemoScale(Config):
    """Sizes of every step. All keys are required here; a preset file gives them (configs/demo/*.yaml)."""
    synth: DemoWorld
    clip_model: str = Field(description="open_clip name of the two pretrained CLIPs")
    coca_model: str = Field(description="open_clip name of the captioner")
    captioner_steps: int = Field(ge=1)
    captioner_batch: int = Field(ge=1)
    captioner_lr: float = Field(gt=0)
    recaption: DemoRecaption
    clip_steps: int = Field(ge=1)
    clip_batch: int = Field(ge=1)
    finetune_steps: int = Field(ge=1, description="steps of each probe trial")
    fractions: list[float] = Field(min_length=1, description="fractions of the dense training sets swept")
    seeds: int = Field(ge=1, description="seeds per fraction")
    small_seeds: SmallFractionSeeds | None = Field(description="more seeds below a fraction; null = none")
    eval_images: int = Field(ge=1, description="evaluation images per probe trial")


def preset_path(name: str) -> Path:
    return configs_dir() / "demo" / f"{name}.yaml"


class DemoConfig(Config):
    out: str = "runs/demo"
    quick: bool = Field(False, description="start from the quick preset (configs/demo/quick.yaml), else default.yaml")
    seed: int = 0
    # num_cpus: logical CPUs of the local Ray (more than cores: Ray Data tasks run beside the training workers)
    ray: OnRayConfig = RayConfig(num_cpus=4)
    fresh: bool = Field(False, description="ignore finished steps of an earlier run in `out`")
    replicates: int = Field(1, ge=1, description="pretraining runs per condition (seeds seed .. seed+N-1): the "
                            "report's factor then resamples pretraining runs too (two-level bootstrap). N > 1 "
                            "does not fit the default preset's 30 minutes on 2 cores (each run ~230 s)")
    scale: DemoScale = Field(description="the preset's scale with the keys given here merged over it")

    @model_validator(mode="before")
    @classmethod
    def _merge_over_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        try:
            quick = TypeAdapter(bool).validate_python(data.get("quick", False))
        except ValidationError:
            quick = False       # the field's own check reports the bad value
        given = data.get("scale") or {}
        if not isinstance(given, dict):
            return data
        preset = read_yaml(preset_path("quick" if quick else "default")).get("scale") or {}
        return {**data, "scale": deep_merge(preset, given)}


def preset_scale(name: str) -> DemoScale:
    """A shipped preset's scale, e.g. to run one step of the demo at its size (bench/depth_probe.py)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown demo preset {name!r} (choose from {', '.join(PRESETS)})")
    return DemoConfig(quick=name == "quick").scale


def _step(out: Path, n: int, title: str, fresh: bool):
    """Context: prints the step header, skips it when its marker exists, writes the marker at the end."""
    marker = out / f".done-{n}"

    class _S:
        done = marker.exists() and not fresh

        def __enter__(self):
            print(f"\n[demo {n}/6] {title}" + (" (done earlier, skipped)" if self.done else ""), flush=True)
            self.t0 = time.time()
            return self

        def __exit__(self, exc_type, *_):
            if exc_type is None and not self.done:
                marker.write_text(f"{time.time() - self.t0:.1f}\n")
                print(f"[demo {n}/6] done in {time.time() - self.t0:.0f}s", flush=True)

    return _S()


def _train_section(out_dir: Path, steps: int, lr: float, seed: int, threads: int) -> dict:
    return {"out_dir": str(out_dir), "seed": seed, "log_every": max(1, steps // 10), "eval_every": 0,
            "optim": {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.98], "grad_clip": 1.0},
            "schedule": {"kind": "cosine", "warmup_steps": max(1, steps // 20), "total_steps": steps},
            "scaling": {"num_workers": 1, "cpus_per_worker": float(threads)},
            "checkpoint": {"every_steps": max(steps // 2, 1), "keep": 1}}


def _pretrain_cfg(model: str, shards: str, recaptions: str | None, policy: str, out_dir: Path, steps: int,
                  batch: int, seed: int, threads: int, loss: str = "auto", lr: float = 1e-3):
    from clipdense.pretrain import PretrainConfig

    # cache: the demo's sets fit in memory; decoding once is 5-15% more samples/s over 2-5 epochs (measured)
    data = {"shards": shards, "recaptions": recaptions, "batch_size": batch, "decode_batch_size": batch,
            "decode_cpus": 0.5, "count_errors": False, "cache": True}
    return build_config(PretrainConfig, {
        "model": {"name": model}, "data": data, "captions": {"policy": policy}, "loss": {"kind": loss},
        "eval": {"holdout": 0}, "train": _train_section(out_dir, steps, lr, seed, threads)}, "demo pretrain")


def caption_accuracy(text: str, scene: dict) -> float:
    """Fraction of the scene's objects whose colour + shape the text names (scores captions; never trains)."""
    objs = scene.get("objects", [])
    if not objs or not text:
        return 0.0
    low = text.lower()
    return sum(f"{o['colour']} {o['shape']}" in low for o in objs) / len(objs)


def word_recall(text: str, scene: dict) -> dict[str, float]:
    """Fractions of the scene's objects whose colour word / shape word the text contains, each on its own: tells
    which attribute a captioner has learnt (at CPU budget colours come long before shapes)."""
    from clipdense.synth.captions import mentioned_classes, mentioned_colours

    objs = scene.get("objects", [])
    if not objs or not text:
        return {"colour": 0.0, "shape": 0.0}
    colours, shapes = set(mentioned_colours(text)), set(mentioned_classes(text))
    return {"colour": sum(o["colour"] in colours for o in objs) / len(objs),
            "shape": sum(o["shape"] in shapes for o in objs) / len(objs)}


def score_captions(web_dir: Path, recap_dir: Path, limit: int = 2000) -> dict:
    """Caption accuracy and colour / shape word recall of the alt texts vs the synthetic captions, against the
    world's scene metadata (means over images; a synthetic score averages the image's captions)."""
    import pyarrow.parquet as pq

    from clipdense.data.shards import read_shard_local
    from clipdense.data.storage import Storage

    scenes, alts = {}, {}
    for tar in sorted(web_dir.glob("*.tar")):
        for r in read_shard_local(Storage(str(tar)), validate="none"):
            if r["meta"] and len(scenes) < limit:
                scenes[r["key"]] = json.loads(r["meta"]).get("scene", {})
                alts[r["key"]] = r["caption"] or ""
    def scores(text: str, scene: dict) -> np.ndarray:
        recall = word_recall(text, scene)
        return np.array([caption_accuracy(text, scene), recall["colour"], recall["shape"]])

    alt, syn = [], []
    for f in sorted(recap_dir.glob("*.parquet")):
        for r in pq.read_table(f, columns=["key", "syn_captions"]).to_pylist():
            if r["key"] in scenes and r["syn_captions"]:
                scene = scenes[r["key"]]
                alt.append(scores(alts[r["key"]], scene))
                syn.append(np.mean([scores(c, scene) for c in r["syn_captions"]], axis=0))
    a, s = (np.mean(x, axis=0) if x else np.zeros(3) for x in (alt, syn))
    return {"images_scored": len(alt), "alt_text_accuracy": float(a[0]), "synthetic_accuracy": float(s[0]),
            "alt_text_colour_recall": float(a[1]), "synthetic_colour_recall": float(s[1]),
            "alt_text_shape_recall": float(a[2]), "synthetic_shape_recall": float(s[2])}


# task -> (finetune config, world subdirectory, the task's own probe overrides)
PROBE_TASKS = {"seg": ("configs/finetune/shapes-seg-tiny.yaml", "ade", {}),
               "depth": ("configs/finetune/shapes-depth-tiny.yaml", "nyu", DEPTH_PROBE)}


def probe_task(p: dict, world: Path, task: str) -> dict:
    """The sweep's task entry for one probe (also what bench/depth_probe.py runs): config file + overrides."""
    config, subdir, own = PROBE_TASKS[task]
    steps = p["finetune_steps"]
    return {"name": task, "config": config, "overrides": {
        "train.schedule.total_steps": steps, "train.schedule.warmup_steps": max(1, steps // 10),
        "train.log_every": max(1, steps // 5), "data.max_eval_images": p["eval_images"], "ray.in_process": True,
        **PROBE, **own, "data.root": str(world / subdir)}}


def run_name(condition: str, replicate: int) -> str:
    """Pretraining run (and sweep backbone) name: the condition's for replicate 0, as before replicates existed."""
    return condition if replicate == 0 else f"{condition}-r{replicate}"


def _sweep_cfg(p: dict, out: Path, world: Path, alt_ckpt: str, recap_ckpt: str, seed: int,
               replicate_ckpts: dict[tuple[str, int], str] | None = None):
    """`replicate_ckpts`: (condition, replicate >= 1) -> checkpoint of the further pretraining runs."""
    from clipdense.sweep import SweepConfig

    ckpts = {("alt-text-clip", 0): alt_ckpt, ("recap-clip", 0): recap_ckpt, **(replicate_ckpts or {})}
    runs = [{"name": run_name(cond, r), "condition": cond, "backbone": {"name": p["clip_model"], "checkpoint": ckpt}}
            for (cond, r), ckpt in sorted(ckpts.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return build_config(SweepConfig, {
        "name": "demo", "out": str(out),
        # random-init: the same tower untrained, the floor a pretraining must beat to have put anything useful in
        "backbones": [*runs, {"name": "random-init", "backbone": {"name": p["clip_model"], "checkpoint": None}}],
        "tasks": [probe_task(p, world, "seg"), probe_task(p, world, "depth")],
        "fractions": p["fractions"], "seeds": p["seeds"], "small_fraction_seeds": p["small_seeds"],
        "search_seed": seed, "max_failures": 1, "report": {"reference": "alt-text-clip"},
        "resources": {"cpu": 1.0, "max_concurrent_trials": 2},
    }, "demo sweep")


def run(cfg: DemoConfig) -> dict:
    with ray_session(cfg.ray):
        return _run(cfg)


def _run(cfg: DemoConfig) -> dict:
    import ray

    from clipdense import pretrain, recaption, sweep, synth

    p = cfg.scale.model_dump(exclude_unset=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world, t_start = out / "world", time.time()
    summary: dict = {"out": str(out), "preset": "quick" if cfg.quick else "default"}
    # the one training worker gets every core but one Ray CPU for the decode tasks feeding it (torch threads)
    threads = max(1, min(os.cpu_count() or 1, int(ray.cluster_resources().get("CPU", 1)) - 1))

    with _step(out, 1, "generate the synthetic world", cfg.fresh) as s:
        if not s.done:
            synth.run(synth.SynthConfig(out=str(world), seed=cfg.seed, **p["synth"]))

    captioner = out / "captioner"
    with _step(out, 2, f"train the {p['coca_model']} captioner on the curated subset (CoCa loss)", cfg.fresh) as s:
        if not s.done:
            pretrain.run(_pretrain_cfg(p["coca_model"], str(world / "curated"), None, "real", captioner,
                                       p["captioner_steps"], p["captioner_batch"], cfg.seed, threads, loss="coca",
                                       lr=p["captioner_lr"]))

    recap = out / "recaptioned"
    with _step(out, 3, "recaption the web corpus through the captioner actor pool", cfg.fresh) as s:
        if not s.done:
            rc = p["recaption"]
            recaption.run(build_config(recaption.RecaptionConfig, {
                "input": str(world / "web"), "output": str(recap),
                "engine": {"kind": "coca", "model": p["coca_model"], "checkpoint": str(captioner / "export" / "model.pt"),
                           "num_captions": rc["num_captions"], "seq_len": rc["seq_len"], "top_p": 0.9,
                           "seed": cfg.seed, "device": "cpu", "batch_size": rc["batch_size"],
                           "concurrency": 2, "num_cpus": 1.0},
            }, "demo recaption"))
        q = summary["caption_quality"] = score_captions(world / "web", recap)
        print(f"  caption accuracy (objects named with the right colour and shape): alt text "
              f"{q['alt_text_accuracy']:.2f}, synthetic {q['synthetic_accuracy']:.2f}; objects whose colour word "
              f"appears: {q['alt_text_colour_recall']:.2f} vs {q['synthetic_colour_recall']:.2f}, whose shape word "
              f"appears: {q['alt_text_shape_recall']:.2f} vs {q['synthetic_shape_recall']:.2f}")

    ckpts = {}
    with _step(out, 4, f"pretrain {p['clip_model']} CLIPs with identical budgets, {cfg.replicates} per condition",
               cfg.fresh) as s:
        for r in range(cfg.replicates):
            for condition, policy in (("alt-text-clip", "real"), ("recap-clip", "synthetic")):
                name = run_name(condition, r)
                run_dir = out / "pretrain" / name
                ckpts[condition, r] = str(run_dir / "export" / "model.pt")
                if not s.done or not Path(ckpts[condition, r]).is_file():   # a run added by a larger --replicates
                    print(f"  {name}: caption policy {policy}, seed {cfg.seed + r}", flush=True)
                    pretrain.run(_pretrain_cfg(p["clip_model"], str(world / "web"), str(recap), policy, run_dir,
                                               p["clip_steps"], p["clip_batch"], cfg.seed + r, threads))

    sweep_dir = out / "sweep"
    title = f"sweep seg + depth probes (frozen trunk, linear head): fractions x {len(ckpts) + 1} backbones x seeds"
    with _step(out, 5, title, cfg.fresh) as s:
        scfg = _sweep_cfg(p, sweep_dir, world, ckpts.pop(("alt-text-clip", 0)), ckpts.pop(("recap-clip", 0)),
                          cfg.seed, ckpts)
        if not s.done or cfg.replicates > 1:    # the sweep resumes: finished trials are not rerun
            sweep.run(scfg.model_copy(update={"run_report": False}))

    with _step(out, 6, "report: plots, tables, efficiency factor", False):
        from clipdense.sweep.report import ReportConfig
        from clipdense.sweep.report import run as report_run

        summary["report"] = report_run(ReportConfig(results_dir=str(sweep_dir), reference="alt-text-clip"))
    summary["seconds"] = round(time.time() - t_start, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ndemo finished in {summary['seconds']:.0f}s; report: {sweep_dir / 'report.md'}")
    return {"out": str(out), "seconds": summary["seconds"], "caption_quality": summary.get("caption_quality")}

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
from clipdense.pretrain.config import PretrainConfig
from clipdense.pretrain.run import run as run_pretrain
from clipdense.ray_session import cluster_cpus, ray_session
from clipdense.recaption import run as run_recaption
from clipdense.recaption.config import RecaptionConfig
from clipdense.sweep.config import SmallFractionSeeds, SweepConfig
from clipdense.sweep.report import ReportConfig
from clipdense.sweep.report import run as write_report
from clipdense.sweep.run import run as run_sweep
from clipdense.synth.config import SynthConfig
from clipdense.synth.run import run as run_synth
from clipdense.synth.scoring import score_captions

# Scale of each step: a preset in configs/demo/ (`quick` proves the plumbing in minutes; `default` is the most the
# 30-minute budget on 2 cores holds), with the config's `scale` keys merged over it. Dense evaluation is the probe
# protocol (frozen trunk, linear head): with CPU-budget CLIPs, full finetuning rebuilds the features from the dense
# labels and hides what pretraining put in them (measured: docs/results.md).
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
    # cache: the demo's sets fit in memory; decoding once is 5-15% more samples/s over 2-5 epochs (measured)
    data = {"shards": shards, "recaptions": recaptions, "batch_size": batch, "decode_batch_size": batch,
            "decode_cpus": 0.5, "count_errors": False, "cache": True}
    return build_config(PretrainConfig, {
        "model": {"name": model}, "data": data, "captions": {"policy": policy}, "loss": {"kind": loss},
        "eval": {"holdout": 0}, "train": _train_section(out_dir, steps, lr, seed, threads)}, "demo pretrain")


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


def _recaption_cfg(p: dict, web: Path, out: Path, captioner: Path, seed: int) -> RecaptionConfig:
    rc = p["recaption"]
    return build_config(RecaptionConfig, {
        "input": str(web), "output": str(out),
        "engine": {"kind": "coca", "model": p["coca_model"], "checkpoint": str(captioner),
                   "num_captions": rc["num_captions"], "seq_len": rc["seq_len"], "top_p": 0.9,
                   "seed": seed, "device": "cpu", "batch_size": rc["batch_size"], "concurrency": 2, "num_cpus": 1.0},
    }, "demo recaption")


def run(cfg: DemoConfig) -> dict:
    with ray_session(cfg.ray):
        # the one training worker gets every core but one Ray CPU for the decode tasks feeding it (torch threads)
        threads = max(1, min(os.cpu_count() or 1, cluster_cpus() - 1))
        return Demo(cfg, threads).run()


class Demo:
    """The six steps over one output folder (`cfg.out`); each step skips itself when an earlier run finished it."""

    def __init__(self, cfg: DemoConfig, threads: int):
        self.cfg, self.threads = cfg, threads
        self.p = cfg.scale.model_dump(exclude_unset=True)
        self.out = Path(cfg.out)
        self.world, self.captioner = self.out / "world", self.out / "captioner"
        self.recap, self.sweep_dir = self.out / "recaptioned", self.out / "sweep"

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        summary: dict = {"out": str(self.out), "preset": "quick" if self.cfg.quick else "default"}
        self.make_world()
        self.train_captioner()
        summary["caption_quality"] = self.recaption()
        self.sweep_probes(self.pretrain_clips())
        summary["report"] = self.report()
        summary["seconds"] = round(time.time() - t_start, 1)
        (self.out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"\ndemo finished in {summary['seconds']:.0f}s; report: {self.sweep_dir / 'report.md'}")
        return {"out": str(self.out), "seconds": summary["seconds"], "caption_quality": summary["caption_quality"]}

    def make_world(self) -> None:
        with _step(self.out, 1, "generate the synthetic world", self.cfg.fresh) as s:
            if not s.done:
                run_synth(SynthConfig(out=str(self.world), seed=self.cfg.seed, **self.p["synth"]))

    def train_captioner(self) -> None:
        p = self.p
        with _step(self.out, 2, f"train the {p['coca_model']} captioner on the curated subset (CoCa loss)",
                   self.cfg.fresh) as s:
            if not s.done:
                run_pretrain(_pretrain_cfg(p["coca_model"], str(self.world / "curated"), None, "real", self.captioner,
                                           p["captioner_steps"], p["captioner_batch"], self.cfg.seed, self.threads,
                                           loss="coca", lr=p["captioner_lr"]))

    def recaption(self) -> dict:
        """Step 3; returns the caption quality of alt texts vs synthetic captions (scored on every run)."""
        with _step(self.out, 3, "recaption the web corpus through the captioner actor pool", self.cfg.fresh) as s:
            if not s.done:
                run_recaption(_recaption_cfg(self.p, self.world / "web", self.recap,
                                             self.captioner / "export" / "model.pt", self.cfg.seed))
            q = score_captions(self.world / "web", self.recap)
            print(f"  caption accuracy (objects named with the right colour and shape): alt text "
                  f"{q['alt_text_accuracy']:.2f}, synthetic {q['synthetic_accuracy']:.2f}; objects whose colour word "
                  f"appears: {q['alt_text_colour_recall']:.2f} vs {q['synthetic_colour_recall']:.2f}, whose shape "
                  f"word appears: {q['alt_text_shape_recall']:.2f} vs {q['synthetic_shape_recall']:.2f}")
        return q

    def pretrain_clips(self) -> dict[tuple[str, int], str]:
        """Step 4; returns (condition, replicate) -> exported checkpoint of every pretraining run."""
        cfg, p, ckpts = self.cfg, self.p, {}
        with _step(self.out, 4, f"pretrain {p['clip_model']} CLIPs with identical budgets, {cfg.replicates} per "
                   "condition", cfg.fresh) as s:
            for r in range(cfg.replicates):
                for condition, policy in (("alt-text-clip", "real"), ("recap-clip", "synthetic")):
                    name = run_name(condition, r)
                    run_dir = self.out / "pretrain" / name
                    ckpts[condition, r] = str(run_dir / "export" / "model.pt")
                    if not s.done or not Path(ckpts[condition, r]).is_file():   # added by a larger --replicates
                        print(f"  {name}: caption policy {policy}, seed {cfg.seed + r}", flush=True)
                        run_pretrain(_pretrain_cfg(p["clip_model"], str(self.world / "web"), str(self.recap), policy,
                                                   run_dir, p["clip_steps"], p["clip_batch"], cfg.seed + r,
                                                   self.threads))
        return ckpts

    def sweep_probes(self, ckpts: dict[tuple[str, int], str]) -> None:
        title = f"sweep seg + depth probes (frozen trunk, linear head): fractions x {len(ckpts) + 1} backbones x seeds"
        with _step(self.out, 5, title, self.cfg.fresh) as s:
            ckpts = dict(ckpts)
            scfg = _sweep_cfg(self.p, self.sweep_dir, self.world, ckpts.pop(("alt-text-clip", 0)),
                              ckpts.pop(("recap-clip", 0)), self.cfg.seed, ckpts)
            if not s.done or self.cfg.replicates > 1:    # the sweep resumes: finished trials are not rerun
                run_sweep(scfg.model_copy(update={"run_report": False}))

    def report(self) -> dict:
        with _step(self.out, 6, "report: plots, tables, efficiency factor", False):
            return write_report(ReportConfig(results_dir=str(self.sweep_dir), reference="alt-text-clip"))

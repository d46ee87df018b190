"""Each step's stage config: a template in configs/demo/stages/ (what the demo fixes) with the preset's scale and the
run's folders merged over it, validated by the stage's own config class. A renamed stage key fails here, at load."""
from __future__ import annotations

from pathlib import Path

from clipdense.config import build_config, configs_dir, deep_merge, read_yaml
from clipdense.demo.config import DemoScale
from clipdense.pretrain.config import PretrainConfig
from clipdense.recaption.config import RecaptionConfig
from clipdense.sweep.config import SweepConfig

# condition -> (caption policy, caption source); the oracle's source is the world's true descriptions
PRETRAINED = {"alt-text-clip": ("real", "recaptioned"), "recap-clip": ("synthetic", "recaptioned"),
              "oracle-clip": ("synthetic", "oracle")}
RANDOM_INIT, POSITION_ONLY = "random-init", "position-only"
CONDITIONS = (*PRETRAINED, RANDOM_INIT)


def template(name: str) -> dict:
    return read_yaml(configs_dir() / "demo" / "stages" / f"{name}.yaml")


def run_name(condition: str, replicate: int) -> str:
    """Pretraining run (and sweep backbone) name: the condition's for replicate 0, `<condition>-r<N>` after."""
    return condition if replicate == 0 else f"{condition}-r{replicate}"


def _train(out_dir: Path, steps: int, batch: int, seed: int, threads: int) -> tuple[dict, dict]:
    """The `data` and `train` keys every pretraining run of the demo sets from the preset."""
    data = {"batch_size": batch, "decode_batch_size": batch}
    train = {"out_dir": str(out_dir), "seed": seed, "log_every": max(1, steps // 10),
             "schedule": {"warmup_steps": max(1, steps // 20), "total_steps": steps},
             "scaling": {"cpus_per_worker": float(threads)}, "checkpoint": {"every_steps": max(steps // 2, 1)}}
    return data, train


def captioner_config(p: DemoScale, curated: Path, out_dir: Path, seed: int, threads: int) -> PretrainConfig:
    data, train = _train(out_dir, p.captioner_steps, p.captioner_batch, seed, threads)
    train["optim"] = {"lr": p.captioner_lr}
    given = {"model": {"name": p.coca_model}, "data": {**data, "shards": str(curated)}, "train": train,
             "ray": {"in_process": p.in_process}}
    return build_config(PretrainConfig, deep_merge(template("captioner"), given), "demo captioner")


def clip_config(p: DemoScale, condition: str, web: Path, captions: Path, out_dir: Path, seed: int,
                threads: int) -> PretrainConfig:
    policy = PRETRAINED[condition][0]
    data, train = _train(out_dir, p.clip_steps, p.clip_batch, seed, threads)
    given = {"model": {"name": p.clip_model}, "data": {**data, "shards": str(web), "recaptions": str(captions)},
             "captions": {"policy": policy}, "train": train, "ray": {"in_process": p.in_process}}
    return build_config(PretrainConfig, deep_merge(template("clip"), given), f"demo {condition}")


def recaption_config(p: DemoScale, web: Path, out: Path, captioner: Path, seed: int) -> RecaptionConfig:
    engine = {"model": p.coca_model, "checkpoint": str(captioner), "seed": seed, **p.recaption.model_dump()}
    if p.in_process:  # one captioner in the demo's process, with the CPUs the template's actor pool would hold
        pool = template("recaption")["engine"]
        engine.update(concurrency=1, num_cpus=pool.get("concurrency", 1) * pool.get("num_cpus", 1.0))
    given = {"input": str(web), "output": str(out), "engine": engine, "ray": {"in_process": p.in_process}}
    return build_config(RecaptionConfig, deep_merge(template("recaption"), given), "demo recaption")


def probe_tasks(p: DemoScale, world: Path) -> list[dict]:
    """The sweep's two task entries (also what bench/depth_probe.py runs): the template's, sized by the preset."""
    tasks = template("sweep")["tasks"]
    steps = p.finetune_steps
    for task in tasks:
        sub = "ade" if task["name"] == "seg" else "nyu"
        for key, value in {"train.schedule.total_steps": steps, "train.schedule.warmup_steps": max(1, steps // 10),
                           "train.log_every": max(1, steps // 5), "data.max_eval_images": p.eval_images,
                           "data.root": str(world / sub)}.items():
            task["overrides"][key] = value
    return tasks


def backbones(p: DemoScale, checkpoints: dict[tuple[str, int], str], seed: int) -> list[dict]:
    """Every pretraining run (grouped by condition), the random-init floor's init seeds and, for the fitted probe,
    the position-only baseline (features that know where a patch is and nothing of the image)."""
    runs = [{"name": run_name(cond, r), "condition": cond, "backbone": {"name": p.clip_model, "checkpoint": ckpt}}
            for (cond, r), ckpt in sorted(checkpoints.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    floor = [{"name": run_name(RANDOM_INIT, r), "condition": RANDOM_INIT,
              "backbone": {"name": p.clip_model, "checkpoint": None, "init_seed": seed + r}}
             for r in range(p.random_init_seeds)]
    position = [{"name": POSITION_ONLY, "backbone": {"name": POSITION_ONLY}}] if p.probe == "fit" else []
    return [*runs, *floor, *position]


def sweep_config(p: DemoScale, out: Path, world: Path, checkpoints: dict[tuple[str, int], str],
                 seed: int) -> SweepConfig:
    """`checkpoints`: (condition, replicate) -> exported checkpoint of every pretraining run."""
    given = {"out": str(out), "backbones": backbones(p, checkpoints, seed), "tasks": probe_tasks(p, world),
             "protocol": "fit" if p.probe == "fit" else "finetune", "fractions": p.fractions, "seeds": p.seeds,
             "small_fraction_seeds": p.small_seeds.model_dump() if p.small_seeds else None, "search_seed": seed}
    data = {k: v for k, v in template("sweep").items() if k != "tasks"}
    return build_config(SweepConfig, {**data, **given}, "demo sweep")

"""Entry of the recaption stage: `run(cfg)` resolves everything once (the engine and its checks, the input shards,
which of them are done), enters Ray for the pipeline (or, `ray.in_process`, runs it here without Ray: local.py),
writes the stats and reports."""
from __future__ import annotations

import sys

from clipdense.config import ConfigError
from clipdense.data.paths import ShardFiles, expand_shards
from clipdense.ray_session import ray_session
from clipdense.recaption.config import RecaptionConfig
from clipdense.recaption.engines.resolve import resolve_engine
from clipdense.recaption.local import caption_shards_here
from clipdense.recaption.pipeline import EngineLoadError, caption_shards
from clipdense.recaption.plan import plan_shards
from clipdense.recaption.stats import write_stats
from clipdense.recaption.teachers import TeacherLoadError
from clipdense.recaption.writer import RunCounts


def _here(todo: ShardFiles, plan, engine, cfg: RecaptionConfig):
    """`caption_shards_here` (no Ray); a captioner or teacher that does not load is a one-line error."""
    try:
        return caption_shards_here(todo, plan, engine, cfg.decode, cfg.fault, cfg.keep_images, cfg.teachers)
    except (EngineLoadError, TeacherLoadError) as e:
        raise ConfigError(str(e)) from None


def run(cfg: RecaptionConfig) -> dict:
    """Caption every not-yet-done input shard; write outputs and `_stats.json`; return a summary."""
    engine = resolve_engine(cfg.engine, cfg.decode, remote=cfg.ray.target() is not None)
    shards = expand_shards(cfg.sources)  # listed once, for plan and read
    output = cfg.storage(cfg.output)
    plan = plan_shards(list(zip(shards.names, shards.files)), output, with_tar=cfg.teachers is not None)
    counts, written, seconds = RunCounts(), [], 0.0
    if plan.todo:
        todo = ShardFiles(list(plan.todo.values()), shards.sidecars, shards.storage)
        if cfg.ray.in_process:
            assembler, seconds = _here(todo, plan, engine, cfg)
        else:
            with ray_session(cfg.ray, log_to_driver=True) as started:
                # a Ray started here has a fixed size (a cluster's autoscaler may add nodes for the actor pools)
                fixed_size = started and cfg.ray.target() is None
                assembler, seconds = caption_shards(todo, plan, engine, cfg.decode, cfg.fault, cfg.keep_images,
                                                    cfg.teachers, fixed_size=fixed_size)
        counts, written = assembler.counts, assembler.written
    stats = None
    if cfg.stats.enabled:
        stats = write_stats(plan, output, shards, cfg.stats, cfg.decode.max_image_pixels)
    speed = round(counts.rows / seconds, 2) if seconds > 0 else 0.0
    failed_by_code = dict(sorted(counts.errors.items()))
    reasons = ", ".join(f"{k}: {v}" for k, v in failed_by_code.items()) or "none"
    print(f"recaption: {counts.rows} rows in, {counts.ok} captioned, {counts.failed} failed ({reasons}); "
          f"{len(written)} shard file(s) written, {len(plan.done)} already done; {speed} images/s over "
          f"{seconds:.1f}s", file=sys.stderr, flush=True)
    return {"output": output.uri,
            "shards": {"total": len(plan.inputs), "skipped_done": len(plan.done), "written": len(written)},
            "rows_in": counts.rows, "rows_captioned": counts.ok, "rows_failed": counts.failed,
            "failed_by_code": failed_by_code, "seconds": round(seconds, 3), "images_per_s": speed, "stats": stats}

"""Ray wiring of the recaption stage.

read_shards (canonical rows) -> decode + resize (Ray Data CPU tasks, decode.py) -> captioner actor pool
(map_batches over `CaptionActor`, ActorPoolStrategy(min, max), num_gpus per actor) -> the driver assembles
one Parquet file per input shard (writer.py). Ray Data's progress bars show each stage.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time

import pyarrow as pa

from clipdense.config import ConfigError
from clipdense.data.paths import ShardFiles, expand_shards
from clipdense.data.rows import error_columns, errors_from, exception_detail, row_error
from clipdense.data.shards import READ_TASK_BYTES, write_parquet
from clipdense.ray_session import data_context, ray_session
from clipdense.recaption.config import EngineConfig, FaultConfig, RecaptionConfig
from clipdense.recaption.decode import ImageInput, decode_batch
from clipdense.recaption.engines import build_captioner, check_output, image_input, provenance
from clipdense.recaption.writer import Plan, ShardAssembler, plan_shards

log = logging.getLogger(__name__)


class EngineLoadError(RuntimeError):
    """The captioner could not be built in its actor (model missing or not loadable, engine not installed)."""


def engine_load_message(cfg: EngineConfig, e: BaseException) -> str:
    return f"engine.model {cfg.model_name!r} ({cfg.kind}) did not load: {exception_detail(e)}"


def find_load_error(e: BaseException) -> str | None:
    """The EngineLoadError message inside whatever Ray Data raised for a failed actor constructor."""
    text = str(e)
    for cause in (e.__cause__, e.__context__):
        if cause is not None and find_load_error(cause):
            return find_load_error(cause)
    i = text.find("engine.model ")
    if "EngineLoadError" in text and i >= 0:
        return text[i:].splitlines()[0]
    return None


class CaptionActor:
    """One captioner per actor (model loaded once). Rows already in error pass through; a failing engine call is
    retried `engine.retries` times, then its rows get the row error `caption_engine_failed`."""

    def __init__(self, engine: dict, fault: dict | None = None):
        self.cfg = EngineConfig(**engine)
        self.fault = FaultConfig(**(fault or {}))
        try:
            self.engine = build_captioner(self.cfg)
        except Exception as e:  # only a message crosses back: the cause may not unpickle in the driver's env
            raise EngineLoadError(engine_load_message(self.cfg, e)) from None
        self.calls = 0

    def _generate(self, images: list, captions: list, keys: list | None = None) -> list[list[str]]:
        self.calls += 1
        time.sleep(self.fault.engine_delay_s)
        if self.calls <= self.fault.engine_fail_first:
            raise RuntimeError(f"injected engine failure (call {self.calls})")
        marker = self.fault.engine_fail_marker
        if marker and any(marker in (c or "") for c in captions):
            raise RuntimeError(f"injected engine failure (a caption contains {marker!r})")
        n = self.cfg.num_captions
        return check_output(self.engine.generate(images, n, captions, keys=keys), len(images), n)

    def caption(self, images: list, captions: list,
                keys: list | None = None) -> tuple[list[list[str]] | None, str | None]:
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            try:
                return self._generate(images, captions, keys), None
            except Exception as e:  # any engine failure (CUDA OOM, bad output...) is retried, then recorded
                last = e
                log.warning("captioner call failed (attempt %d/%d): %s", attempt + 1, self.cfg.retries + 1, e)
        return None, exception_detail(last)

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        # Ray Data hands an Arrow batch (not numpy): the key/caption/shard columns pass through untouched, and only
        # the rows' images and captions become Python objects. A dict of numpy columns works too.
        from ray.data.block import BlockAccessor

        if not isinstance(batch, pa.Table):
            batch = BlockAccessor.batch_to_block(batch)
        errors = errors_from(batch)
        ok = [i for i, e in enumerate(errors) if e is None]
        syn: list[list[str] | None] = [None] * len(errors)
        if ok:
            if "pixels" in batch.column_names:
                pixels = BlockAccessor.for_block(batch.select(["pixels"])).to_numpy("pixels")  # zero-copy view
                images = [pixels[i] for i in ok]
            else:
                jpegs = batch.column("image_jpeg").to_pylist()
                images = [jpegs[i] for i in ok]
            captions, keys = batch.column("caption").to_pylist(), batch.column("key").to_pylist()
            result, failure = self.caption(images, [captions[i] for i in ok], [str(keys[i]) for i in ok])
            shards = batch.column("shard").to_pylist() if failure is not None else None
            for j, i in enumerate(ok):
                if failure is None:
                    syn[i] = result[j]
                else:
                    errors[i] = row_error("caption_engine_failed", failure, shards[i])
        cols = {"key": batch.column("key").cast(pa.string()), "caption": batch.column("caption").cast(pa.string()),
                "syn_captions": pa.array(syn, pa.list_(pa.string())), **error_columns(errors),
                "shard": batch.column("shard").cast(pa.string())}
        if "image_bytes" in batch.column_names:
            cols["image_bytes"] = batch.column("image_bytes").cast(pa.binary())
        return pa.table(cols)


def check_engine(cfg: RecaptionConfig) -> None:
    """Driver-side checks, so user mistakes fail before any actor starts."""
    e = cfg.engine
    if e.kind == "coca":
        import open_clip

        from clipdense.models.registry import register_model_configs
        from clipdense.recaption.engines.coca import coca_image_size

        register_model_configs()
        if e.model_name not in open_clip.list_models():
            raise ConfigError(f"engine.model: unknown open_clip model {e.model_name!r}")
        if e.checkpoint and "://" not in e.checkpoint and not os.path.isfile(e.checkpoint):
            raise ConfigError(f"engine.checkpoint: file not found: {e.checkpoint}")
        ctx = (open_clip.get_model_config(e.model_name) or {}).get("text_cfg", {}).get("context_length", 77)
        if e.seq_len > ctx:
            raise ConfigError(f"engine.seq_len {e.seq_len} exceeds {e.model_name}'s context length {ctx}")
        coca_image_size(e.model_name)
    py_exe = (e.runtime_env or {}).get("py_executable")
    if e.kind == "vllm" and py_exe and not cfg.ray.target() and not os.path.isfile(py_exe.split()[0]):
        raise ConfigError(f"engine.runtime_env.py_executable: not found: {py_exe} (build one with "
                          "`clipdense vllm-env DIR`)")
    if e.kind == "vllm" and not py_exe and not cfg.ray.target() and importlib.util.find_spec("vllm") is None:
        raise ConfigError("engine.kind=vllm needs vLLM: pip install 'clipdense[vllm]' (GPU), or build a CPU vLLM "
                          "env with `clipdense vllm-env DIR` and set engine.runtime_env.py_executable=DIR/bin/python")
    if e.kind == "vllm" and not cfg.ray.target() and e.model_name.startswith(("/", ".", "~")) \
            and not os.path.isdir(os.path.expanduser(e.model_name)):
        raise ConfigError(f"engine.model: model directory not found: {e.model_name}")
    if e.num_gpus == 0 and e.device == "cuda":
        raise ConfigError("engine.device=cuda needs engine.num_gpus > 0 (actors see no GPU otherwise)")


# Ray Data settings of this pipeline, on the process's DataContext while we plan and run (read parallelism is
# planned from the current context at execution time), restored afterwards:
# - preserve_order: result blocks arrive in input order, which the per-shard writer relies on;
# - read_op_min_num_blocks=1: read parallelism from the shards and the CPUs only, so reads are not split into extra
#   blocks (a split also stops Ray from fusing read and decode into one task).
DATA_CONTEXT = {"execution_options.preserve_order": True, "read_op_min_num_blocks": 1}


def build_dataset(cfg: RecaptionConfig, shards: ShardFiles, spec: ImageInput):
    """The lazy Ray Dataset of result rows (key, caption, syn_captions, error, shard), in input order.
    Iterate it inside `data_context(DATA_CONTEXT)`."""
    import ray.data

    from clipdense.data.shards import read_shards

    with data_context(DATA_CONTEXT):
        ds = read_shards(shards, validate="none", task_bytes=READ_TASK_BYTES)  # decode_batch checks fully
    ds.context.execution_options.preserve_order, ds.context.read_op_min_num_blocks = True, 1
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=cfg.decode.batch_size,
                        num_cpus=cfg.decode.num_cpus, fn_kwargs={"spec": spec, "keep_images": cfg.keep_images})
    e = cfg.engine
    lo, hi = e.concurrency if isinstance(e.concurrency, tuple) else (e.concurrency, e.concurrency)
    return ds.map_batches(
        CaptionActor, batch_format="pyarrow", batch_size=e.batch_size,
        fn_constructor_kwargs={"engine": e.model_dump(), "fault": cfg.fault.model_dump()},
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_gpus=e.num_gpus, num_cpus=e.num_cpus,
        # Always set (an empty runtime_env adds nothing to the job's): remote args that differ from the decode
        # stage's keep Ray Data from fusing decode into the captioner actors, where it would run serially with
        # the model instead of in parallel CPU tasks.
        runtime_env=e.runtime_env or {})


def execute(cfg: RecaptionConfig, plan: Plan, shards: ShardFiles) -> tuple[ShardAssembler, float]:
    spec = image_input(cfg.engine, cfg.decode)
    assembler = ShardAssembler(plan, provenance(cfg.engine), write=write_parquet,
                               keep_images=cfg.keep_images, fail_after_shards=cfg.fault.fail_after_shards)
    ds = build_dataset(cfg, ShardFiles(list(plan.todo.values()), shards.sidecars, shards.storage), spec)
    t0 = time.perf_counter()
    with data_context(DATA_CONTEXT):
        try:
            for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                assembler.add(block)
        except Exception as e:
            message = find_load_error(e)
            if message is None:
                raise
            raise ConfigError(message) from None  # nothing more is written: a rerun redoes every unwritten shard
    assembler.finish()
    return assembler, time.perf_counter() - t0


def run(cfg: RecaptionConfig) -> dict:
    """Caption every not-yet-done input shard; write outputs and `_stats.json`; return a summary."""
    from clipdense.recaption.stats import write_stats

    check_engine(cfg)
    specs = [cfg.input] if isinstance(cfg.input, str) else cfg.input
    shards = expand_shards([cfg.storage(s) for s in specs])  # listed once, for plan and read
    plan = plan_shards(shards.files, cfg.storage(cfg.output))
    todo = plan.todo
    written, seconds, counts = [], 0.0, None
    if todo:
        with ray_session(cfg.ray, log_to_driver=True):
            assembler, seconds = execute(cfg, plan, shards)
        written, counts = assembler.written, assembler.counts
    stats = write_stats(cfg, plan) if cfg.stats.enabled else None
    rows = counts.rows if counts else 0
    summary = {
        "output": cfg.output,
        "shards": {"total": len(plan.inputs), "skipped_done": len(plan.done), "written": len(written)},
        "rows_in": rows, "rows_captioned": counts.ok if counts else 0, "rows_failed": counts.failed if counts else 0,
        "failed_by_code": dict(sorted(counts.errors.items())) if counts else {},
        "seconds": round(seconds, 3), "images_per_s": round(rows / seconds, 2) if seconds > 0 else 0.0,
        "stats": stats,
    }
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["failed_by_code"].items()) or "none"
    print(f"recaption: {rows} rows in, {summary['rows_captioned']} captioned, {summary['rows_failed']} failed "
          f"({reasons}); {len(written)} shard file(s) written, {len(plan.done)} already done; "
          f"{summary['images_per_s']} images/s over {seconds:.1f}s", file=sys.stderr, flush=True)
    return summary

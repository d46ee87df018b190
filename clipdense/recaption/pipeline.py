"""Ray Data wiring of the recaption stage (run.py resolves its inputs and enters Ray).

read_shards (canonical rows) -> decode + resize (Ray Data CPU tasks, `decode_batch`) -> captioner actor pool
(map_batches over `CaptionActor`, ActorPoolStrategy(min, max), num_gpus per actor) -> the driver assembles
one Parquet file per input shard (writer.py). Ray Data's progress bars show each stage.
The captioner actors import this module, for vLLM in a venv without torch or open_clip: only light imports here.
"""
from __future__ import annotations

import logging
import os
import re
import time

import numpy as np
import pyarrow as pa

from clipdense.config import ConfigError
from clipdense.data.paths import ShardFiles
from clipdense.data.rows import error_columns, errors_from, exception_detail, row_error
from clipdense.data.shards import READ_TASK_BYTES, cluster_cpus, read_shards, write_parquet
from clipdense.ray_session import data_context
from clipdense.recaption.config import DecodeConfig, EngineConfig, FaultConfig, TeachersConfig
from clipdense.recaption.decode import ImageInput, prepare_images
from clipdense.recaption.engines import build_captioner, check_output
from clipdense.recaption.engines.resolve import Engine
from clipdense.recaption.plan import Plan
from clipdense.recaption.teachers import TeacherActor
from clipdense.recaption.writer import ShardAssembler, write_bytes

log = logging.getLogger(__name__)


class EngineLoadError(RuntimeError):
    """The captioner could not be built in its actor (model missing or not loadable, engine not installed)."""


ROOT_CAUSE_ABOVE = "See root cause above"     # vLLM's engine core failed in its own process, which logged why
_EXCEPTION_LINE = re.compile(r"\b([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def engine_load_message(cfg: EngineConfig, e: BaseException, log_tail: str | None = None) -> str:
    """One line; where the error only points at a log ("See root cause above": vLLM's engine core process), the
    last exception line of that log (`log_tail`, default: this process's stderr, which the core inherits)."""
    detail = exception_detail(e)
    if ROOT_CAUSE_ABOVE in str(e):
        cause = last_exception_line(stderr_tail() if log_tail is None else log_tail, skip=ROOT_CAUSE_ABOVE)
        if cause:
            detail = f"{cause} (the engine core's error; {detail.split(ROOT_CAUSE_ABOVE)[0].strip(' .')})"
    return f"engine.model {cfg.model_name!r} ({cfg.kind}) did not load: {detail}"


def last_exception_line(text: str, skip: str = "") -> str | None:
    """The last `SomeError: message` in a log, log prefixes dropped, lines containing `skip` ignored."""
    for line in reversed(text.splitlines()):
        found = _EXCEPTION_LINE.search(line.strip())
        if found and not (skip and skip in line):
            return f"{found.group(1)}: {found.group(2).strip()}"
    return None


def stderr_tail(max_bytes: int = 65536) -> str:
    """The end of this process's stderr where it is a file (a Ray worker's .err log), else ''."""
    try:
        path = os.readlink("/proc/self/fd/2")
        if not os.path.isfile(path):        # a terminal or a pipe: nothing to read back
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def find_load_error(e: BaseException) -> str | None:
    """The EngineLoadError message inside whatever Ray Data raised for a failed actor constructor."""
    text = str(e)
    for cause in (e.__cause__, e.__context__):
        if cause is not None and find_load_error(cause):
            return find_load_error(cause)
    for error, start in (("EngineLoadError", "engine.model "), ("TeacherLoadError", "teachers.models ")):
        i = text.find(start)
        if error in text and i >= 0:
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
        n = self.cfg.samples
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
        pixels = None
        if "pixels" in batch.column_names:
            pixels = BlockAccessor.for_block(batch.select(["pixels"])).to_numpy("pixels")  # zero-copy view
        return self.captioned(batch, pixels)

    def captioned(self, batch: pa.Table, pixels=None) -> pa.Table:
        """Result rows of a decoded batch: its images are `pixels` ((n, S, S, 3) uint8, array mode) or its
        `image_jpeg` column (jpeg mode)."""
        errors = errors_from(batch)
        ok = [i for i, e in enumerate(errors) if e is None]
        syn: list[list[str] | None] = [None] * len(errors)
        if ok:
            if pixels is not None:
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
        if "meta" in batch.column_names:
            cols["meta"] = batch.column("meta").cast(pa.string())
        return pa.table(cols)


# Ray Data settings of this pipeline, on the process's DataContext while we plan and run (read parallelism is
# planned from the current context at execution time), restored afterwards:
# - preserve_order: result blocks arrive in input order, which the per-shard writer relies on;
# - read_op_min_num_blocks=1: read parallelism from the shards and the CPUs only, so reads are not split into extra
#   blocks (a split also stops Ray from fusing read and decode into one task).
DATA_CONTEXT = {"execution_options.preserve_order": True, "read_op_min_num_blocks": 1}


def decode_batch(batch: pa.Table, spec: ImageInput, keep_images: bool = False) -> pa.Table:
    """Ray Data CPU stage: canonical rows -> key, caption, error_code, error, shard + `pixels` (a Ray tensor column)
    or `image_jpeg` (+ image_bytes when kept). Rows already in error pass through; new problems become row errors."""
    from ray.data.extensions import ArrowTensorArray

    table, pixels = decoded_rows(batch, spec, keep_images)
    return table if pixels is None else table.append_column("pixels", ArrowTensorArray.from_numpy(pixels))


def decoded_rows(batch: pa.Table | dict, spec: ImageInput, keep_images: bool = False,
                 alloc=np.empty) -> tuple[pa.Table, np.ndarray | None]:
    """`decode_batch` without Ray: (the rows' key, caption, error_code, error, shard [+ image_jpeg] [+ image_bytes,
    meta], their pixels (array mode, in an array from `alloc`) or None). `batch`: canonical rows as an Arrow table,
    or a dict of column lists (the in-process pipeline's tar rows, which never become Arrow)."""
    def column(name: str, kind: pa.DataType):
        return batch.column(name) if isinstance(batch, pa.Table) else pa.array(batch[name], kind)

    def values(name: str) -> list:
        return batch.column(name).to_pylist() if isinstance(batch, pa.Table) else batch[name]

    errors = errors_from(batch)
    images = prepare_images(values("image_bytes"), errors, values("shard"), spec, alloc)
    cols = {"key": column("key", pa.string()), "caption": column("caption", pa.string()), **error_columns(errors),
            "shard": column("shard", pa.string())}
    pixels = images if isinstance(images, np.ndarray) else None
    if pixels is None:
        cols["image_jpeg"] = pa.array(images, pa.binary())
    if keep_images:  # the originals (and their uid / sha256 in `meta`) for the teachers or the output
        cols["image_bytes"] = column("image_bytes", pa.binary())
        if "meta" in (batch.column_names if isinstance(batch, pa.Table) else batch):
            cols["meta"] = column("meta", pa.string())
    return pa.table(cols), pixels


def build_dataset(shards: ShardFiles, engine: Engine, decode: DecodeConfig, fault: FaultConfig,
                  keep_images: bool = False, teachers: TeachersConfig | None = None):
    """The lazy Ray Dataset of result rows (key, caption, syn_captions, error, shard; with teachers their columns
    too), in input order. Iterate it inside `data_context(DATA_CONTEXT)`."""
    import ray.data

    with data_context(DATA_CONTEXT):
        ds = read_shards(shards, validate="none", task_bytes=READ_TASK_BYTES)  # decode_batch checks fully
    ds.context.execution_options.preserve_order, ds.context.read_op_min_num_blocks = True, 1
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=decode.batch_size, num_cpus=decode.num_cpus,
                        fn_kwargs={"spec": engine.image, "keep_images": keep_images or teachers is not None})
    e = engine.config
    lo, hi = e.concurrency if isinstance(e.concurrency, tuple) else (e.concurrency, e.concurrency)
    ds = ds.map_batches(
        CaptionActor, batch_format="pyarrow", batch_size=e.batch_size,
        # plain dicts cross to the actors: they may run in another venv (vLLM) with other library versions
        fn_constructor_kwargs={"engine": e.model_dump(), "fault": fault.model_dump()},
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_gpus=e.num_gpus, num_cpus=e.num_cpus,
        # Always set (an empty runtime_env adds nothing to the job's): remote args that differ from the decode
        # stage's keep Ray Data from fusing decode into the captioner actors, where it would run serially with
        # the model instead of in parallel CPU tasks.
        runtime_env=e.runtime_env or {})
    if teachers is None:
        return ds
    return ds.map_batches(
        TeacherActor, batch_format="pyarrow", batch_size=teachers.batch_size,
        fn_constructor_kwargs={"teachers": teachers.model_dump(), "max_image_pixels": decode.max_image_pixels,
                               "keep_images": keep_images, "keep": e.rerank.keep if e.rerank else None},
        compute=ray.data.ActorPoolStrategy(size=teachers.concurrency), num_gpus=teachers.num_gpus,
        num_cpus=teachers.num_cpus)


READ_CPUS = 1.0   # a read task (Ray Data's default), fused with decode_batch


def check_cpus_left_to_read(e: EngineConfig, teachers: TeachersConfig | None, cluster_cpus: float) -> None:
    """A Ray of fixed size (one started here) whose CPUs the actor pools hold all of leaves none for the read and
    decode tasks: Ray Data would wait for them forever. A one-line ConfigError instead."""
    lo = e.concurrency[0] if isinstance(e.concurrency, tuple) else e.concurrency
    held = lo * e.num_cpus + (teachers.concurrency * teachers.num_cpus if teachers is not None else 0.0)
    if held + READ_CPUS > cluster_cpus + 1e-9:
        pools = "engine.concurrency x engine.num_cpus" + (
            " + teachers.concurrency x teachers.num_cpus" if teachers is not None else "")
        raise ConfigError(f"{pools} = {held:g} of this Ray's {cluster_cpus:g} CPUs leaves less than the "
                          f"{READ_CPUS:g} CPU a shard read needs, and the pipeline would wait forever: lower them "
                          f"or raise ray.num_cpus")


def shard_assembler(plan: Plan, engine: Engine, fault: FaultConfig, keep_images: bool,
                    teachers: TeachersConfig | None) -> ShardAssembler:
    """The writer of a run's per-shard outputs (and with teachers their DataCompDR tars)."""
    return ShardAssembler(plan, engine.provenance, write=write_parquet, keep_images=keep_images,
                          fail_after_shards=fault.fail_after_shards,
                          write_tar=write_bytes if teachers is not None else None, seeds=engine.caption_seeds)


def caption_shards(todo: ShardFiles, plan: Plan, engine: Engine, decode: DecodeConfig, fault: FaultConfig,
                   keep_images: bool, teachers: TeachersConfig | None = None,
                   fixed_size: bool = False) -> tuple[ShardAssembler, float]:
    """Caption the shards of `todo` (those of `plan` not done) and write one output file per shard (and with
    teachers its DataCompDR tar) as it completes; (the assembler, with what it wrote and counted; seconds). Runs
    inside a Ray session; `fixed_size`: a Ray that cannot grow (one started here), whose CPUs are checked first."""
    if fixed_size:
        check_cpus_left_to_read(engine.config, teachers, cluster_cpus())
    ds = build_dataset(todo, engine, decode, fault, keep_images, teachers)
    assembler = shard_assembler(plan, engine, fault, keep_images, teachers)
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

"""Recaption stage config: `clipdense recaption --config configs/recaption/<name>.yaml [a.b=v ...]`."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clipdense.config import Config, RayConfig
from clipdense.data.storage import Storage, StorageKeys
from clipdense.recaption.engines.registry import engine_kinds, engine_spec


class RerankConfig(Config):
    """Best-of-N: the engine samples `candidates` captions per image; duplicates are dropped and the `keep` best by
    CLIP score (the teachers' scorer) remain, best first (a row with fewer distinct candidates repeats its best ones,
    so every row keeps exactly `keep`: DataCompDR's text_emb has one shape per shard)."""
    candidates: int = Field(8, ge=1)
    keep: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.keep > self.candidates:
            raise ValueError(f"engine.rerank.keep ({self.keep}) must be <= engine.rerank.candidates "
                             f"({self.candidates})")
        return self


class EngineConfig(Config):
    """The captioner and its actor pool. Sampling defaults follow DataCompDR."""
    kind: str = "echo"                  # a registered engine (engines/registry.py): echo, coca, vllm
    model: str | None = None            # coca: open_clip name (default coca_ViT-L-14); vllm: HF id or local dir
    pretrained: str | None = None       # coca: open_clip pretrained tag, e.g. mscoco_finetuned_laion2B-s13B-b90k
    checkpoint: str | None = None       # coca: local open_clip checkpoint (state_dict .pt); wins over `pretrained`
    num_captions: int = Field(5, ge=1)  # N synthetic captions per image
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    seq_len: int = Field(30, ge=3)      # coca: fixed output length in tokens, start and end tokens included
    min_seq_len: int = Field(5, ge=1)   # coca: no end token before this many tokens (open_clip's default)
    cut_at_period: bool | None = None   # keep the text before the first '.'; default: coca yes, vllm no
    prompt: str = "Describe this image in one sentence."   # vllm
    system_prompt: str | None = None    # vllm
    max_tokens: int = Field(77, ge=1)   # vllm: new tokens per caption
    max_pixels: int = Field(448 * 448, ge=28 * 28)  # vllm: images are pre-resized below this on CPU, and
    #                                     the same cap goes to the model's processor (mm_processor_kwargs)
    engine_kwargs: dict[str, Any] = {}  # vllm: passed to vllm.LLM (tensor_parallel_size, max_model_len, ...)
    seed: int = 0
    rerank: RerankConfig | None = None  # best-of-N by CLIP score (needs `teachers:`); keeps rerank.keep captions
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)   # images per captioner call
    concurrency: int | tuple[int, int] = 1  # actor pool size, or (min, max) to autoscale
    num_gpus: float = Field(0.0, ge=0)  # per actor
    num_cpus: float = Field(1.0, ge=0)  # per actor
    retries: int = Field(2, ge=0)       # a failing batch is retried this often, then its rows are marked failed
    runtime_env: dict[str, Any] | None = None  # Ray runtime_env of the actors, e.g. {"pip": [...]}, an image_uri,
    #                                     or {"py_executable": "DIR/bin/python"} for a `clipdense vllm-env DIR` venv
    #                                     (vLLM pins its own torch; only plain data crosses between the envs)

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        if kind not in engine_kinds():
            raise ValueError(f"not a registered engine ({', '.join(engine_kinds())})")
        return kind

    @model_validator(mode="after")
    def _check(self):
        engine_spec(self.kind).config_rules(self)
        if isinstance(self.concurrency, tuple) and not 1 <= self.concurrency[0] <= self.concurrency[1]:
            raise ValueError(f"engine.concurrency {self.concurrency} must be (min, max) with 1 <= min <= max")
        if isinstance(self.concurrency, int) and self.concurrency < 1:
            raise ValueError("engine.concurrency must be >= 1")
        return self

    @property
    def samples(self) -> int:
        """Captions the engine samples per image: the rerank candidates, else num_captions."""
        return self.rerank.candidates if self.rerank else self.num_captions

    @property
    def model_name(self) -> str:
        return self.model or engine_spec(self.kind).default_model

    @property
    def cut(self) -> bool:
        if self.cut_at_period is not None:
            return self.cut_at_period
        return engine_spec(self.kind).cut_at_period_default


class DecodeConfig(Config):
    """The CPU stage: decode + resize in Ray Data tasks, before the captioner actors."""
    mode: Literal["auto", "array", "jpeg"] = "auto"  # auto: vllm -> jpeg (aspect kept), others -> array
    size: int | None = Field(None, ge=8)  # array: square side; default the CoCa model's image size, else 224
    # Images with more pixels become error rows "image too large" (decompression-bomb guard; PIL's default
    # limit). Anything below it is decoded (JPEG draft mode: reduced-size DCT decode) and resized.
    max_image_pixels: int = Field(89_478_485, ge=1)
    jpeg_quality: int = Field(90, ge=1, le=100)  # jpeg mode: re-encode quality of resized images
    # None: one read block per call (read_shards yields <= 256 rows per block); Ray then fuses read + decode into
    # one task, so raw image bytes never pass through the object store. An int re-batches (no fusion).
    batch_size: int | None = Field(None, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    local_workers: int | None = Field(None, ge=0, description="ray.in_process: decode processes beside the captioner "
                                      "(0: in this process); null: the machine's cores less engine.num_cpus, >= 1")


class StatsConfig(Config):
    """Caption quality stats written to `<output>/_stats.json`."""
    enabled: bool = True
    max_rows: int = Field(200_000, ge=1)   # rows read back from the outputs for the text stats
    clip_model: str | None = None          # e.g. ViT-B-32 or clip-tiny: adds the mean CLIP score
    clip_pretrained: str | None = None     # open_clip tag or local checkpoint for clip_model
    clip_sample: int = Field(256, ge=1)    # images scored
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FaultConfig(Config):
    """Fault injection for tests and failure drills; all off by default."""
    fail_after_shards: int | None = Field(None, ge=1)  # the driver dies after writing this many shard files
    engine_fail_first: int = Field(0, ge=0)            # each actor's first k captioner calls raise
    engine_fail_marker: str | None = None              # calls whose batch has a caption containing this raise
    engine_delay_s: float = Field(0.0, ge=0)           # each captioner call first sleeps this long (a slow engine)


class TeacherModel(Config):
    """One open_clip teacher: a model name and its weights (an open_clip tag, `local-dir:DIR`, `hf-hub:ORG/REPO` or a
    checkpoint path; none: random weights, for tests)."""
    name: str
    pretrained: str | None = None


class TeachersConfig(Config):
    """Teacher embeddings in DataCompDR's layout (`<output>/<shard>.tar` beside each Parquet): per image `views`
    augmented views (RandomResizedCrop + RandAugment, as DataCompDR's generator draws them), each teacher's image
    embedding of each view, and its text embeddings of the original and every synthetic caption."""
    models: list[TeacherModel] = Field(min_length=1)
    views: int = Field(2, ge=1)            # DataCompDR-12M stores 30; a few keep a run cheap
    seed: int = 0                           # views are drawn from a per-row seed (seed, key)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)       # images per teacher call
    concurrency: int = Field(1, ge=1)       # a second actor pool, after the captioners
    num_gpus: float = Field(0.0, ge=0)      # per actor
    num_cpus: float = Field(1.0, ge=0)      # per actor
    scorer: str | None = None               # the teacher (by name) whose cosine of image and caption is each
    #                                         caption's CLIP score (`caption_score`, `syn_scores`); default the first

    @model_validator(mode="after")
    def _check(self):
        names = [m.name for m in self.models]
        if self.scorer is not None and self.scorer not in names:
            raise ValueError(f"teachers.scorer {self.scorer!r} is none of teachers.models ({', '.join(names)})")
        return self

    @property
    def scorer_index(self) -> int:
        return [m.name for m in self.models].index(self.scorer) if self.scorer else 0


class RecaptionConfig(StorageKeys):
    input: str | list[str]              # tar/Parquet shards: paths, dirs, globs, {a..b} ranges, s3://
    output: str                         # directory (local or s3://): one <shard>.parquet per input shard
    keep_images: bool = False           # copy image_bytes into the output (default: join by key instead)
    engine: EngineConfig = EngineConfig()
    decode: DecodeConfig = DecodeConfig()
    stats: StatsConfig = StatsConfig()
    fault: FaultConfig = FaultConfig()
    teachers: TeachersConfig | None = None  # add DataCompDR-layout teacher embeddings beside the captions
    # where it runs: a local Ray, a cluster's address (clipdense.ray_session), or in_process: this process and
    # decode.local_workers decode processes, no Ray (recaption/local.py)
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.engine.rerank and not self.teachers:
            raise ValueError("engine.rerank scores captions with a teacher: add a `teachers:` section")
        if self.ray.in_process and self.engine.runtime_env:
            raise ValueError("ray.in_process runs the captioner in this process: it cannot take engine.runtime_env "
                             "(an actor's environment, e.g. the vLLM venv); leave ray.in_process out")
        if self.ray.in_process and self.engine.concurrency != 1:
            raise ValueError(f"ray.in_process runs one captioner in this process: engine.concurrency must be 1, "
                             f"not {self.engine.concurrency}")
        return self

    @property
    def sources(self) -> list[Storage]:
        """The input specs, each reached through this config's endpoint."""
        return [self.storage(s) for s in ([self.input] if isinstance(self.input, str) else self.input)]

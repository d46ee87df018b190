"""Config of `clipdense sweep`: backbones x tasks x fractions x seeds (+ an optional hyperparameter search space).

Each trial is one `clipdense finetune` run whose config is built from the task's base finetune YAML, the task's
overrides, the backbone entry and the trial's coordinates (fraction, seed, output directory).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from clipdense.config import Config, OnRayConfig, RayConfig
from clipdense.data.storage import Storage, StorageKeys
from clipdense.dense.config import tasks_with_key
from clipdense.dense.fit_probe.config import POSITION_ONLY, FitProbeConfig
from clipdense.dense.tasks import TASKS
from clipdense.sweep.factor import DEFAULT_CI, DEFAULT_FIT, DEFAULT_N_BOOTSTRAP, DEFAULT_TARGETS, Fit
from clipdense.train.tracking import TrackingConfig

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")   # names become directory names

# default (metric key in metrics.json, direction) by task kind, as each task's module says; a task entry can
# override both
TASK_METRICS: dict[str, tuple[str, str]] = {name: task.metric for name, task in TASKS.items()}


def dir_name(what: str) -> Any:
    """A `str` field type that names a directory: `name: dir_name("task")` rejects what NAME_RE does not match."""
    def check(value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"{what} name {value!r} must match {NAME_RE.pattern} (it names a directory)")
        return value
    return Annotated[str, AfterValidator(check)]


class BackboneEntry(Config):
    name: dir_name("backbone") = Field(description="label of this backbone in trial dirs, tables and plots")
    backbone: dict[str, Any] = Field(default_factory=dict,
                                     description="merged into the finetune config's `backbone` section")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted finetune keys -> values, each "
                                      "applied to the tasks whose config has the key (e.g. head.depth_bins: depth "
                                      "only); a key no task has is an error")
    condition: str | None = Field(None, description="the pretraining condition this backbone is one run of: "
                                  "backbones sharing it are its pretraining seeds (two-level bootstrap); "
                                  "default: the backbone's name")

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = [k for k in v if not tasks_with_key(k)]
        if unknown:
            raise ValueError(f"override {unknown[0]!r} is a key of no task's finetune config ({', '.join(TASKS)})")
        return v

    @property
    def condition_name(self) -> str:
        return self.condition or self.name


class TaskEntry(Config):
    name: dir_name("task") = Field(description="seg | depth | det, or any label (then give `metric` and `mode`)")
    config: str = Field(description="base finetune YAML (relative to the cwd or to the shipped configs tree)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted finetune keys -> values")
    metric: str | None = Field(None, description="metric key in metrics.json; default by task name")
    mode: Literal["max", "min"] | None = Field(None, description="max = higher is better")

    @model_validator(mode="after")
    def _metric(self):
        default = TASK_METRICS.get(self.name)
        if default is None and (self.metric is None or self.mode is None):
            raise ValueError(f"task {self.name!r} is not one of {sorted(TASK_METRICS)}: give `metric` and `mode`")
        if self.metric is None:
            self.metric = default[0]
        if self.mode is None:
            self.mode = default[1] if default and self.metric == default[0] else "max"
        return self


class SmallFractionSeeds(Config):
    below: float = Field(0.25, gt=0, le=1, description="fractions strictly below this get `seeds` seeds")
    seeds: int = Field(5, ge=1)


class SearchDim(Config):
    """One hyperparameter: exactly one of the keys, e.g. `{loguniform: [1e-5, 1e-3]}` or `{choice: [0.65, 0.75]}`.
    `randint: [low, high]` includes high; `grid` values are all run (crossed with the other grid dims)."""
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("loguniform", "uniform", "randint", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform/uniform/randint/choice/grid, got {given or 'none'}")
        if self.loguniform is not None and not 0 < self.loguniform[0] < self.loguniform[1]:
            raise ValueError("loguniform needs 0 < low < high")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "randint", "choice", "grid") if getattr(self, k) is not None)


class SchedulerConfig(Config):
    type: Literal["fifo", "asha"] = "fifo"
    metric: str | None = Field(None, description="reported metric ASHA compares; default: eval/<task metric>")
    mode: Literal["max", "min"] | None = None
    time_attr: str = Field("step", description="reported counter ASHA measures time in (the runner reports `step`)")
    grace_period: int = Field(1, ge=1)
    max_t: int = Field(100, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesConfig(Config):
    """What a Tune trial actor holds. A sweep's finetune runs on Ray Train workers (they request their own
    `train.scaling` resources), so by default the trial actor, which only waits for them, holds nothing; a
    finetune with `ray.in_process: true` trains inside the actor, which then holds its worker's CPUs/GPU."""
    cpu: float | None = Field(None, ge=0, description="default: 0, or train.scaling.cpus_per_worker (in_process)")
    gpu: float | None = Field(None, ge=0, description="default: 0, or 1 if use_gpu (in_process)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: from ray.cluster_resources()")


class ReportSettings(Config):
    """How `clipdense report` computes factors; the sweep's `report:` section and `clipdense report` (whose
    unset keys fall back to the sweep's) share this one model."""
    reference: str | None = Field(None, description="condition (or backbone) the efficiency factor is measured "
                                  "against")
    bootstrap: int = Field(DEFAULT_N_BOOTSTRAP, ge=0, description="bootstrap draws of the factor's interval (0: none)")
    ci: float = Field(DEFAULT_CI, gt=0, lt=1, description="interval level")
    seed: int = 0
    targets: list[float] = Field(list(DEFAULT_TARGETS), min_length=1, description="target levels: shares of the "
                                 "reference's full-data score (direction-aware: 0.95 -> RMSE x 1.05)")
    fit: Fit = Field(DEFAULT_FIT, description="monotone fit of each curve in log-fraction")
    floors: list[str] = Field(["random-init", "position-only"], description="conditions every other condition's "
                              "gain is also reported over (those the sweep has): what no pretraining, or position "
                              "alone, already gives")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[float]) -> list[float]:
        if any(not 0 < t <= 1 for t in v):
            raise ValueError("targets must be in (0, 1]")
        return v


class SweepConfig(StorageKeys):
    # the YAML key `storage` names the field `state_uri`: `storage(uri)` is StorageKeys' method
    model_config = ConfigDict(validate_by_alias=True, validate_by_name=False, serialize_by_alias=True)

    name: dir_name("sweep") = Field("sweep", description="experiment name (Tune state lives in "
                                    "<out>/tune/<name>-<grid hash>)")
    protocol: Literal["finetune", "fit"] = Field(
        "finetune", description="finetune: one Ray Tune trial per (task, backbone, fraction, seed), each a "
        "`clipdense finetune` (the SGD probe is this with a frozen trunk and a linear head); fit: one job per "
        "(backbone, task) that caches frozen features once and fits a ridge probe per (fraction, seed), its "
        "penalty chosen inside each training subset (`fit:`)")
    fit: FitProbeConfig = Field(default_factory=FitProbeConfig, description="protocol fit's settings")
    out: str = Field(description="results directory: <out>/trials/<task>/<backbone>/f<fraction>/s<seed>")
    backbones: list[BackboneEntry] = Field(min_length=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    fractions: list[float] | None = Field(None, description="default: powers of 2 from min_fraction to 1")
    min_fraction: float = Field(1 / 64, gt=0, le=1)
    seeds: int = Field(3, ge=1)
    small_fraction_seeds: SmallFractionSeeds | None = Field(default_factory=SmallFractionSeeds)
    schedule_by: Literal["iterations", "epochs"] = Field(
        "iterations", description="finetuning length across fractions: iterations = the same steps at every "
        "fraction (more epochs on less data); epochs = steps scaled by the fraction (train.schedule.total_steps and "
        "warmup_steps)")
    search_space: dict[str, SearchDim] = Field(default_factory=dict, description="dotted finetune key -> dim")
    num_samples: int = Field(1, ge=1, description="samples of search_space per grid point")
    search_seed: int = 0
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    state_uri: str | None = Field(None, alias="storage", description="where Tune keeps the experiment state: a "
                                  "local dir or s3://bucket/prefix (survives the head: rerun the same sweep on a new "
                                  "cluster to Tuner.restore it); default <out>/tune")
    report: ReportSettings = Field(default_factory=ReportSettings)
    run_report: bool = True
    verbose: int = Field(1, ge=0, le=2)
    ray: OnRayConfig = RayConfig()  # the Ray the Tune driver joins or starts (trials carry their own `ray`)
    tracking: TrackingConfig = TrackingConfig()  # Tune's own logger callbacks: each trial logged once, by Tune

    def tune_state(self) -> Storage:
        """Where Tune keeps the experiment state: `storage`, else <out>/tune; a local path made absolute."""
        uri = self.state_uri or str(Path(self.out) / "tune")
        return self.storage(uri if uri.startswith("s3://") else os.path.abspath(uri))

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v):
        if v is not None:
            if not v or any(not 0 < f <= 1 for f in v):
                raise ValueError("fractions must be in (0, 1]")
            if len(set(v)) != len(v):
                raise ValueError("fractions must be distinct")
        return v

    @model_validator(mode="after")
    def _unique(self):
        for what, items in (("backbone", self.backbones), ("task", self.tasks)):
            names = [i.name for i in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate {what} names: {dup}")
        self._check_protocol()
        ref = self.report.reference
        if ref is not None and ref not in {b.name for b in self.backbones} | {b.condition_name
                                                                               for b in self.backbones}:
            raise ValueError(f"report.reference {ref!r} is not a backbone or condition name")
        return self

    def _check_protocol(self) -> None:
        if self.protocol == "finetune":
            baseline = [b.name for b in self.backbones if b.backbone.get("name") == POSITION_ONLY]
            if baseline:
                raise ValueError(f"backbone {baseline[0]!r}: {POSITION_ONLY} has no trunk to finetune; it is a "
                                 "baseline of protocol: fit")
        else:
            if self.search_space:
                raise ValueError("search_space needs protocol: finetune (protocol fit chooses its penalty itself)")
            if self.scheduler.type != "fifo":
                raise ValueError("scheduler.type asha needs protocol: finetune (protocol fit reports once per fit)")

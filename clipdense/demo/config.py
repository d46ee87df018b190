"""The demo's config: the preset's scale (configs/demo/{quick,default}.yaml) with the keys a user gives merged over
it. Every key of every preset is required here, so a typo or a renamed key fails at load, not mid-run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, create_model, model_validator

from clipdense.config import Config, ConfigError, OnRayConfig, RayConfig, configs_dir, deep_merge, read_yaml
from clipdense.sweep.config import SmallFractionSeeds
from clipdense.synth.config import SynthConfig

PRESETS = ("quick", "default")

# The world: every `clipdense synth` key but the two the demo sets, with SynthConfig's own types and checks.
DemoWorld = create_model("DemoWorld", __base__=Config, **{k: (f.annotation, f) for k, f in
                                                          SynthConfig.model_fields.items() if k not in ("out", "seed")})


class DemoRecaption(Config):
    num_captions: int = Field(ge=1, description="synthetic captions per web image (the oracle gets as many)")
    seq_len: int = Field(ge=3, description="tokens per caption, start and end included")
    batch_size: int = Field(ge=1, description="images per captioner call")


class DemoScale(Config):
    """Sizes of every step. All keys are required here; a preset file gives them (configs/demo/*.yaml)."""
    synth: DemoWorld
    clip_model: str = Field(description="open_clip name of the pretrained CLIPs")
    coca_model: str = Field(description="open_clip name of the captioner")
    captioner_steps: int = Field(ge=1)
    captioner_batch: int = Field(ge=1)
    captioner_lr: float = Field(gt=0)
    recaption: DemoRecaption
    clip_steps: int = Field(ge=1)
    clip_batch: int = Field(ge=1)
    in_process: bool = Field(description="pretraining (captioner and CLIPs) and recaptioning in the demo's "
                             "process, without a Ray Train worker group, Ray Data or an actor pool: one machine "
                             "saves their start per run (the sweep still runs on Ray Tune)")
    runs: int = Field(ge=1, description="pretraining runs per pretrained condition (seeds seed .. seed+runs-1)")
    random_init_seeds: int = Field(ge=1, description="init seeds of the random-init floor")
    probe: Literal["fit", "sgd"] = Field(description="fit: a converged linear fit on cached frozen features; sgd: "
                                         "a linear head trained by SGD for finetune_steps")
    finetune_steps: int = Field(ge=1, description="steps of each SGD probe trial (probe: sgd)")
    fractions: list[float] = Field(min_length=1, description="fractions of the dense training sets swept")
    seeds: int = Field(ge=1, description="seeds per fraction")
    small_seeds: SmallFractionSeeds | None = Field(description="more seeds below a fraction; null = none")
    eval_images: int = Field(ge=1, description="evaluation images per SGD probe trial (the fit uses every one)")


def preset_path(name: str) -> Path:
    return configs_dir() / "demo" / f"{name}.yaml"


class DemoConfig(Config):
    out: str = "runs/demo"
    quick: bool = Field(False, description="start from the quick preset (configs/demo/quick.yaml), else default.yaml")
    seed: int = 0
    # num_cpus: logical CPUs of the local Ray (more than cores: Ray Data tasks run beside the training workers)
    ray: OnRayConfig = RayConfig(num_cpus=4)
    fresh: bool = Field(False, description="rerun every step, ignoring finished steps of an earlier run in `out`")
    replicates: int | None = Field(None, ge=1, description="pretraining runs per pretrained condition; default: the "
                                   "preset's scale.runs")
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

    @property
    def runs(self) -> int:
        return self.replicates or self.scale.runs


def preset_scale(name: str) -> DemoScale:
    """A shipped preset's scale, e.g. to run one step of the demo at its size (bench/depth_probe.py)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown demo preset {name!r} (choose from {', '.join(PRESETS)})")
    return DemoConfig(quick=name == "quick").scale

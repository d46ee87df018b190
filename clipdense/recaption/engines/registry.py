"""Engines by name (`engine.kind`), like timm's `register_model`: each engine module registers an `EngineSpec` when
it is imported, and the config, the driver and the actors reach an engine only through `engine_spec(kind)`.

Light (no torch, no recaption config at runtime): the config validates `engine.kind` against this registry, and the
captioner actors import it in the vLLM venv. The built-in engines register when `clipdense.recaption.engines` is
imported; an engine from another package must be imported on the driver and in the captioner actors, which rebuild
the config from plain data (e.g. `engine.runtime_env: {worker_process_setup_hook: mypkg.register_engines}`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar, Union

from clipdense.config import ConfigError

if TYPE_CHECKING:
    from clipdense.recaption.engines.base import Captioner

# recaption.config.EngineConfig, by name only: the config imports this registry to validate `engine.kind`, so the
# registry does not import the config (not even for type checking)
EngineConfig = Any


def no_check(cfg: EngineConfig, remote: bool) -> None:
    return None


def no_config_rules(cfg: EngineConfig) -> None:
    return None


def no_seeds(cfg: EngineConfig, key: str) -> None:
    return None


def no_value(cfg: EngineConfig) -> None:
    return None


def configured_model(cfg: EngineConfig) -> str:
    return cfg.model_name


@dataclass(frozen=True)
class EngineSpec:
    """One engine. `build` runs in the captioner actor (it may load heavy modules there); every other hook runs on
    the driver and loads no model."""
    name: str                                          # the `engine.kind` that selects it
    build: Callable[[EngineConfig], Captioner]
    # the `sampling` output column (JSON): what the captions were sampled with
    sampling: Callable[[EngineConfig], dict]
    # driver-side checks before any actor starts (user mistakes: one-line ConfigErrors); returns the model's image
    # side where it has one. `remote`: actors run on a cluster, so local files are not checked here
    check: Callable[[EngineConfig, bool], int | None] = no_check
    # config-time rules between keys (raise ValueError; pydantic reports it against `engine`)
    config_rules: Callable[[EngineConfig], None] = no_config_rules
    # the seed of each of a row's captions (what the engine seeds its sampling with); None: not seeded
    caption_seeds: Callable[[EngineConfig, str], list[int] | None] = no_seeds
    image_mode: Literal["array", "jpeg"] = "array"    # what the CPU stage hands it with `decode.mode: auto`
    default_model: str = ""                            # `engine.model` when unset
    cut_at_period_default: bool = False                # `engine.cut_at_period` when unset
    # the weights that made the captions: "revision:<id>", or a local file/folder whose sha256 is recorded
    weights: Callable[[EngineConfig], str | None] = no_value
    prompt: Callable[[EngineConfig], str | None] = no_value    # the `prompt` output column
    model_id: Callable[[EngineConfig], str] = configured_model  # the `model` output column


_ENGINES: dict[str, EngineSpec] = {}
SpecFactory = TypeVar("SpecFactory", bound=Callable[[], EngineSpec])


def register_engine(spec: Union[EngineSpec, SpecFactory]) -> Union[EngineSpec, SpecFactory]:
    """Register an engine under `spec.name`: call it with a spec at module import, or decorate a function that
    returns one (it is called once, now). Returns its argument. A name taken by another spec is refused."""
    made = spec if isinstance(spec, EngineSpec) else spec()
    if not isinstance(made, EngineSpec):
        raise TypeError(f"register_engine needs an EngineSpec or a function returning one, got {made!r:.60}")
    if _ENGINES.get(made.name, made) is not made:
        raise ValueError(f"engine {made.name!r} is already registered (by {_ENGINES[made.name].build.__module__})")
    _ENGINES[made.name] = made
    return spec


def engine_kinds() -> list[str]:
    """The registered engine names, sorted."""
    return sorted(_ENGINES)


def engine_spec(kind: str) -> EngineSpec:
    try:
        return _ENGINES[kind]
    except KeyError:
        raise ConfigError(f"engine.kind {kind!r} is not a registered engine ({', '.join(engine_kinds())})") from None

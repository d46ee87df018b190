"""The ground floor every stage stands on: config models and loading, user errors, the `ray:` section's types,
the process environment and where shipped configs live. Nothing here imports torch or Ray."""
from clipdense.config.base import (
    Config,
    apply_override,
    build_config,
    deep_merge,
    format_validation_error,
    get_dotted,
    load_config,
    read_yaml,
    set_dotted,
    with_values,
)
from clipdense.config.errors import ConfigError, DataError, UserError, raise_user_error_behind, user_error_behind
from clipdense.config.process_env import PROCESS_ENV, apply_process_env
from clipdense.config.provenance import code_version, config_hash, run_provenance
from clipdense.config.ray import OnRayConfig, RayConfig
from clipdense.config.shipped import configs_dir, description, resolve_config, shipped_configs

__all__ = ["Config", "ConfigError", "DataError", "OnRayConfig", "PROCESS_ENV", "RayConfig", "UserError",
           "apply_override", "apply_process_env", "build_config", "code_version", "config_hash", "configs_dir",
           "deep_merge", "description", "format_validation_error", "get_dotted", "load_config", "read_yaml",
           "raise_user_error_behind", "resolve_config", "run_provenance", "set_dotted", "shipped_configs",
           "user_error_behind", "with_values"]

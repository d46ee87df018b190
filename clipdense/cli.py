"""`clipdense <command> --config FILE.yaml|NAME [a.b=value ...] [--print-config]`.

`--config NAME` (no such file) is the shipped `configs/<command>/NAME.yaml`; `clipdense configs` lists them.

Each stage is `module:ConfigClass` + `module.run(cfg)`, imported only when asked for (so `--help` is fast and a
stage's heavy imports stay out of the others). User errors print one line and exit 2; internal errors traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib import metadata

from clipdense.config import (
    ConfigError,
    UserError,
    apply_process_env,
    description,
    load_config,
    resolve_config,
    shipped_configs,
)

# command -> (module, config class); the module exposes run(cfg) -> dict
STAGES = {
    "synth": ("clipdense.synth", "SynthConfig"),
    "recaption": ("clipdense.recaption", "RecaptionConfig"),
    "pretrain": ("clipdense.pretrain", "PretrainConfig"),
    "finetune": ("clipdense.dense", "FinetuneConfig"),
    "eval": ("clipdense.eval", "EvalStageConfig"),
    "sweep": ("clipdense.sweep", "SweepConfig"),
    "report": ("clipdense.sweep.report", "ReportConfig"),
    "demo": ("clipdense.demo", "DemoConfig"),
}
# commands with their own argument parsing: command -> "module:function(argv) -> int"
TOOLS = {
    "submit": "clipdense.jobs.submit:main_submit",
    "cluster": "clipdense.jobs.cluster:main_cluster",
    "vllm-env": "clipdense.recaption.vllm_env:main",
}
# shorthand flags that map onto config keys, per command
SHORTHANDS = {
    "synth": {"--out": "out", "--preset": "preset", "--seed": "seed"},
    "report": {},
    "demo": {"--out": "out", "--quick": "quick", "--replicates": "replicates"},
    "finetune": {"--save-predictions": "save_predictions", "--out": "out_dir"},
}
POSITIONAL = {"report": "results_dir"}


def _load_stage(command: str):
    module_name, cls_name = STAGES[command]
    module = importlib.import_module(module_name)
    return getattr(module, cls_name), module.run


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"clipdense {command}")
    p.add_argument("--config", help="YAML config file, or the name of a shipped one (`clipdense configs`)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, key in SHORTHANDS.get(command, {}).items():
        if key == "quick":
            p.add_argument(flag, action="store_const", const="true", dest=key, help=f"= {key}=true")
        else:
            p.add_argument(flag, dest=key, help=f"= {key}=VALUE")
    if command in POSITIONAL:
        # no argparse positional: it would swallow the first `key=value`; _split_positional turns DIR into one
        p.epilog = f"a bare {POSITIONAL[command].upper()} argument means {POSITIONAL[command]}=VALUE"
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.optim.lr=1e-4")
    return p


def _split_positional(command: str, argv: list[str]) -> list[str]:
    # `clipdense report DIR a=b`: argparse cannot tell DIR from an override, so move DIR to an override first.
    if command not in POSITIONAL:
        return argv
    takes_value = {"--config"} | {f for f, key in SHORTHANDS.get(command, {}).items() if key != "quick"}
    for i, arg in enumerate(argv):
        after_flag = i > 0 and argv[i - 1] in takes_value
        if not arg.startswith("-") and "=" not in arg and not after_flag:
            return argv[:i] + [f"{POSITIONAL[command]}={arg}"] + argv[i + 1:]
    return argv


def run_stage(command: str, argv: list[str]) -> int:
    # intermixed: overrides may come before and after the flags (`report DIR a=b --print-config c=d`)
    args = _parser(command).parse_intermixed_args(_split_positional(command, argv))
    overrides = list(args.overrides)
    for key in list(SHORTHANDS.get(command, {}).values()) + ([POSITIONAL[command]] if command in POSITIONAL else []):
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    cls, run = _load_stage(command)
    cfg = load_config(cls, resolve_config(command, args.config), overrides)
    if args.print_config:
        print(cfg.to_yaml() if hasattr(cfg, "to_yaml") else cfg.model_dump_json(indent=2), end="")
        return 0
    result = run(cfg)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return 0


def list_configs(argv: list[str]) -> int:
    """`clipdense configs [COMMAND]` lists the shipped configs; `clipdense configs show [COMMAND/]NAME` prints one."""
    if argv[:1] == ["show"]:
        if len(argv) != 2:
            raise UserError("usage: clipdense configs show [COMMAND/]NAME")
        matches = [p for n, p in shipped_configs().items() if argv[1].removesuffix(".yaml") in (n, n.split("/")[1])]
        if len(matches) != 1:
            raise UserError(f"{argv[1]!r} names {len(matches)} shipped configs: give COMMAND/NAME "
                            "(`clipdense configs` lists them)")
        print(matches[0].read_text(), end="")
        return 0
    for name, path in shipped_configs(argv[0] if argv else None).items():
        print(f"{name:<40} {description(path)}")
    return 0


def version() -> str:
    try:
        return metadata.version("clipdense")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_process_env()  # before any stage imports torch
    commands = sorted(STAGES) + sorted(TOOLS) + ["configs"]
    if argv[:1] == ["--version"]:
        print(f"clipdense {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: clipdense {" + ",".join(commands) + "} --config FILE.yaml [key=value ...] [--print-config]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "configs":
            return list_configs(rest)
        if command in TOOLS:
            module_name, fn = TOOLS[command].split(":")
            return int(getattr(importlib.import_module(module_name), fn)(rest) or 0)
        if command not in STAGES:
            print(f"clipdense: unknown command {command!r} (choose from {', '.join(commands)})", file=sys.stderr)
            return 2
        return run_stage(command, rest)
    except (ConfigError, UserError) as e:
        print(f"clipdense {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipdense {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`clipdense demo`: the paper's claim end to end on the synthetic world (see demo/run.py for the steps).

config.py: the presets and their scale · stages.py: each step's stage config from configs/demo/stages/ ·
steps.py: step markers that know their config · run.py: the steps."""
from clipdense.demo.config import PRESETS, DemoConfig, DemoScale, preset_path, preset_scale
from clipdense.demo.run import run
from clipdense.demo.stages import CONDITIONS, probe_tasks, run_name, sweep_config

__all__ = ["CONDITIONS", "DemoConfig", "DemoScale", "PRESETS", "preset_path", "preset_scale", "probe_tasks", "run",
           "run_name", "sweep_config"]

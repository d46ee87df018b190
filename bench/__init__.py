"""Benchmarks of clipdense against peers (`python -m bench.run`; bench/results/ holds the figures).

Every bench process starts with clipdense's process environment, as the CLI does: set here, on the package's
import, so that it precedes torch whichever bench module is the entry point (`bench.run` or `python -m bench.X`),
and both sides of each bench share it (the peers' subprocesses inherit it).
"""
from clipdense.config import apply_process_env

apply_process_env()

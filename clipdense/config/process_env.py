"""Environment every process of a run starts with (set by the CLI before torch loads)."""
from __future__ import annotations

import os

# Environment for every process of a run: this one and, through it, the workers of a local Ray it starts (they
# inherit it; cluster nodes get it from cluster/Dockerfile). THP_MEM_ALLOC_ENABLE: torch backs CPU allocations of
# >= 2 MB with transparent huge pages; a collated batch (64 x 3 x 224 x 224 float, 38 MB) is above glibc's mmap
# threshold, so each one is fresh memory and, in 4 KB pages, page-faulting it costs more than normalising it.
# torch reads it once, at its first allocation: set before torch is imported (the CLI's first step).
PROCESS_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply_process_env() -> None:
    """PROCESS_ENV into os.environ where not set already (a user's own value wins)."""
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)

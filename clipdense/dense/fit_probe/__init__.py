"""The fitted probe: frozen features of every image computed once and cached (features.py), a ridge fit whose
penalty is chosen inside the training subset (ridge.py), the task's patch targets and metrics (targets.py), and one
(backbone, task)'s fits over training subsets (job.py). The sweep's `protocol: fit` runs it (sweep/fit.py)."""
from clipdense.dense.fit_probe.config import POSITION_ONLY, FitProbeConfig
from clipdense.dense.fit_probe.job import FitProbe

__all__ = ["POSITION_ONLY", "FitProbe", "FitProbeConfig"]

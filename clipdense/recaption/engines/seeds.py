"""Per-row seeds from (engine seed, row key): hashlib only, so engines whose actors must not import torch 2.14
(vllm, in its own venv) share them with the torch samplers."""
from __future__ import annotations

import hashlib


def row_seed(seed: int | None, key: str, *parts: object) -> int:
    """A 63-bit seed that depends only on (engine seed, row key, parts)."""
    text = "\0".join(str(x) for x in (seed, key, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2 ** 63 - 1)

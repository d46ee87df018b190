"""Step markers that know their config: a step is done when its `.done-N` marker holds the hash of the config it
would run now. Each hash chains the previous step's, so a changed key reruns from the first step it changes; the
demo's `out` and `fresh` are left out (paths under `out` are hashed relative to it)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from clipdense.config import config_hash


def _relative(data: Any, out: Path) -> Any:
    """`data` as JSON text with the output folder written as `<out>`: moving a finished demo keeps its steps."""
    text = json.dumps(data, sort_keys=True, default=_plain)
    for form in {str(out.resolve()), str(out)}:
        text = text.replace(form, "<out>")
    return text


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else str(value)


class Steps:
    """The demo's steps over one output folder; `records` holds each step's hash, wall time and whether it ran."""

    def __init__(self, out: Path, fresh: bool, total: int):
        self.out, self.fresh, self.total = out, fresh, total
        self.previous = ""
        self.records: dict[str, dict] = {}

    def digest(self, config: Any) -> str:
        """The hash of `config` after the steps so far."""
        return config_hash({"after": self.previous, "config": _relative(config, self.out)}, exclude=())

    def step(self, n: int, name: str, title: str, config: Any, outputs: tuple[Path, ...] = ()) -> "Step":
        digest = self.previous = self.digest(config)
        return Step(self, n, name, title, digest, outputs)


class Step:
    """Context: prints the header, skips the step when its marker holds this hash; else clears the step's outputs
    (unless an interrupted run of this same config left them: the stages resume) and writes the marker at the end."""

    def __init__(self, steps: Steps, n: int, name: str, title: str, digest: str, outputs: tuple[Path, ...]):
        self.steps, self.n, self.name, self.title, self.hash, self.outputs = steps, n, name, title, digest, outputs
        self.marker, self.started = steps.out / f".done-{n}", steps.out / f".started-{n}"
        earlier = _read(self.marker)
        self.done = not steps.fresh and earlier.get("hash") == digest
        self.seconds = earlier.get("seconds") if self.done else None

    def __enter__(self) -> "Step":
        print(f"\n[demo {self.n}/{self.steps.total}] {self.title}" + (" (done earlier, skipped)" if self.done else ""),
              flush=True)
        self.t0 = time.time()
        if not self.done:
            self.marker.unlink(missing_ok=True)
            if self.steps.fresh or _read(self.started).get("hash") != self.hash:
                for path in self.outputs:
                    shutil.rmtree(path, ignore_errors=True)
            self.started.write_text(json.dumps({"hash": self.hash}))
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            return
        if not self.done:
            self.seconds = round(time.time() - self.t0, 1)
            self.marker.write_text(json.dumps({"hash": self.hash, "seconds": self.seconds}))
            print(f"[demo {self.n}/{self.steps.total}] done in {self.seconds:.0f}s", flush=True)
        self.steps.records[self.name] = {"seconds": self.seconds, "ran": not self.done, "config_hash": self.hash}


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}

"""Progress in the terminal: one formatter of progress lines (or a tqdm bar), for every place that shows a run."""
from __future__ import annotations

import sys
import time


class Progress:
    """`step k/N`, loss, lr, samples/s, data-wait fraction and ETA, one line per log interval (or a tqdm bar).

    The one formatter of progress: rank 0 in-process, the driver of a Ray Train run (`driver_progress`) and a
    sweep's per-trial lines (`sweep/callbacks`, with `prefix` naming the trial) all print through it."""

    def __init__(self, mode: str, total_steps: int, start_step: int = 0, stream=None, prefix: str = ""):
        self.stream = stream or sys.stdout
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = ("bar" if tty else "lines") if mode == "auto" else mode
        self.total, self.step0, self.t0 = total_steps, start_step, time.perf_counter()
        self.prefix = prefix
        self.anchored = False  # the ETA's clock moves to the first logged step (see `write`)
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True, unit="step",
                            desc=prefix.strip() or None)

    def eta(self, step) -> str:
        if not isinstance(step, int) or step <= self.step0:
            return "?"
        rate = (step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
        s = int((self.total - step) / rate)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    def line(self, record: dict) -> str:
        step = record.get("step")
        step = "?" if step is None else int(step) if float(step).is_integer() else step  # Tune's results: floats
        if record.get("event") == "resume":
            return (f"resumed at step {step}/{self.total} (epoch {record.get('epoch')}, "
                    f"world size {record.get('world_size')})")
        parts = []
        if "loss" in record:
            parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record.get('lr', 0):.3g}",
                     f"{record.get('samples_per_s', 0):.1f} samples/s",
                     f"data wait {100 * record.get('data_wait_frac', 0):.0f}%", f"ETA {self.eta(step)}"]
        evals = {k: v for k, v in record.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if evals:
            parts.append(("" if parts else f"step {step}/{self.total}  ") + "eval "
                         + " ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(evals.items())))
        return "  ".join(parts)

    def write(self, record: dict) -> None:
        if self.mode == "off":
            return
        if record.get("event") == "resume":  # the ETA counts from here (a driver learns the start step this way)
            self.step0, self.t0, self.anchored = record.get("step") or 0, time.perf_counter(), False
        text = self.line(record)
        if not text:
            return
        if self.bar is not None:
            self.bar.n = int(record.get("step") or self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"[clipdense] {self.prefix}{text}", file=self.stream, flush=True)
        if not self.anchored and "loss" in record and record.get("step") is not None:
            # later ETAs from the training rate since this step: the time before it (workers starting, the first
            # blocks decoding) says nothing about the steps left
            self.step0, self.t0, self.anchored = int(record["step"]), time.perf_counter(), True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

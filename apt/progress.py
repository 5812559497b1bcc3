"""Progress a person can read in a log file: one line every N seconds per stage.

    [apt] step 120/1000 (12%)  0.52 s/step  ETA 7m38s  loss_d 0.6931  loss_g 0.6932

Steps are the stage's own (``train.max_steps``: optimiser steps; generator updates in the APT stage).
Seconds per step are measured over the last interval, the ETA is the steps left at that pace. Printed
(stdout, rank 0) when stdout is not a terminal or the progress bar is off, every
``train.progress_every_seconds``. The Trainer path drives it from a callback
(``apt.lit.callbacks.LogProgress``), the DeepSpeed runner from its loop.
"""

from __future__ import annotations

import sys
import time

# The losses shown per stage (the names the stage logs).
MAIN_METRICS = {"teacher": ("loss",), "distill": ("loss",), "apt": ("loss_d", "loss_g", "d_real", "d_fake")}


def format_seconds(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLog:
    def __init__(self, stage: str, total_steps: int, every_seconds: float, *, progress_bar: bool, rank: int = 0, stream=None):
        self.stage, self.total, self.every = stage, total_steps, every_seconds
        self.stream = stream or sys.stdout
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = every_seconds > 0 and rank == 0 and (not is_tty or not progress_bar)
        self._t = self._step = None

    def start(self, step: int) -> None:
        self._t, self._step = time.monotonic(), step
        if self.enabled:
            print(f"[{self.stage}] training from step {step} to {self.total} (a line every {self.every:g} s)", file=self.stream, flush=True)

    def update(self, step: int, metrics: dict[str, float], *, force: bool = False) -> None:
        """Called after every step; prints when ``every_seconds`` have passed since the last line (or ``force``)."""
        if not self.enabled or self._t is None:
            return
        now = time.monotonic()
        if not force and now - self._t < self.every:
            return
        done = step - self._step
        line = f"[{self.stage}] step {step}/{self.total} ({100 * step / self.total:.0f}%)"
        if done > 0:
            per_step = (now - self._t) / done
            line += f"  {per_step:.3g} s/step  ETA {format_seconds(per_step * max(0, self.total - step))}"
        for key in MAIN_METRICS.get(self.stage, ()):
            if key in metrics:
                line += f"  {key} {metrics[key]:.4g}"
        if metrics.get("data_skipped"):
            line += f"  data_skipped {int(metrics['data_skipped'])}"
        print(line, file=self.stream, flush=True)
        self._t, self._step = now, step

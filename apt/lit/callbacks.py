"""Callbacks: periodic atomic checkpoints keyed on the stage's own step count, and sample media."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from apt.checkpoint import list_checkpoints
from apt.media import save_samples


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


class PeriodicCheckpoint(L.Callback):
    """Save every N stage steps and at the end; keep the last ``keep`` (older ones are pruned)."""

    def __init__(self, run_dir: str, every: int, keep: int):
        self.run_dir, self.every, self.keep = run_dir, every, keep
        self._last_saved = -1

    def save(self, trainer: L.Trainer, module) -> None:
        step = module.progress_step
        if step == self._last_saved:
            return
        trainer.save_checkpoint(checkpoint_path(self.run_dir, step))
        self._last_saved = step
        if trainer.is_global_zero and self.keep > 0:
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                trainer.strategy.remove_checkpoint(old)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = module.progress_step
        if (self.every and step > 0 and step % self.every == 0) or module.done:
            self.save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.save(trainer, module)


class SampleMedia(L.Callback):
    """Every N stage steps (and at the end) write a PNG grid + GIF of the EMA network's samples of ``prompts``
    (none: nothing is written)."""

    def __init__(self, run_dir: str, every: int, prompts: list[str], *, steps: int, cfg_scale: float, fps: int = 8):
        self.dir = Path(run_dir) / "samples"
        self.every, self.prompts, self.steps, self.cfg_scale, self.fps = every, prompts, steps, cfg_scale, fps
        self._last = -1

    def write(self, module) -> None:
        """Rank 0 writes; the other ranks sample along only when the EMA is sharded (collective gathers)."""
        step = module.progress_step
        if not self.prompts or step == self._last or not (rank_zero_only.rank == 0 or module.samples_on_every_rank):
            return  # no prompts: the recipe names none (apt.train.sample_prompts warned)
        self._last = step
        x = module.generate(self.prompts, list(range(len(self.prompts))), steps=self.steps, cfg_scale=self.cfg_scale)
        if rank_zero_only.rank == 0:
            save_samples(x, self.dir / f"step-{step:06d}", fps=self.fps)
            (self.dir / "prompts.json").write_text(json.dumps(self.prompts, indent=1))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = module.progress_step
        if self.every and step > 0 and step % self.every == 0:
            self.write(module)

    def on_train_end(self, trainer, module) -> None:
        self.write(module)


class Throughput(L.Callback):
    """Log seconds per stage step (wall clock) to the progress bar and logger."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        module.log("sec_per_step", time.perf_counter() - self._t0, prog_bar=True)

"""Callbacks: periodic atomic checkpoints keyed on the stage's own step count, sample media, throughput,
progress lines for log files and the data-fault counts as metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from apt.checkpoint import checkpoints_to_prune
from apt.config import Config
from apt.data.faults import merge_snapshots
from apt.media import save_samples
from apt.progress import ProgressLog


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


class PeriodicCheckpoint(L.Callback):
    """Save every N stage steps and at the end; keep the last ``keep`` (older ones are pruned)."""

    def __init__(self, run_dir: str, every: int, keep: int):
        self.run_dir, self.every, self.keep = run_dir, every, keep
        self._last_saved: tuple[int, int] = (-1, -1)  # (stage step, batches consumed)

    def save(self, trainer: L.Trainer, module, *, force: bool = False) -> Path:
        """Collective. Once per stage step; ``force`` (a stop signal) also saves a step again when batches were
        consumed since its save (a D-only warm-up iteration of the APT stage)."""
        step, path = module.progress_step, checkpoint_path(self.run_dir, module.progress_step)
        if step == self._last_saved[0] and (not force or module.batches_consumed == self._last_saved[1]):
            return path
        trainer.save_checkpoint(path, weights_only=False)  # the full state (Lightning logs a line per save when not given)
        self._last_saved = (step, module.batches_consumed)
        if trainer.is_global_zero:
            for old in checkpoints_to_prune(self.run_dir, self.keep, step):
                trainer.strategy.remove_checkpoint(old)
        return path

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


class LogProgress(L.Callback):
    """``apt.progress.ProgressLog`` after every step: a line every ``train.progress_every_seconds`` in a log file."""

    def __init__(self, c: Config):
        self.c = c
        self.progress: ProgressLog | None = None

    def on_train_start(self, trainer, module) -> None:
        self.progress = ProgressLog(self.c.stage, self.c.train.max_steps, self.c.train.progress_every_seconds,
                                    progress_bar=self.c.train.progress_bar, rank=trainer.global_rank)
        self.progress.start(module.progress_step)

    def _metrics(self, trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.progress.update(module.progress_step, self._metrics(trainer))

    def on_train_end(self, trainer, module) -> None:
        self.progress.update(module.progress_step, self._metrics(trainer), force=True)


class DataFaultMetrics(L.Callback):
    """Log the skipped-sample counts that travel with the batches (``apt.data.faults``) as ``data_skipped`` and
    ``data_skipped_<reason>``, once anything was skipped. Each rank counts its own loader workers; the logger
    (rank 0) writes rank 0's."""

    def __init__(self) -> None:
        self.latest: dict = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = merge_snapshots(self.latest, batch)
        if metrics:
            module.log_dict(metrics, on_step=True, on_epoch=False)

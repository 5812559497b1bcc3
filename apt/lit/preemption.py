"""Pre-emption on the Trainer path (``apt.preemption`` has the rules): stop at a step boundary with a checkpoint.

Lightning's own SIGTERM handling is switched off for apt's Trainer: it logs "Received SIGTERM", makes a
collective call inside the signal handler and exits with status 0 without saving, so a scheduler saw a
success and up to ``train.ckpt_every_steps - 1`` steps were lost.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from apt.lit.callbacks import PeriodicCheckpoint
from apt.preemption import Preempted, agree_to_stop, signal_name


class _NoSignalHandlers(_SignalConnector):
    def register_signal_handlers(self) -> None:
        self.received_sigterm = False

    def teardown(self) -> None:
        pass


def without_lightning_signal_handlers(trainer: L.Trainer) -> L.Trainer:
    trainer._signal_connector = _NoSignalHandlers(trainer)
    return trainer


class StopOnSignal(L.Callback):
    """At every step boundary (every rank: ``agree_to_stop`` is collective): when any rank received a stop signal,
    every rank takes part in saving this step's checkpoint, then ``Preempted`` is raised."""

    def __init__(self, checkpoint: PeriodicCheckpoint, accumulate: int = 1):
        self.checkpoint, self.accumulate = checkpoint, accumulate

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.automatic_optimization and module.batches_consumed % self.accumulate:
            return  # inside an accumulation window: gradients are not checkpointed, stop at its end
        signum = agree_to_stop(trainer.strategy.root_device)
        if not signum:
            return
        path = self.checkpoint.save(trainer, module, force=True)
        raise Preempted(signum, f"stopped by {signal_name(signum)} after step {module.progress_step} of {module.config.train.max_steps}: "
                                f"checkpoint {path} written")

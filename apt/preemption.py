"""Pre-emption: SIGTERM / SIGUSR1 / SIGINT stop a run at the next step boundary, with a checkpoint.

A scheduler's pre-emption (SLURM, Kubernetes), ``timeout`` and Ctrl-C send one of these signals. While a
``PreemptionGuard`` is active (``apt.train.fit``), the first one only records the signal; at the end of
the current step every runner asks ``agree_to_stop`` (a MAX all-reduce, so a signal that reached one rank
stops them all at the same step), every rank takes part in writing that step's checkpoint, and the run
raises ``Preempted``. The CLI prints one line with the command that resumes the run and exits with
128 + the signal number (143 for SIGTERM), so a scheduler sees a failure, not a success.

A second signal exits at once (``os._exit``, same code, no checkpoint). One that arrives within
``DUPLICATE_S`` of the first counts as the same request: launchers (torchrun, srun) forward a signal that
the processes of the job step may also have received directly.

Nothing here imports Lightning: the Trainer path (``apt.lit.preemption``) and the DeepSpeed runner share it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Self

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DUPLICATE_S = 1.0


class Preempted(Exception):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class PreemptionGuard:
    """Context manager installing the handlers above (main thread only); restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        global _active
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        _active = None

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            print(f"received {signal_name(signum)}: stopping after the current step with a checkpoint "
                  "(send it again to stop at once, without one)", file=sys.stderr, flush=True)
            return
        if now - self._first_at < DUPLICATE_S:
            return  # the same request, forwarded by a launcher
        print(f"received {signal_name(signum)} again: exiting now, without a checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)


_active: PreemptionGuard | None = None


def requested_signal() -> int | None:
    """The signal this process received while a guard is active (None: none, or no guard)."""
    return _active.signum if _active is not None else None


def agree_to_stop(device=None) -> int:
    """Collective when a process group is initialised: the largest signal number any rank received (0 = go on).

    Call it at every step boundary on every rank."""
    import torch
    import torch.distributed as dist

    signum = requested_signal() or 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([signum], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum = int(t.item())
    return signum


def stop_if_requested(where: str) -> None:
    """Raise ``Preempted`` now when a signal was received; for loops that never reach a step boundary
    (a data loader skipping corrupt samples)."""
    signum = requested_signal()
    if signum:
        raise Preempted(signum, f"stopped by {signal_name(signum)} {where}; no checkpoint was written after the last one")

"""``python -m apt fit ...`` with one fault injected, for tests/test_faults.py.

    python tests/distributed_helpers/fit_fault.py FAULT STEP fit RECIPE ... key=value

FAULT, at stage step STEP (1-based: the step being computed, or the checkpoint of that step being saved; in
the APT stage a step is a generator update, under every runner):

    kill          SIGKILL inside the step (before its loss)
    SIGTERM | SIGUSR1 | SIGINT
                  that signal sent to this process inside the step; the step goes on
    SIGTERM-twice SIGTERM inside the step, again 1.5 s later (past the duplicate window), still inside it
    SIGTERM-rank1 SIGTERM to rank 1 only (a launched multi-rank run)
    kill-in-save  SIGKILL while the checkpoint of STEP is written: its files are in the temporary directory,
                  its checksums are not
    disk-full     the checkpoint of STEP fails as on a full disk (OSError ENOSPC) after its first file
    nan           the loss of STEP is NaN
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

import apt.checkpoint  # noqa: E402
import apt.lit.checkpoint_io  # noqa: E402
from apt.cli import main  # noqa: E402
from apt.lit.apt import AptModule  # noqa: E402
from apt.lit.base import EmaNetModule  # noqa: E402

fault, at = sys.argv[1], int(sys.argv[2])
step_name = f"step-{at:06d}"
training_step, apt_run_step = EmaNetModule.training_step, AptModule.run_step


def inject(module) -> None:
    """The faults that happen inside a step, before its loss."""
    if module.progress_step + 1 != at:  # not the step being computed
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault in ("SIGTERM", "SIGUSR1", "SIGINT"):
        os.kill(os.getpid(), getattr(signal, fault))
    elif fault == "SIGTERM-twice":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # never reached: the second signal exits
    elif fault == "SIGTERM-rank1" and rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def faulty_apt_step(self, *args, **kwargs):
    inject(self)
    return apt_run_step(self, *args, **kwargs)


def faulty_step(self, batch, batch_idx):
    inject(self)
    if fault == "nan" and self.progress_step + 1 == at:
        part_loss = self.part_loss
        self.part_loss = lambda part: part_loss(part) * float("nan")
    return training_step(self, batch, batch_idx)


write_checksums = apt.checkpoint.write_checksums


def checksums_or_die(tmp: Path) -> None:
    if fault == "kill-in-save" and Path(tmp).name.startswith(f".{step_name}.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    write_checksums(tmp)


save_weights = apt.lit.checkpoint_io.save_weights


def save_weights_or_fill_disk(state_dict, path) -> None:
    if fault == "disk-full" and Path(path).parent.name.startswith(f".{step_name}.tmp") and any(Path(path).parent.iterdir()):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    save_weights(state_dict, path)


EmaNetModule.training_step = faulty_step
AptModule.run_step = faulty_apt_step
apt.checkpoint.write_checksums = checksums_or_die
apt.lit.checkpoint_io.save_weights = save_weights_or_fill_disk
sys.exit(main(sys.argv[3:]))

"""``python -m apt fit ...`` that dies like a SIGKILL while writing the checkpoint of step N.

    torchrun --nproc_per_node 2 tests/distributed_helpers/fit_die.py N fit RECIPE ... key=value

Every rank has written its engine shards into ``.step-N.tmp``; rank 0 exits (os._exit, no cleanup)
just before it would publish the directory, and torchrun then stops the other ranks. The previous
checkpoint must stay the latest, loadable one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from apt.cli import main  # noqa: E402
from apt.distributed import sharded_checkpoint  # noqa: E402

die_at = int(sys.argv[1])
publish = sharded_checkpoint.publish_dir


def publish_or_die(tmp: Path, final: Path) -> None:
    if tmp.name == f".step-{die_at:06d}.tmp":
        os._exit(137)
    publish(tmp, final)


sharded_checkpoint.publish_dir = publish_or_die
sys.exit(main(sys.argv[2:]))

"""What the sequence-parallel helpers share: run a comparison in a gloo group, close it, write the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from apt.distributed.process_group import close_process_group, gloo_worker_threads, import_before_init


def run_and_report(compare: Callable[[], dict], out: str, *, deepspeed: bool = False) -> None:
    """``compare()`` on every rank of a new gloo group; rank 0 writes its report to ``out`` (JSON) and prints it.

    The report gains ``gloo_threads_after_close``: 0 when the group was freed and its threads joined before exit
    (``compare`` returns, so the networks and attention wrappers that hold the group are freed first).
    """
    import_before_init(deepspeed=deepspeed)
    dist.init_process_group("gloo")
    report = compare()
    rank = dist.get_rank()
    close_process_group()
    report["gloo_threads_after_close"] = gloo_worker_threads()
    if rank == 0:
        Path(out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report))

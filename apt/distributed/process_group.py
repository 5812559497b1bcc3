"""The launched process group's lifetime: what to import before it exists, and how to close it.

A gloo process group's worker threads are joined only when the group object is freed. Two modules bind the
world group as a default argument when they are imported: ``torch.distributed.nn.functional``
(``group=group.WORLD``, imported by ``torch._dynamo`` and so by Lightning, FSDP and DeepSpeed) and DeepSpeed's
``TorchBackend.barrier``. Imported after ``init_process_group``, each keeps the group alive past
``destroy_process_group``; its threads then run into interpreter shutdown, and when one of them releases a
finished collective's tensor there it aborts a rank that has already finished and saved ("terminate called
without an active exception", exit -6; 5 of 100 two-rank runs of a minimal gloo script here). Imported first,
they bind ``None``, the group is freed by ``destroy_process_group`` and its threads are joined before exit.
"""

from __future__ import annotations

import gc
import os
import time


def import_before_init(*, deepspeed: bool = False) -> None:
    """Import the modules that bind the world group as a default; call before the process group is created.

    ``deepspeed``: the run will talk through ``deepspeed.comm`` (ZeRO, Ulysses). Only then, since importing it costs
    a third of a second and, on a machine without an accelerator, a DeepSpeed warning.
    """
    import torch.distributed.nn  # noqa: F401

    if deepspeed:
        import deepspeed.comm  # noqa: F401


def skip_deepspeed_inference_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when its comm backend starts on CPU; call before
    ``deepspeed.init_distributed``.

    On the CPU accelerator DeepSpeed's torch backend JIT-builds ``deepspeed_shm_comm`` (C++ with OpenMP: 52 s on this
    project's 2-core machine, and a compiler the user must have) the first time a process group starts. The op serves
    ``inference_all_reduce`` only (DeepSpeed's tensor-parallel inference); training's collectives go through
    ``torch.distributed`` (gloo) with or without it. The backend builds it only if ``deepspeed.ops.__compatible_ops__``,
    probed once per process and kept as one dict, marks it compatible, so it is marked incompatible here. On an
    accelerator with no such op (CUDA) nothing changes.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def close_process_group() -> None:
    """Destroy the launched process group before the interpreter exits.

    The barrier first: a rank that reached the end early (others still writing) aborted so once in a test
    helper's teardown. Then a garbage collection, so that modules in reference cycles (a Lightning module and its
    trainer) no longer hold a group. A group something still holds (DTensor's caches under FSDP2, DeepSpeed's
    engines) keeps its threads; a short sleep, with the GIL released, lets one still releasing the barrier's work
    finish before interpreter shutdown. Called on success only, when every rank got here.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        if gloo_worker_threads():
            time.sleep(0.2)


def gloo_worker_threads() -> int | None:
    """How many of this process's threads are gloo workers (``pt_gloo_runloop``); None where /proc is missing."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:  # the thread ended while we looked
            pass
    return count

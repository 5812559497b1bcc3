"""Sharded checkpoints of the DeepSpeed runner: one DeepSpeed checkpoint per engine, plus apt's state.

Layout of ``RUN/checkpoints/step-000200/``::

    generator_engine/checkpoint/       DeepSpeed: G's weights and ZeRO optimiser partitions (a file per rank)
    discriminator_engine/checkpoint/   the same for D
    fake_score_engine/checkpoint/      the same for a streaming run's fake score (distribution matching), if any
    generator_ema.safetensors          the EMA generator, whole (``apt sample`` reads it as it is); ZeRO-1/2
    generator_ema_partitions/          ZeRO-3 instead: ``rank-00000.safetensors``... (this rank's partitions,
                                       ``apt.distributed.zero3_ema``), ``buffers.safetensors``, ``layout.json``
    trainer_state.pt                   rng, data position, update counts; strategy and world size
    config.yaml                        the resolved config
    checksums.json                     size and sha256 of every other file (``apt.checkpoint``), written last

Atomic across ranks: every rank writes into ``.step-000200.tmp``; after a barrier rank 0 makes the
files durable and renames the directory into place (``apt.checkpoint.atomic_write_dir``'s rule), so a
kill during a save leaves the previous checkpoint loadable and never a partial one under a final name.
Ranks must share the run directory's filesystem. ``apt.distributed.consolidate`` turns this layout
into the standard one (single safetensors per network, the EMA's partitions joined).

Loading verifies ``checksums.json`` first and reads nothing with pickle: apt's trainer state with
``torch.load(weights_only=True)``, and DeepSpeed's own shard files through the engines' checkpoint
engine switched to ``weights_only=True`` with an allow-list of the three DeepSpeed classes its ZeRO
optimiser states hold (``DEEPSPEED_SAFE_GLOBALS``; DeepSpeed itself unpickles them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from apt.checkpoint import (
    STATE_FILE,
    CheckpointError,
    checkpoints_to_prune,
    load_safetensors,
    load_trainer_state,
    publish_dir,
    save_weights,
    verify_checkpoint,
    write_checksums,
)
from apt.config import ConfigError, to_yaml

TAG = "checkpoint"
ENGINES = ("generator", "discriminator")
"""The engines every checkpoint of this runner has; ``FAKE_SCORE`` too when the run trains one."""
FAKE_SCORE = "fake_score"
EMA_FILE = "generator_ema.safetensors"
EMA_PARTITIONS = "generator_ema_partitions"


def ema_partition_file(path: str | Path, rank: int) -> Path:
    return Path(path) / EMA_PARTITIONS / f"rank-{rank:05d}.safetensors"


def engine_dir(path: str | Path, name: str) -> Path:
    return Path(path) / f"{name}_engine"


def is_sharded(path: str | Path) -> bool:
    return all(engine_dir(path, n).is_dir() for n in ENGINES)


def module_engines(module) -> tuple[str, ...]:
    """The engines of ``module`` a checkpoint holds: G, D and a streaming run's fake score."""
    return ENGINES + ((FAKE_SCORE,) if getattr(module, FAKE_SCORE, None) is not None else ())


def saved_engines(path: str | Path) -> tuple[str, ...]:
    """The engines a sharded checkpoint holds."""
    return ENGINES + ((FAKE_SCORE,) if engine_dir(path, FAKE_SCORE).is_dir() else ())


def save(fabric, path: str | Path, module, *, keep: int = 0) -> None:
    """Collective: every rank writes its shards of every engine; rank 0 the rest, then publishes."""
    final = Path(fabric.broadcast(str(path)))
    tmp = final.parent / f".{final.name}.tmp"
    if fabric.is_global_zero:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        tmp.mkdir(parents=True)
        if module.ema_partitions is not None:
            (tmp / EMA_PARTITIONS).mkdir()
    fabric.barrier()
    for name in module_engines(module):
        engine = getattr(module, name)._forward_module
        engine.save_checkpoint(str(engine_dir(tmp, name)), tag=TAG, save_latest=False)
    if module.ema_partitions is not None:  # ZeRO-3: each rank its own partitions, never the whole EMA
        save_weights(module.ema_partitions.state_dict(), ema_partition_file(tmp, fabric.global_rank))
    if fabric.is_global_zero:
        if module.ema_partitions is None:
            save_weights(module.generator_ema.state_dict(), tmp / EMA_FILE)
        else:
            params = set(module.ema_partitions.names)
            buffers = {k: v for k, v in module.generator_ema.state_dict().items() if k not in params}  # whole under ZeRO-3
            save_weights(buffers, tmp / EMA_PARTITIONS / "buffers.safetensors")
            layout = {**module.ema_partitions.layout(), "world_size": fabric.world_size}
            (tmp / EMA_PARTITIONS / "layout.json").write_text(json.dumps(layout, indent=1))
        state = {
            "apt": {"rng": module.rng.get_state(), "batches_consumed": module.batches_consumed, **module.extra_state()},
            "sharded": {"strategy": module.config.train.strategy, "world_size": fabric.world_size},
        }
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(to_yaml(module.config))
    fabric.barrier()  # every rank's shards are written
    if fabric.is_global_zero:
        write_checksums(tmp)
        publish_dir(tmp, final)
        for stale in checkpoints_to_prune(final.parent.parent, keep, module.progress_step):
            shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()


def deepspeed_safe_globals() -> list:
    """What DeepSpeed 0.19's ZeRO optimiser states hold besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``): an enum, a dataclass, the loss scaler's state."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


def load_without_pickle(path: str, map_location=None):
    """The engines' checkpoint-engine ``load``: ``weights_only=True`` with the allow-list above."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - objects outside the allow-list, or a damaged file
        raise CheckpointError(f"{path} cannot be read without pickle ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load(fabric, path: str | Path, module) -> None:
    """Restore every engine (weights + optimiser partitions), the EMA, rng, data position and counters."""
    path = Path(path)
    if not is_sharded(path):
        raise ConfigError(
            f"resume: {path} is not a DeepSpeed checkpoint of this runner (no generator_engine/ and "
            "discriminator_engine/); checkpoints of other strategies cannot resume a ZeRO run"
        )
    verify_checkpoint(path)
    state = load_trainer_state(path)
    saved_world = state["sharded"]["world_size"]
    if saved_world != fabric.world_size:
        raise ConfigError(
            f"resume: {path} was written by {saved_world} ranks, this run has {fabric.world_size}; ZeRO partitions "
            "need the same world size (consolidate it with `python -m apt consolidate` to start a new run from its weights)"
        )
    if saved_engines(path) != module_engines(module):
        raise ConfigError(f"resume: {path} holds the engines {', '.join(saved_engines(path))}, this run trains "
                          f"{', '.join(module_engines(module))} (stream.dmd_weight must be on in both or in neither)")
    for name in module_engines(module):
        engine = getattr(module, name)._forward_module
        engine.checkpoint_engine.load = load_without_pickle  # DeepSpeed's default load unpickles any object
        load_path, _ = engine.load_checkpoint(str(engine_dir(path, name)), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {engine_dir(path, name)}")
    if module.ema_partitions is None:
        if not (path / EMA_FILE).exists():
            raise ConfigError(f"resume: {path} has no {EMA_FILE} (a ZeRO-3 checkpoint resumes only under deepspeed_stage_3)")
        module.generator_ema.load_state_dict(load_safetensors(path / EMA_FILE))
    else:
        if not (path / EMA_PARTITIONS).is_dir():
            raise ConfigError(f"resume: {path} has no {EMA_PARTITIONS}/ (not a ZeRO-3 checkpoint; resume it with its own strategy)")
        module.ema_partitions.load_state_dict(load_safetensors(ema_partition_file(path, fabric.global_rank)))
        module.generator_ema.load_state_dict(load_safetensors(path / EMA_PARTITIONS / "buffers.safetensors"), strict=False)
    module.rng.set_state(state["apt"]["rng"])
    module.batches_consumed = state["apt"]["batches_consumed"]
    module.load_extra_state(state["apt"])

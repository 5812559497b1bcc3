"""Consolidate a sharded (DeepSpeed) checkpoint into the standard layout, one process, no GPU.

    python -m apt consolidate RUN_OR_CHECKPOINT [--out DIR]

Writes ``generator.safetensors``, ``generator_ema.safetensors``, ``discriminator.safetensors`` (a streaming run's
``fake_score.safetensors`` too; fp32, from the ZeRO optimiser's master weights via DeepSpeed's ``zero_to_fp32``) and
``config.yaml`` to DIR (default ``RUN/consolidated/step-N``), atomically; ``apt.inference.load_generator(DIR)`` reads
it and it can seed a later stage (``apt.generator=DIR``). Optimiser states are not carried over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from apt.checkpoint import atomic_write_dir, latest_checkpoint, save_weights
from apt.distributed.sharded_checkpoint import (
    EMA_FILE,
    EMA_PARTITIONS,
    TAG,
    ema_partition_file,
    engine_dir,
    is_sharded,
    saved_engines,
)
from apt.distributed.zero3_ema import join_partitions


def resolve_sharded(path: str | Path) -> Path:
    p = Path(path)
    if is_sharded(p):
        return p
    latest = latest_checkpoint(p)
    if latest is not None and is_sharded(latest):
        return latest
    raise FileNotFoundError(f"{path} is neither a sharded checkpoint (generator_engine/ + discriminator_engine/) nor a run whose latest checkpoint is one")


def ema_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The whole EMA generator of a sharded checkpoint: its file (ZeRO-1/2), or its partitions joined (ZeRO-3)."""
    src = Path(checkpoint)
    if (src / EMA_FILE).exists():
        return load_file(str(src / EMA_FILE))
    layout = json.loads((src / EMA_PARTITIONS / "layout.json").read_text())
    ranks = [load_file(str(ema_partition_file(src, r))) for r in range(layout["world_size"])]
    return {**join_partitions(layout, ranks), **load_file(str(src / EMA_PARTITIONS / "buffers.safetensors"))}


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the standard layout of the sharded checkpoint at ``path`` (or a run's latest); returns DIR."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = resolve_sharded(path)
    out = Path(out) if out is not None else src.parent.parent / "consolidated" / src.name
    weights = {name: get_fp32_state_dict_from_zero_checkpoint(str(engine_dir(src, name)), tag=TAG) for name in saved_engines(src)}
    weights["generator_ema"] = ema_state_dict(src)

    def write(tmp: Path) -> None:
        for name, state_dict in weights.items():
            save_weights(state_dict, tmp / f"{name}.safetensors")
        shutil.copyfile(src / "config.yaml", tmp / "config.yaml")

    atomic_write_dir(out, write)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apt consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="sharded checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/consolidated/step-N)")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.checkpoint, args.out))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

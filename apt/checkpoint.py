"""Checkpoints: one directory per save, weights as safetensors, the rest as a torch file.

Layout of ``RUN/checkpoints/step-000200/``::

    <net>.safetensors    one file per top-level submodule (net, net_ema, generator, discriminator, ...)
    trainer_state.pt     optimiser states, loop progress, RNG and data position (Lightning's dict)
    config.yaml          the resolved config of the run

Lightning writes it through ``apt.lit.checkpoint_io.SafetensorsCheckpointIO``; this module, which
sampling and export read through, imports no Lightning.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place,
so a crash or kill during a save leaves the previous checkpoints intact and never a half-written
one under a final name.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def atomic_write_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``final`` (replacing an existing one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Make every file under ``tmp`` durable, then rename it to ``final`` (replacing an existing one).

    Until the last rename, ``final`` is either the previous complete checkpoint or absent."""
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path))


def split_by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        groups.setdefault(head, {})[rest] = v
    return groups


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_weights_dir(path: str | Path, name: str) -> Path:
    """A directory holding ``<name>.safetensors``: the path itself, or the latest checkpoint of a run."""
    p = Path(path)
    if (p / f"{name}.safetensors").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is not None and (latest / f"{name}.safetensors").exists():
        return latest
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for d in (p, latest):
        if d is not None and (d / f"{name}_partitions").is_dir():  # apt.distributed.sharded_checkpoint, ZeRO-3
            raise FileNotFoundError(f"{d} holds {name} as per-rank ZeRO-3 partitions; `python -m apt consolidate {d}` writes the whole {name}.safetensors")
    raise FileNotFoundError(f"no {name}.safetensors in {path} (nor in its latest checkpoint)")


def load_weights(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Weights of one network (e.g. 'net_ema', 'generator_ema') from a checkpoint dir or run dir."""
    return load_file(str(resolve_weights_dir(path, name) / f"{name}.safetensors"))

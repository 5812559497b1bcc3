"""Lightning's checkpoint IO writing apt's checkpoint layout (``apt.checkpoint``), atomically, with checksums;
reading verifies the files first and loads the trainer state without pickle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from apt.checkpoint import (
    STATE_FILE,
    atomic_write_dir,
    load_safetensors,
    load_trainer_state,
    save_weights,
    split_by_module,
    verify_checkpoint,
)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO writing the directory layout above, atomically."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        checkpoint = dict(checkpoint)
        state_dict = checkpoint.pop("state_dict", {})
        config_yaml = checkpoint.pop("apt_config_yaml", None)

        def write(tmp: Path) -> None:
            for name, sd in split_by_module(state_dict).items():
                save_weights(sd, tmp / f"{name}.safetensors")
            torch.save(checkpoint, tmp / STATE_FILE)
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)

        atomic_write_dir(Path(path), write)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"not a checkpoint directory (no {STATE_FILE}): {path}")
        verify_checkpoint(path)
        checkpoint = load_trainer_state(path, map_location=map_location or "cpu")
        state_dict = {}
        for f in sorted(path.glob("*.safetensors")):
            for k, v in load_safetensors(f).items():
                state_dict[f"{f.stem}.{k}"] = v
        checkpoint["state_dict"] = state_dict
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)

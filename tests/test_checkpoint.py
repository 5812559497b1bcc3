"""Checkpoint files: checksums written last and verified, structure checks without them, temporaries of killed
saves, pruning (``apt.checkpoint``). The same under real faults: tests/test_faults.py."""

from __future__ import annotations

import json

import pytest
import torch

from apt.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    atomic_write_dir,
    checkpoints_to_prune,
    clean_stale_temporaries,
    load_weights,
    save_weights,
    verify_checkpoint,
    write_checksums,
)


def _write(tmp) -> None:
    save_weights({"w": torch.arange(64, dtype=torch.float32)}, tmp / "net.safetensors")
    torch.save({"step": 3}, tmp / "trainer_state.pt")


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "step-000003"
    atomic_write_dir(path, _write)
    return path


def test_checksums_are_written_last_and_list_every_file(ckpt):
    files = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    assert sorted(files) == ["net.safetensors", "trainer_state.pt"]
    assert files["net.safetensors"]["bytes"] == (ckpt / "net.safetensors").stat().st_size and len(files["net.safetensors"]["sha256"]) == 64
    verify_checkpoint(ckpt)
    assert torch.equal(load_weights(ckpt, "net")["w"], torch.arange(64, dtype=torch.float32))


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"net.safetensors has \d+ bytes, \d+ were written \(cut short"),
    ("flip", r"net.safetensors does not match its sha256 in checksums.json"),
    ("delete", r"net.safetensors is missing \(listed in checksums.json\)"),
])
def test_a_damaged_file_is_named(ckpt, damage, message):
    f = ckpt / "net.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[:-10])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(ckpt)
    if damage != "delete":
        with pytest.raises(CheckpointError, match=message):
            load_weights(ckpt, "net")  # sample, export and every weights read go through here


def test_without_checksums_the_structure_is_checked(ckpt):
    (ckpt / CHECKSUMS).unlink()
    verify_checkpoint(ckpt)
    f = ckpt / "net.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"net.safetensors has \d+ bytes but its header describes \d+"):
        load_weights(ckpt, "net")


def test_a_failed_write_leaves_no_temporary_and_the_previous_copy(ckpt):
    def broken(tmp):
        _write(tmp)
        raise OSError(28, "No space left on device")

    with pytest.raises(Exception, match="was not written .*No space left on device.*the checkpoints saved before it are untouched"):
        atomic_write_dir(ckpt, broken)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-000003"]
    verify_checkpoint(ckpt)


def test_temporaries_of_killed_saves(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("step-000002", ".step-000002.old-11", ".step-000003.old-12", ".step-000004.tmp-13", ".step-000005.tmp"):
        (ckpts / name).mkdir(parents=True)
    lines = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]  # step 3 put back: its new copy never arrived
    assert len(lines) == 4 and any(line.startswith(f"restored {ckpts / 'step-000003'}") for line in lines)


def test_pruning_keeps_the_newest_up_to_the_saved_step(tmp_path):
    """A run resumed from step 2 past a broken step 5 prunes among steps <= the one it saved, never the new one."""
    for step in (1, 2, 3, 5):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        torch.save({}, tmp_path / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt")
    assert [p.name for p in checkpoints_to_prune(tmp_path, 1, 3)] == ["step-000001", "step-000002"]
    assert checkpoints_to_prune(tmp_path, 0, 3) == []


@pytest.mark.parametrize("saved_fake, run_fake", [(True, False), (False, True)])
def test_a_zero_checkpoint_resumes_only_a_run_with_the_same_engines(tmp_path, saved_fake, run_fake):
    """A streaming ZeRO run with distribution matching saves a third engine (the fake score): resuming it without one,
    or a checkpoint without one into a run that trains one, is refused before any engine loads, naming both sets."""
    from types import SimpleNamespace

    from apt.config import ConfigError
    from apt.distributed import sharded_checkpoint

    ckpt = tmp_path / "step-000002"
    for name in ("generator", "discriminator", *(("fake_score",) if saved_fake else ())):
        (sharded_checkpoint.engine_dir(ckpt, name) / "checkpoint").mkdir(parents=True)
    torch.save({"apt": {}, "sharded": {"strategy": "deepspeed_stage_2", "world_size": 2}}, ckpt / "trainer_state.pt")
    write_checksums(ckpt)
    untouched = SimpleNamespace(_forward_module=None)  # an engine the check must not reach
    module = SimpleNamespace(generator=untouched, discriminator=untouched, fake_score=untouched if run_fake else None)
    saved = "generator, discriminator" + (", fake_score" if saved_fake else "")
    trained = "generator, discriminator" + (", fake_score" if run_fake else "")
    with pytest.raises(ConfigError, match=f"holds the engines {saved}, this run trains {trained}"):
        sharded_checkpoint.load(SimpleNamespace(world_size=2), ckpt, module)

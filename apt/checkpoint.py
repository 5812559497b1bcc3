"""Checkpoints: one directory per save, weights as safetensors, the rest as a torch file.

Layout of ``RUN/checkpoints/step-000200/``::

    <net>.safetensors    one file per top-level submodule (net, net_ema, generator, discriminator, ...)
    trainer_state.pt     optimiser states, loop progress, RNG and data position (Lightning's dict)
    config.yaml          the resolved config of the run
    checksums.json       size and sha256 of every other file, written last

Lightning writes it through ``apt.lit.checkpoint_io.SafetensorsCheckpointIO``; this module, which
sampling and export read through, imports no Lightning.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place,
so a crash or kill during a save leaves the previous checkpoints intact and never a half-written
one under a final name; a temporary left by a kill is removed when the next run starts
(``clean_stale_temporaries``).

Reads are verified: ``verify_checkpoint`` compares every file with ``checksums.json`` (a file cut
short by a full disk or an interrupted copy, or changed since) and raises ``CheckpointError``
naming the file. Directories written before checksums existed (and weights-only directories such
as a shipped teacher) get a structural check instead: a safetensors file must be as long as its
header says, a torch file must be a complete zip. The trainer state is read with
``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from apt.errors import RunFailure

STATE_FILE = "trainer_state.pt"
CHECKSUMS = "checksums.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_RE = re.compile(r"^\.(.+)\.(tmp|old)(-\d+)?$")  # atomic_write_dir's and sharded_checkpoint's temporaries


class CheckpointError(ValueError):
    """A checkpoint (or weights file) that cannot be used; the message names the file and what is wrong."""


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written (disk full, permissions); the checkpoints written before are untouched."""


def atomic_write_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)``, add ``checksums.json``, then rename tmp_dir to ``final`` (replacing an existing one).

    A failed write (an ``OSError`` such as a full disk) removes the temporary and raises ``CheckpointWriteError``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        write_checksums(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not also keep the partial files
        if isinstance(e, OSError):
            raise CheckpointWriteError(f"checkpoint {final} was not written ({e}); the checkpoints saved before it are untouched") from None
        raise
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


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(ckpt_dir: str | Path) -> None:
    """Write ``checksums.json``: size and sha256 of every file under ``ckpt_dir`` (call it last)."""
    root = Path(ckpt_dir)
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        files[f.relative_to(root).as_posix()] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    (root / CHECKSUMS).write_text(json.dumps({"format": 1, "files": files}, indent=1))


_verified: set[tuple[str, int]] = set()  # (checkpoint, mtime of its checksums.json) verified by this process


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Check every file of a checkpoint against its ``checksums.json`` (sizes, then sha256); without one, the
    structure of its safetensors and torch files. Raises ``CheckpointError`` naming the first bad file.

    Reads every file once (sha256); a process verifies a checkpoint once."""
    root = Path(ckpt_dir)
    sums = root / CHECKSUMS
    if not sums.exists():
        for f in sorted(root.rglob("*")):
            if f.is_file():
                check_structure(f)
        return
    key = (str(root.resolve()), sums.stat().st_mtime_ns)
    if key in _verified:
        return
    try:
        files = json.loads(sums.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{sums}: unreadable ({type(e).__name__}: {e}); the checkpoint cannot be verified") from None
    for name, want in files.items():
        verify_file(root / name, want)
    _verified.add(key)


def verify_file(path: Path, want: dict) -> None:
    """One file against its entry in ``checksums.json``."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing (listed in {CHECKSUMS})")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes, {want['bytes']} were written (cut short: a full disk or an interrupted copy)"
                              if size < want["bytes"] else f"{path} has {size} bytes, {want['bytes']} were written (changed since it was saved)")
    if file_sha256(path) != want["sha256"]:
        raise CheckpointError(f"{path} does not match its sha256 in {CHECKSUMS} (damaged or changed since it was saved)")


def _checksum_entry(path: Path) -> dict | None:
    sums = path.parent / CHECKSUMS
    if not sums.exists():
        return None
    try:
        return json.loads(sums.read_text())["files"].get(path.name)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{sums}: unreadable ({type(e).__name__}: {e}); {path.name} cannot be verified") from None


def check_structure(path: Path) -> None:
    """Without checksums: a safetensors file must be as long as its header says, a torch file a complete zip."""
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size:
                    raise ValueError(f"header of {n} bytes in a {size}-byte file")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is damaged or cut short") from None
        if size != 8 + n + end:
            raise CheckpointError(f"{path} has {size} bytes but its header describes {8 + n + end} (cut short: a full disk or an interrupted copy)")
    elif path.suffix == ".pt":
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path} is not a complete torch file ({e}); it is damaged or cut short") from None


def load_trainer_state(ckpt_dir: str | Path, map_location="cpu") -> dict:
    """The trainer state of a checkpoint, without pickle (``weights_only=True``: tensors and plain containers)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"not a checkpoint directory (no {STATE_FILE}): {ckpt_dir}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged zip, or objects outside the allow-list
        raise CheckpointError(f"{path} cannot be read without pickle ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def clean_stale_temporaries(run_dir: str | Path) -> list[str]:
    """Remove the temporaries a killed save left in ``RUN/checkpoints``; returns one line per action.

    ``.step-N.tmp*`` (a save that never finished) is removed. ``.step-N.old-PID`` is the previous copy of a
    checkpoint that was being replaced: it is put back when the kill came before the new copy took its
    place, else removed."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    actions = []
    for p in sorted(ckpt_dir.glob(".*")) if ckpt_dir.is_dir() else []:
        m = _TEMP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        final = ckpt_dir / m.group(1)
        if m.group(2) == "old" and not final.exists():
            os.replace(p, final)
            actions.append(f"restored {final} from {p.name} (a save replacing it was killed)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed {p} (left by a save that was killed)")
    return actions


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


def checkpoint_step(path: str | Path) -> int:
    return int(_STEP_RE.match(Path(path).name).group(1))


def checkpoints_to_prune(run_dir: str | Path, keep: int, step: int) -> list[Path]:
    """After saving ``step``: the checkpoints beyond the newest ``keep`` up to ``step`` (0 = keep all). Those after
    ``step`` (left by a run resumed from an earlier one) are not counted nor removed: the save at their step replaces them."""
    upto = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step]
    return upto[:-keep] if keep > 0 else []


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
    """Weights of one network (e.g. 'net_ema', 'generator_ema') from a checkpoint dir or run dir, verified
    against the directory's ``checksums.json`` when it has one; a bad file raises ``CheckpointError`` naming it."""
    return load_safetensors(resolve_weights_dir(path, name) / f"{name}.safetensors")


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, verified first (its entry in the sibling ``checksums.json``, else its structure)."""
    path = Path(path)
    entry = _checksum_entry(path)
    if entry is None:
        check_structure(path)
    else:
        verify_file(path, entry)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None

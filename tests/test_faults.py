"""Fault injection: what a long run meets on a bad night, and what the user sees.

Each fault runs a tiny teacher fit (2-4 steps) in a subprocess with a clean environment and a timeout
(``tests/distributed_helpers/fit_fault.py`` injects it at a given step; torchrun for the two-rank case),
then the test checks the exit status, the one line the user reads, and that no finished checkpoint was
lost: every checkpoint left verifies (``apt.checkpoint.verify_checkpoint``) and a run resumed from them
ends with the weights of an uninterrupted run. Follow-up steps that need no fresh process (resuming,
sampling a damaged checkpoint) run in this process. docs/reliability.md lists each promise with its test.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from apt.checkpoint import list_checkpoints, verify_checkpoint
from apt.cli import main
from tests.multiprocess import HELPERS, REPO, clean_env, launch

pytestmark = pytest.mark.multiprocess

FAULT = str(HELPERS / "fit_fault.py")


def teacher_args(run: Path, shards: str, *extra: str) -> list[str]:
    return ["fit", "recipes/demo/teacher.yaml", "tiny", f"run_dir={run}", f"data.shards={shards}", "data.image_shards=", *extra]


def fault_run(fault: str, step: int, run: Path, shards: str, *extra: str, nproc: int = 0) -> subprocess.CompletedProcess:
    return launch([FAULT, fault, str(step), *teacher_args(run, shards, *extra)], nproc=nproc, timeout=150)


def names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def intact(run: Path) -> list[str]:
    """The checkpoint names of a run, each verified; no temporary left beside them."""
    for ckpt in list_checkpoints(run):
        verify_checkpoint(ckpt)
    return names(run)


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob(".*"))


def last_line(out: str) -> str:
    return [line for line in out.strip().splitlines() if line.strip()][-1]


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("net", "net_ema"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (a, b, name)


@pytest.fixture(scope="module")
def reference(toy_shards, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run, every step checkpointed and kept."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(teacher_args(run, toy_shards["video"], "train.max_steps=3", "train.keep_checkpoints=0")) == 0
    return run


def resume(run: Path, shards: str, *extra: str) -> None:
    assert main(teacher_args(run, shards, "train.max_steps=3", "resume=auto", *extra)) == 0


# -- kills --------------------------------------------------------------------------------------


def test_kill_9_mid_step_loses_no_finished_checkpoint(reference, toy_shards, tmp_path):
    run = tmp_path / "run"
    result = fault_run("kill", 3, run, toy_shards["video"], "train.max_steps=3")
    assert result.returncode == -signal.SIGKILL
    assert intact(run) == ["step-000001", "step-000002"] and temporaries(run) == []
    resume(run, toy_shards["video"])
    assert_same_weights(run / "checkpoints/step-000003", reference / "checkpoints/step-000003")


def test_kill_9_mid_save_leaves_the_previous_checkpoint_and_the_next_run_cleans_up(reference, toy_shards, tmp_path, capsys):
    run = tmp_path / "run"
    result = fault_run("kill-in-save", 2, run, toy_shards["video"], "train.max_steps=3")
    assert result.returncode == -signal.SIGKILL
    (tmp,) = temporaries(run)  # every file of step 2 written, its checksums not: never published
    assert tmp.startswith(".step-000002.tmp-") and (run / "checkpoints" / tmp / "net_ema.safetensors").exists()
    assert intact(run) == ["step-000001"]
    resume(run, toy_shards["video"])
    assert f"checkpoints: removed {run / 'checkpoints' / tmp} (left by a save that was killed)" in capsys.readouterr().err
    assert temporaries(run) == [] and intact(run)[-1] == "step-000003"
    assert_same_weights(run / "checkpoints/step-000003", reference / "checkpoints/step-000003")


# -- stop signals -------------------------------------------------------------------------------


def test_sigterm_mid_step_saves_that_step_and_says_how_to_resume(reference, toy_shards, tmp_path):
    """No periodic checkpoint would come before step 10: the one at step 2 is the signal's."""
    run = tmp_path / "run"
    result = fault_run("SIGTERM", 2, run, toy_shards["video"], "train.max_steps=3", "train.ckpt_every_steps=10")
    assert result.returncode == 128 + signal.SIGTERM
    assert "received SIGTERM: stopping after the current step with a checkpoint" in result.stdout
    line = last_line(result.stdout)
    assert line.startswith(f"stopped by SIGTERM after step 2 of 3: checkpoint {run / 'checkpoints' / 'step-000002'} written; "
                           "resume with: python -m apt fit recipes/demo/teacher.yaml tiny "), line
    assert intact(run) == ["step-000002"]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "apt"] and command[-1] == "resume=auto"
    assert main(command[3:]) == 0  # the printed command, as the user would run it
    assert_same_weights(run / "checkpoints/step-000003", reference / "checkpoints/step-000003")


def test_a_second_signal_exits_at_once_without_a_checkpoint(toy_shards, tmp_path):
    run = tmp_path / "run"
    result = fault_run("SIGTERM-twice", 3, run, toy_shards["video"], "train.max_steps=4")
    assert result.returncode == 128 + signal.SIGTERM
    assert "received SIGTERM again: exiting now, without a checkpoint" in result.stdout and "stopped by" not in result.stdout
    assert intact(run) == ["step-000001", "step-000002"]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_sigusr1_and_sigint_stop_like_sigterm(signum, toy_shards, tmp_path, monkeypatch, capsys):
    """In this process: the guard replaces pytest's own SIGINT handler for the run and puts it back."""
    from apt.lit.base import EmaNetModule

    step = EmaNetModule.training_step

    def signalled_step(self, batch, batch_idx):
        if self.progress_step == 1:
            os.kill(os.getpid(), signum)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(EmaNetModule, "training_step", signalled_step)
    before = signal.getsignal(signum)
    run = tmp_path / "run"
    assert main(teacher_args(run, toy_shards["video"], "train.max_steps=3", "train.ckpt_every_steps=10")) == 128 + signum
    assert last_line(capsys.readouterr().err).startswith(f"stopped by {signum.name} after step 2 of 3: checkpoint")
    assert intact(run) == ["step-000002"] and signal.getsignal(signum) is before


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(toy_shards, tmp_path):
    """DDP on 2 ranks; only rank 1 gets SIGTERM. The ranks agree at the step boundary, the checkpoint of that
    step is written, every rank exits non-zero."""
    run = tmp_path / "run"
    result = fault_run("SIGTERM-rank1", 2, run, toy_shards["video"], "train.max_steps=3", "train.ckpt_every_steps=10",
                       "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu", "data.batch_size=2", nproc=2)
    assert result.returncode != 0
    assert result.stdout.count("stopped by SIGTERM after step 2 of 3") == 2, result.stdout[-3000:]  # both ranks, same step
    assert intact(run) == ["step-000002"]


# -- corrupt data -------------------------------------------------------------------------------


def _write_shard(path: Path, keys: list[str], pixels) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key in keys:
            sink.write({"__key__": key, "pixels.npy": pixels(key), "json": b'{"caption": "a red circle moving left on a black background"}'})


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture
def corrupt_shards(tmp_path) -> Path:
    """Two shards whose every sample has an unreadable pixel array, and a .tar that is not a tar."""
    out = tmp_path / "corrupt"
    out.mkdir()
    for s in range(2):
        _write_shard(out / f"bad-{s}.tar", [f"{s}{i:05d}" for i in range(32)], lambda key: b"not an npy array")
    (out / "noise.tar").write_bytes(os.urandom(4096))
    return out


def test_all_shards_corrupt_stop_with_one_line_naming_shards_and_reasons(corrupt_shards, tmp_path):
    run = tmp_path / "run"
    result = launch(["-m", "apt", *teacher_args(run, str(corrupt_shards))], timeout=150)
    assert result.returncode == 1
    line = last_line(result.stdout)
    assert line.startswith("error: data: none of the first 1000 samples read could be used; skipped by reason: bad_array "), line
    for name in ("bad-0.tar", "bad-1.tar", "noise.tar"):
        assert name in line
    assert "tar " in line  # the unreadable file's reason
    warnings = [x for x in result.stdout.splitlines() if "skipped corrupt data" in x]
    assert 5 <= len(warnings) <= 11, len(warnings)  # at 1, 2, 4, ..., 512 skips: not one per sample
    assert list_checkpoints(run) == []


def test_sigterm_while_the_loader_skips_corrupt_data_stops_at_once(corrupt_shards, tmp_path):
    """Unbounded skipping (both bounds off): the loader never yields a batch, so no step boundary comes; the
    signal is honoured at the next skipped sample."""
    run = tmp_path / "run"
    args = teacher_args(run, str(corrupt_shards), "data.max_consecutive_skipped=1000000000", "data.max_skipped_fraction=1.0")
    proc = subprocess.Popen([sys.executable, "-m", "apt", *args], cwd=REPO, env={**clean_env(), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # wait until the loader is skipping
            if "skipped corrupt data" in line or time.monotonic() > deadline:
                break
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"SIGTERM was not honoured while the loader skipped corrupt samples:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - sent < 30
    assert last_line(out).startswith("stopped by SIGTERM while the data loader was skipping corrupt samples; "
                                     "no checkpoint was written after the last one; resume with: python -m apt fit")


@pytest.fixture
def partly_corrupt_shards(toy_shards, tmp_path) -> Path:
    """The toy video shards with the first of their two shards unreadable sample by sample (half the data)."""
    out = tmp_path / "partly"
    shutil.copytree(toy_shards["video"], out)
    shard = min(out.glob("*.tar"))
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    _write_shard(shard, [s["__key__"] for s in samples], lambda key: b"cut short")
    return out


def test_some_corrupt_samples_are_skipped_counted_and_logged(partly_corrupt_shards, tmp_path):
    """Below the bounds the run goes on: skips counted by reason as metrics, a warning at the 1st, 2nd, 4th ... skip."""
    run = tmp_path / "run"
    result = launch(["-m", "apt", *teacher_args(run, str(partly_corrupt_shards), "train.max_steps=3")], timeout=150)
    assert result.returncode == 0, result.stdout[-3000:]
    rows = []
    for f in run.glob("logs/version_*/metrics.csv"):
        with open(f) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("data_skipped")]
    assert rows and all(float(r["data_skipped"]) == float(r["data_skipped_bad_array"]) > 0 for r in rows)
    skipped = int(float(rows[-1]["data_skipped"]))
    warnings = [x for x in result.stdout.splitlines() if x.startswith("skipped corrupt data")]
    assert len(warnings) == skipped.bit_length() or len(warnings) == skipped.bit_length() + 1  # + skips while prefetching
    assert intact(run) == ["step-000001", "step-000002", "step-000003"][-2:]


# -- damaged checkpoints ------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_a_truncated_weights_file_is_named_and_resume_auto_falls_back(reference, toy_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    bad = run / "checkpoints" / "step-000003" / "net_ema.safetensors"
    _truncate(bad)
    for argv in (["sample", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "s")], ["export", str(run), "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {bad} has ") and "(cut short: a full disk or an interrupted copy); the newest intact checkpoint " \
            f"of this run is {run / 'checkpoints' / 'step-000002'}" in err and len(err.splitlines()) == 1, err
    resume(run, toy_shards["video"])
    err = capsys.readouterr().err
    assert f"resume=auto: skipping step-000003: {bad} has " in err
    assert f"resume=auto: continuing from {run / 'checkpoints' / 'step-000002'} (skipped 1 broken: step-000003)" in err
    assert (run / "checkpoints" / "step-000003.broken").is_dir()  # moved aside, kept for inspection
    assert_same_weights(run / "checkpoints/step-000003", reference / "checkpoints/step-000003")


def test_a_truncated_trainer_state_is_named_and_never_unpickled(reference, toy_shards, tmp_path, capsys):
    from apt.checkpoint import CheckpointError, load_trainer_state

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ckpt = run / "checkpoints" / "step-000003"
    _truncate(ckpt / "trainer_state.pt")
    assert main(teacher_args(run, toy_shards["video"], "train.max_steps=4", f"resume={ckpt}")) == 2
    assert capsys.readouterr().err.startswith(f"error: resume: {ckpt / 'trainer_state.pt'} has ")
    (ckpt / "checksums.json").unlink()  # a checkpoint written before checksums: its structure is checked
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is not a complete torch file"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt cannot be read without pickle"):
        load_trainer_state(ckpt)
    torch.save({"payload": Path("x")}, ckpt / "trainer_state.pt")  # an object outside the allow-list: refused, not run
    with pytest.raises(CheckpointError, match="cannot be read without pickle"):
        load_trainer_state(ckpt)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(toy_shards, tmp_path):
    run = tmp_path / "run"
    result = fault_run("disk-full", 2, run, toy_shards["video"], "train.max_steps=3")
    assert result.returncode == 1
    line = last_line(result.stdout)
    assert line.startswith(f"error: checkpoint {run / 'checkpoints' / 'step-000002'} was not written ([Errno 28] No space left on device")
    assert line.endswith("; the checkpoints saved before it are untouched")
    assert intact(run) == ["step-000001"] and temporaries(run) == []  # the partial files are removed too


def test_a_nan_loss_stops_without_a_checkpoint_for_that_step(toy_shards, tmp_path):
    run = tmp_path / "run"
    result = fault_run("nan", 2, run, toy_shards["video"], "train.max_steps=3")
    assert result.returncode == 1
    assert last_line(result.stdout).startswith("error: teacher loss is not finite at step 1 (batch 2)")
    assert intact(run) == ["step-000001"]

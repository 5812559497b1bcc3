"""Launching the multiprocess tests' runs: ``python ARGS`` or ``torchrun`` in a clean environment, with a timeout.

Every run gets a clean environment (no inherited MASTER_PORT / RANK / LOCAL_RANK / WORLD_SIZE / TORCHELASTIC_* /
SLURM_* / PL_*), a free port, one thread per process and a timeout after which its process group is killed; a failed
run fails the test with every rank's fatal lines. DeepSpeed would JIT-build its CPU inference comm op when its backend
starts (about a minute); apt's runs skip it, and the DeepSpeed tests check (``no_op_built``) that nothing was built
into their empty ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "distributed_helpers"
EXTENSIONS = Path(tempfile.mkdtemp(prefix="apt-test-torch-extensions-"))  # per worker; must stay empty (no_op_built)
atexit.register(shutil.rmtree, EXTENSIONS, True)
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("TORCHELASTIC_", "SLURM_", "PL_"))}
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT, e.g. in gloo) prints its Python stack into the output.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1",
               TORCH_EXTENSIONS_DIR=str(EXTENSIONS), PYTHONPATH=str(REPO))
    return env


def launch(args: list[str], *, nproc: int = 0, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python ARGS`` (nproc=0) or ``torchrun --nproc_per_node NPROC ARGS``; killed with its group on timeout."""
    cmd = [sys.executable, *args] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


FATAL_MARKS = ("terminate called", "what():", "Fatal Python error", "enforce fail", "Signal ", "exitcode", "File \"")


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run succeeded; otherwise fail with every rank's fatal lines (a rank's abort is often far above the tail)."""
    fatal = "\n".join(line for line in result.stdout.splitlines() if any(m in line for m in FATAL_MARKS))
    assert result.returncode == 0, (f"{' '.join(result.args)} failed ({result.returncode}):\nfatal lines, first:\n{fatal[:4000]}\n"
                                    f"last output:\n{result.stdout[-6000:]}")
    return result


def no_op_built() -> None:
    """No DeepSpeed op was JIT-built: its CPU backend would compile its inference all-reduce op (about a minute, with a
    compiler) when a run starts, and apt skips it (``apt.distributed.process_group.skip_deepspeed_inference_comm_op``)."""
    assert not any(EXTENSIONS.iterdir()), sorted(p.name for p in EXTENSIONS.iterdir())


def apt_steps(init: Path, out: Path, mode: str, *extra: str, nproc: int = 0) -> dict:
    ok(launch([str(HELPERS / "apt_steps.py"), "--init", str(init), "--out", str(out), "--mode", mode, *extra], nproc=nproc))
    return torch.load(out, weights_only=True)


def metrics(run: Path) -> dict[int, dict[str, str]]:
    rows = {}
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(open(f)):
            rows[int(row["step"])] = {k: v for k, v in row.items() if k not in ("sec_per_step", "step")}
    return rows

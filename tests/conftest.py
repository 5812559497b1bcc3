"""Shared fixtures: offline hub, tiny toy shards and a tiny teacher checkpoint made once per session."""

from __future__ import annotations

import csv
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one torch thread each, children too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

from apt.models import TextCond

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """{'video': dir, 'image': dir} of small toy shards (4-frame clips, 1-frame images)."""
    from apt.toy.shards import write_toy_shards

    root = tmp_path_factory.mktemp("shards")
    write_toy_shards(str(root / "video"), num_samples=64, frames=4, seed=0, samples_per_shard=32)
    write_toy_shards(str(root / "image"), num_samples=64, frames=1, seed=1, samples_per_shard=32)
    return {"video": str(root / "video"), "image": str(root / "image")}


def fit_args(recipe: str, run_dir, shards, *extra: str) -> list[str]:
    return ["fit", recipe, "tiny", f"run_dir={run_dir}", f"data.shards={shards}", *extra]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, toy_shards):
    """Run dir of a tiny teacher trained 2 steps through the CLI (joint image-video)."""
    from apt.cli import main

    run = tmp_path_factory.mktemp("teacher")
    assert main(fit_args("recipes/demo/teacher.yaml", run, toy_shards["video"], f"data.image_shards={toy_shards['image']}")) == 0
    return run


def apt_args(run, shards, generator, teacher, *extra):
    return fit_args("recipes/demo/apt_video.yaml", run, shards, f"apt.generator={generator}", f"apt.teacher={teacher}", "apt.d_warmup_steps=1", *extra)


@pytest.fixture(scope="session")
def tiny_distilled(tiny_teacher, toy_shards, tmp_path_factory):
    """Run dir of a tiny stage-1 (consistency-distilled) run from ``tiny_teacher``, 2 steps through the CLI."""
    from apt.cli import main

    run = tmp_path_factory.mktemp("distill")
    assert main(fit_args("recipes/demo/distill.yaml", run, toy_shards["video"], f"data.image_shards={toy_shards['image']}", f"distill.teacher={tiny_teacher}")) == 0
    return run


def losses(run_dir, key) -> dict[int, float]:
    """{step: value} over every logger version of a run (a resumed run writes a new version)."""
    out = {}
    for f in sorted(Path(run_dir, "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(f)):
            if row.get(key):
                out[int(row["step"])] = float(row[key])
    return out


def random_text(B: int, L: int, D: int, *, pad_from: int | None = None) -> TextCond:
    mask = torch.ones(B, L, dtype=torch.bool)
    if pad_from is not None:
        mask[:, pad_from:] = False
    return TextCond(torch.randn(B, L, D), mask)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    """A directory with net_ema.safetensors of a tiny DiT with non-trivial weights (G init, D backbone, teacher; the multiprocess tests)."""
    return write_tiny_init(tmp_path_factory.mktemp("init"))


def write_tiny_init(out: Path, **dit_kwargs) -> Path:
    """``out``/net_ema.safetensors: a tiny DiT (``build_dit("tiny", **dit_kwargs)``), seed 0, its weights moved off their init."""
    from apt.checkpoint import save_weights
    from apt.models import build_dit
    from apt.text import TextEncoder

    torch.manual_seed(0)
    net = build_dit("tiny", text_dim=TextEncoder.load("toy-t5").dim, **dit_kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-Zero starts every block as the identity
    save_weights(net.state_dict(), out / "net_ema.safetensors")
    return out

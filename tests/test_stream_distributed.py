"""The streaming stage (stream_apt: student forcing, a per-chunk D, optionally distribution matching) on 2 CPU ranks
with gloo: its steps under ZeRO-2/3 and FSDP2 == one process, and its recipe fitted and resumed under DDP, FSDP2 and
ZeRO-2 (``tests/multiprocess.py`` launches every run; tolerances as in ``tests/test_distributed.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from apt.checkpoint import latest_checkpoint
from tests.conftest import write_tiny_init
from tests.multiprocess import apt_steps, launch, metrics, ok

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def tiny_causal_init(tmp_path_factory) -> Path:
    """net_ema.safetensors of a tiny causal DiT (2-frame chunks, sink 1, window 2) with non-trivial weights."""
    return write_tiny_init(tmp_path_factory.mktemp("causal_init"), causal_chunk_frames=2, sink_chunks=1, window_chunks=2)


@pytest.fixture(scope="module")
def single_stream(tiny_causal_init, tmp_path_factory) -> dict:
    return apt_steps(tiny_causal_init, tmp_path_factory.mktemp("single_stream") / "single.pt", "single", "--stage", "stream_apt")


DMD = ("--dmd", "100")  # the recipe's weight (its loss about 0.5 on these tiny nets)
CLEAN = ("--extra", "model.clean_context=true", "model.sink_chunks=2", "model.window_chunks=1")  # the clean cache, split 2 + 1


@pytest.fixture(scope="module")
def single_stream_dmd(tiny_causal_init, tmp_path_factory) -> dict:
    return apt_steps(tiny_causal_init, tmp_path_factory.mktemp("single_stream_dmd") / "single.pt", "single", "--stage", "stream_apt", *DMD)


@pytest.fixture(scope="module")
def single_stream_dmd_clean(tiny_causal_init, tmp_path_factory) -> dict:
    return apt_steps(tiny_causal_init, tmp_path_factory.mktemp("single_stream_dmd_clean") / "single.pt", "single", "--stage", "stream_apt", *DMD, *CLEAN)


@pytest.fixture(scope="module")
def single_stream_dmd_bidir(tiny_causal_init, tiny_init, tmp_path_factory) -> dict:
    return apt_steps(tiny_causal_init, tmp_path_factory.mktemp("single_stream_dmd_bidir") / "single.pt", "single", "--stage", "stream_apt", *DMD,
                     "--extra", f"stream.dmd_teacher={tiny_init}")


# Each sharding runs the stage without and with distribution matching, and the distribution matching with either score
# (the causal teacher's on the clean cache, the bidirectional teacher's on the default cache) under the two shardings
# that split its networks (FSDP2, ZeRO-3); ZeRO-2 (whole networks on every rank) once, with the fake score's third engine.
@pytest.mark.parametrize("mode, dmd, variant", [("deepspeed_stage_3", False, ""), ("fsdp2", False, ""), ("deepspeed_stage_2", True, ""),
                                                ("fsdp2", True, "clean"), ("deepspeed_stage_3", True, "clean"),
                                                ("fsdp2", True, "bidir"), ("deepspeed_stage_3", True, "bidir")],
                         ids=["zero3", "fsdp2", "zero2+dmd", "fsdp2+dmd+clean", "zero3+dmd+clean", "fsdp2+dmd+bidir", "zero3+dmd+bidir"])
def test_stream_apt_steps_on_two_ranks_match_one_process(mode, dmd, variant, request, tiny_causal_init, tiny_init, tmp_path):
    """The streaming stage (16-frame student-forcing rollouts, D streamed over them, relativistic loss + aR1 + aR2;
    with ``dmd``, plus distribution matching: the fake score sharded like D under FSDP2, a third engine under ZeRO, the
    frozen teacher whole; with ``clean``, every network with the clean key/value cache; with ``bidir``, the scores of a
    bidirectional teacher read in windows, ``stream.dmd_teacher``), global batch 4: one process vs 2 ranks x 2 samples,
    3 iterations, same tolerances as the APT stage."""
    one = request.getfixturevalue({"clean": "single_stream_dmd_clean", "bidir": "single_stream_dmd_bidir"}.get(variant)
                                  or ("single_stream_dmd" if dmd else "single_stream"))
    single = {k: [dict(h) for h in v] if k == "history" else v for k, v in one.items()}  # the loop below pops keys
    extra = {"clean": CLEAN, "bidir": ("--extra", f"stream.dmd_teacher={tiny_init}")}.get(variant, ())
    sharded = apt_steps(tiny_causal_init, tmp_path / "sharded.pt", mode, "--stage", "stream_apt", *(DMD if dmd else ()), *extra, nproc=2)
    assert sharded["g_updates"] == single["g_updates"] == 2
    assert "r2" in single["history"][-1]
    assert ("loss_dmd" in single["history"][-1] and "loss_fake_score" in single["history"][-1]) == dmd
    for it, (a, b) in enumerate(zip(single["history"], sharded["history"])):
        assert a.keys() == b.keys(), it
        # The relativistic loss sees only D(x) - D(G(z)): the logits' common offset (D's output bias) gets a gradient of
        # float noise, which Adam's first steps turn into ~lr-sized moves (1e-4 here); the margin is compared instead.
        assert abs((a.pop("d_real") - a.pop("d_fake")) - (b.pop("d_real") - b.pop("d_fake"))) <= 1e-5, it
        for key in a:
            tol = 1e-5 * abs(a[key]) if key.startswith("grad_norm") else 1e-5
            assert abs(a[key] - b[key]) <= tol, (it, key, a[key], b[key])
    for it, (a, b) in enumerate(zip(single["emas"], sharded["emas"])):
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, it
    assert (single["samples"] - sharded["samples"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed_stage_2"])
def test_stream_apt_recipe_with_distribution_matching_fits_and_resumes(strategy, tiny_causal_init, tmp_path):
    """The stream_apt recipe as shipped (distribution matching on) on 2 ranks, through the Trainer (DDP, FSDP2) or the
    DeepSpeed runner: the fake score is trained, saved and (FSDP2, ZeRO) resumed with its optimiser; the frozen teacher
    is not saved. A ZeRO checkpoint holds the fake score's engine; ``python -m apt consolidate`` writes its weights."""
    from apt.distributed.consolidate import consolidate
    from apt.toy.shards import write_toy_shards

    zero = strategy.startswith("deepspeed")

    shards = tmp_path / "long16"
    write_toy_shards(str(shards), num_samples=16, frames=16, seed=3, samples_per_shard=8, progress=False, world="long")
    run = tmp_path / strategy
    args = ["-m", "apt", "fit", "recipes/demo/stream_apt.yaml", "tiny", f"run_dir={run}", f"data.shards={shards}",
            f"apt.generator={tiny_causal_init}", f"apt.teacher={tiny_causal_init}", "apt.d_warmup_steps=1", f"train.strategy={strategy}",
            "train.devices=2", "train.accelerator=cpu", "data.batch_size=2"]
    ok(launch([*args, "train.max_steps=1"], nproc=2))
    first = latest_checkpoint(run)
    assert first.name == "step-000001" and not list(first.glob("teacher*"))
    if zero:  # one DeepSpeed checkpoint per engine, the fake score's a third; consolidated into the standard layout
        assert all((first / f"{n}_engine").is_dir() for n in ("generator", "discriminator", "fake_score"))
        first = consolidate(first)
    names = ("generator", "generator_ema", "discriminator", "fake_score")
    assert all((first / f"{n}.safetensors").exists() for n in names)
    init = load_file(tiny_causal_init / "net_ema.safetensors")
    fake = load_file(first / "fake_score.safetensors")
    shared = fake.keys() & init.keys()
    assert shared and max((fake[k] - init[k]).abs().max().item() for k in shared) > 0  # the fake score moved off the teacher
    rows = metrics(run)
    assert rows[1]["loss_g"] and rows[1]["r2"] and rows[1]["loss_dmd"] and rows[1]["loss_fake_score"]
    if strategy != "ddp":  # the sharded resume: three optimisers' states scattered back, the fake score's included
        ok(launch([*args, "train.max_steps=2", "resume=auto"], nproc=2))
        second = latest_checkpoint(run)
        assert second.name == "step-000002"
        if zero:
            second = consolidate(second)
        assert max((load_file(second / "fake_score.safetensors")[k] - fake[k]).abs().max().item() for k in fake) > 0
        assert metrics(run)[2]["loss_fake_score"]

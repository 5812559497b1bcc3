"""Scale-out on CPU with gloo, 2 processes: ZeRO-2/3 and FSDP2 == single device (ZeRO-3 and FSDP2 with
the EMA sharded like G), kill during save -> resume continues identically (ZeRO-2), FSDP2 save ->
resume continues identically, Ulysses attention == full attention, a DDP APT step runs, training with
``train.sequence_parallel=2`` == one process, the Wan adapter under sequence parallelism == one process.

Every test launches subprocesses (torchrun, or plain python) with a clean environment (no inherited
MASTER_PORT / RANK / LOCAL_RANK / WORLD_SIZE), a free port, one thread each and a timeout; the
process group is killed on timeout (``tests/multiprocess.py``). The streaming stage's cases are in
``tests/test_stream_distributed.py``.

Tolerances (fp32): per-iteration metrics (losses, D(real), D(fake), aR1; means over ranks) within
1e-5 absolute and gradient norms within 1e-5 relative of the single-device run; the EMA generator
within 1e-6; sequence-parallel outputs and gradients within 1e-5 relative. Measured: <= 1e-6 and
1e-8 (docs/distributed.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apt.checkpoint import latest_checkpoint, list_checkpoints
from apt.distributed.consolidate import ema_state_dict
from apt.distributed.sequence_parallel import data_parallel_rank
from tests.multiprocess import HELPERS, apt_steps, launch, metrics, no_op_built, ok

pytestmark = pytest.mark.multiprocess

@pytest.fixture(scope="module")
def single_device(tiny_init, tmp_path_factory) -> dict:
    return apt_steps(tiny_init, tmp_path_factory.mktemp("single") / "single.pt", "single")


@pytest.mark.parametrize("mode, extra", [("deepspeed_stage_2", []), ("deepspeed_stage_3", ["--extra", "model.gradient_checkpointing=true"]), ("fsdp2", [])],
                         ids=["zero2", "zero3+ckpt", "fsdp2"])
def test_sharded_apt_steps_match_single_device(mode, extra, tiny_init, single_device, tmp_path):
    """Global batch 4: one process vs 2 ranks x 2 samples, 3 iterations (1 D-only warm-up, then D + G).
    ZeRO-3 and FSDP2 shard the EMA like G (half of it per rank); the DeepSpeed runs also write a sharded
    checkpoint before the last iteration, zero their EMA and read it back."""
    deepspeed = mode.startswith("deepspeed")
    ckpt = tmp_path / "ckpt"
    sharded = apt_steps(tiny_init, tmp_path / "sharded.pt", mode, *(["--roundtrip", str(ckpt)] if deepspeed else []), *extra, nproc=2)
    no_op_built()
    assert sharded["g_updates"] == single_device["g_updates"] == 2
    for it, (a, b) in enumerate(zip(single_device["history"], sharded["history"])):
        assert a.keys() == b.keys(), it
        for key in a:
            tol = 1e-5 * abs(a[key]) if key.startswith("grad_norm") else 1e-5
            assert abs(a[key] - b[key]) <= tol, (it, key, a[key], b[key])
    for it, (a, b) in enumerate(zip(single_device["emas"], sharded["emas"])):  # gathered after every iteration
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, it
    assert (single_device["samples"] - sharded["samples"]).abs().max().item() < 1e-5  # every rank sampled the sharded EMA
    (whole,) = {n for _, n in sharded["ema_numel"]}
    held = [n / whole for n, _ in sharded["ema_numel"]]
    assert held == [1.0, 1.0] if mode == "deepspeed_stage_2" else all(abs(f - 0.5) < 0.02 for f in held), held
    if mode == "deepspeed_stage_3":  # per-rank partitions in the checkpoint; consolidate joins them
        from apt.distributed.consolidate import consolidate

        assert not (ckpt / "generator_ema.safetensors").exists()
        assert sorted(p.name for p in (ckpt / "generator_ema_partitions").glob("rank-*")) == ["rank-00000.safetensors", "rank-00001.safetensors"]
        ema = load_file(str(consolidate(ckpt, tmp_path / "consolidated") / "generator_ema.safetensors"))
        before_last = single_device["emas"][-2]
        assert ema.keys() == before_last.keys() and max((ema[k] - before_last[k]).abs().max().item() for k in ema) < 1e-6


def fit_args(run: Path, shards: str, init: Path, strategy: str, *extra: str) -> list[str]:
    return ["fit", "recipes/demo/apt_video.yaml", "tiny", f"run_dir={run}", f"data.shards={shards}", f"apt.generator={init}",
            f"apt.teacher={init}", "apt.d_warmup_steps=1", f"train.strategy={strategy}", "train.devices=2",
            "train.accelerator=cpu", "data.batch_size=2", *extra]


def test_zero2_kill_during_save_then_resume_continues_identically(tiny_init, toy_shards, tmp_path):
    from apt.distributed.consolidate import consolidate
    from apt.inference import load_generator

    full, part = tmp_path / "full", tmp_path / "part"
    args = lambda run, *extra: fit_args(run, toy_shards["video"], tiny_init, "deepspeed_stage_2", "train.max_steps=3", "train.keep_checkpoints=2", *extra)  # noqa: E731
    ok(launch(["-m", "apt", *args(full)], nproc=2))
    killed = launch([str(HELPERS / "fit_die.py"), "3", *args(part)], nproc=2)
    assert killed.returncode != 0
    # the kill hit while step 3 was being written: step 2 is still the latest, complete checkpoint
    assert (part / "checkpoints" / ".step-000003.tmp").is_dir() and not (part / "checkpoints" / "step-000003").exists()
    assert latest_checkpoint(part).name == "step-000002"
    ok(launch(["-m", "apt", *args(part, "resume=auto")], nproc=2))
    assert [p.name for p in list_checkpoints(part)] == [p.name for p in list_checkpoints(full)] == ["step-000002", "step-000003"]
    a, b = metrics(full), metrics(part)
    assert sorted(a) == [0, 1, 2, 3] and 3 in b
    assert a[3] == b[3]  # the resumed iteration, to the last printed digit
    outs = [consolidate(run, tmp_path / f"{run.name}-consolidated") for run in (full, part)]
    for name in ("generator", "generator_ema", "discriminator"):
        wa, wb = (load_file(str(o / f"{name}.safetensors")) for o in outs)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert load_generator(outs[1]).generate(["a red circle moving left on a black background"], [0]).shape == (1, 4, 16, 16, 3)


def test_zero2_stop_signal_on_one_rank_saves_on_every_rank(tiny_init, toy_shards, tmp_path):
    """The DeepSpeed runner's own loop honours pre-emption (apt.preemption): only rank 1 gets SIGTERM, in generator
    update 2; both ranks stop after it, write its sharded checkpoint together (no periodic one was due) and exit
    non-zero with the line that says how to resume."""
    from apt.checkpoint import verify_checkpoint

    run = tmp_path / "run"
    args = fit_args(run, toy_shards["video"], tiny_init, "deepspeed_stage_2", "train.max_steps=3", "train.ckpt_every_steps=10")
    stopped = launch([str(HELPERS / "fit_fault.py"), "SIGTERM-rank1", "2", *args], nproc=2)
    assert stopped.returncode != 0
    assert stopped.stdout.count("stopped by SIGTERM after generator update 2 of 3: checkpoint") == 2, stopped.stdout[-4000:]
    assert "resume with: python -m apt fit recipes/demo/apt_video.yaml" in stopped.stdout
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    verify_checkpoint(run / "checkpoints" / "step-000002")


def test_ulysses_attention_on_two_ranks_equals_full_attention(tmp_path):
    ok(launch([str(HELPERS / "ulysses.py"), str(tmp_path / "ulysses.json")], nproc=2, timeout=120))
    no_op_built()  # DeepSpeed's comm started by DistributedAttention (apt.distributed.sequence_parallel.init_deepspeed_comm)
    report = json.loads((tmp_path / "ulysses.json").read_text())
    assert report["d_layers"] == [0, 2]  # a gather mid-network, then a re-split
    for key in ("attention_out", "attention_grad_qkv", "dit_out", "dit_grads", "d_logits", "d_grads", "d_input_grad",
                "dit_trim_batch1", "dit_trim_batch2", "dit_varlen_batch1", "dit_varlen_batch2"):
        assert report[key] < 1e-5, (key, report[key])
    # The group was freed and its gloo threads joined before exit (a thread alive at interpreter shutdown can abort a
    # finished rank): DeepSpeed's comm imported before the group existed, the networks freed (apt.distributed.process_group).
    assert report["gloo_threads_after_close"] == 0


def test_ulysses_rejects_heads_that_do_not_divide_the_group():
    from apt.distributed.sequence_parallel import check_sequence_parallel

    check_sequence_parallel(4, 2)
    with pytest.raises(ValueError, match="3 heads do not divide 2 ranks"):
        check_sequence_parallel(3, 2)


def test_sequence_parallel_groups_read_the_same_samples():
    # 8 ranks in groups of 4 consecutive ranks: ranks 0-3 are data rank 0, ranks 4-7 data rank 1, of 2.
    assert [data_parallel_rank(r, 8, 4) for r in range(8)] == [(0, 2)] * 4 + [(1, 2)] * 4
    assert [data_parallel_rank(r, 2, 1) for r in range(2)] == [(0, 2), (1, 2)]


@pytest.fixture(scope="module")
def single_fit(tiny_init, toy_shards, tmp_path_factory) -> Path:
    """One process, batch 2, 2 G updates (after 1 D warm-up step) through the CLI."""
    run = tmp_path_factory.mktemp("single_fit") / "run"
    ok(launch(["-m", "apt", *fit_args(run, toy_shards["video"], tiny_init, "auto", "train.devices=1", "train.max_steps=2")]))
    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "deepspeed_stage_3"])
def test_sequence_parallel_fit_matches_single_process(strategy, tiny_init, toy_shards, single_fit, tmp_path):
    """``train.sequence_parallel=2`` on 2 ranks: one group that reads the single process's samples (data
    rank 0 of 1) and draws its noise, G and D splitting the tokens; same metrics, same EMA."""
    run = tmp_path / strategy
    args = fit_args(run, toy_shards["video"], tiny_init, strategy, "train.sequence_parallel=2", "train.max_steps=2")
    assert "Ulysses sequence parallelism: 2 ranks per group" in ok(launch(["-m", "apt", *args], nproc=2)).stdout
    a, b = metrics(single_fit), metrics(run)
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for step in a:
        for key in ("loss_d", "d_real", "d_fake", "r1", "grad_norm_d", "loss_g", "grad_norm_g", "g_updates"):
            if a[step][key] == "":  # no G update in the warm-up step
                assert b[step][key] == "", (step, key)
                continue
            x, y = float(a[step][key]), float(b[step][key])
            assert abs(x - y) <= (1e-5 * abs(x) if key.startswith("grad_norm") else 1e-5), (step, key, x, y)
    ema_a = load_file(str(latest_checkpoint(single_fit) / "generator_ema.safetensors"))
    ema_b = ema_state_dict(latest_checkpoint(run)) if strategy.startswith("deepspeed") else load_file(str(latest_checkpoint(run) / "generator_ema.safetensors"))
    assert ema_a.keys() == ema_b.keys()
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) < 1e-6


def test_wan_sequence_parallel_on_two_ranks_equals_one_process(tmp_path):
    ok(launch([str(HELPERS / "wan_ulysses.py"), str(tmp_path / "wan.json")], nproc=2, timeout=120))
    report = json.loads((tmp_path / "wan.json").read_text())
    assert report["tokens_per_rank"] == 16 and report["d_layers"] == [0, 1]  # 32 visual tokens split; D stops after block 1
    for key in ("g_out", "g_grads", "d_logits", "d_grads", "d_input_grad", "g_step_grads"):
        assert report[key] < 1e-5, (key, report[key])
    assert "train.sequence_parallel=2: a latent of 1x6x6 (frames x height x width) is 9 visual tokens" in report["uneven_error"]
    assert report["gloo_threads_after_close"] == 0  # the group freed, its threads joined before exit


def test_ddp_runs_an_apt_step(tiny_init, toy_shards, tmp_path):
    run = tmp_path / "ddp"
    ok(launch(["-m", "apt", *fit_args(run, toy_shards["video"], tiny_init, "ddp", "train.max_steps=1")], nproc=2))
    last = latest_checkpoint(run)
    assert last.name == "step-000001"
    for name in ("generator", "generator_ema", "discriminator"):
        assert (last / f"{name}.safetensors").exists()
    rows = metrics(run)
    assert rows[1]["loss_g"] and rows[1]["grad_norm_g"]


def test_fsdp2_save_then_resume_continues_identically(tiny_init, toy_shards, tmp_path):
    """FSDP2 (EMA sharded like G) on 2 ranks, 3 G updates, sampling the sharded EMA after each; then a run
    resumed from the first one's step-2 checkpoint (standard layout, gathered to rank 0, scattered back)
    repeats step 3 exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = lambda run, *extra: fit_args(run, toy_shards["video"], tiny_init, "fsdp2", "train.max_steps=3", "train.sample_every_steps=1", *extra)  # noqa: E731
    out = ok(launch(["-m", "apt", *args(full)], nproc=2)).stdout
    assert "EMA generator sharded like G: 67360 elements, per rank [33680, 33680]" in out
    step2, step3 = full / "checkpoints" / "step-000002", full / "checkpoints" / "step-000003"
    for name in ("generator", "generator_ema", "discriminator"):  # the standard layout, whole tensors
        assert (step2 / f"{name}.safetensors").exists()
    ok(launch(["-m", "apt", *args(part, f"resume={step2}")], nproc=2))
    a, b = metrics(full), metrics(part)
    assert max(a) == max(b) and a[max(a)] == b[max(b)]  # the resumed iteration, to the last printed digit
    for name in ("generator", "generator_ema", "discriminator"):
        wa, wb = (load_file(str(d / f"{name}.safetensors")) for d in (step3, latest_checkpoint(part)))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert sorted(p.name for p in (full / "samples").glob("*.png")) == [f"step-00000{i}.png" for i in (1, 2, 3)]  # sample, then update
    png = [(r / "samples" / "step-000003.png").read_bytes() for r in (full, part)]  # every rank sampled, rank 0 wrote
    assert png[0] == png[1]

"""LoRA generators under sharded strategies on CPU with gloo, through the real Trainer path
(tests/distributed_helpers/lora_fit.py, fixed global batch of 4): DDP and FSDP2 on 2 ranks == one process
(per-step metrics, the adapters and D after every generator update, samples of the EMA generator); FSDP2
shards the EMA adapters with G (half of them per rank) and its checkpoints hold the whole adapters only;
an FSDP2 run resumed from its step-1 checkpoint repeats step 2 exactly; a LoRA distillation runs under DDP.

Tolerances (fp32), as tests/test_distributed.py: metrics within 1e-5 absolute (gradient norms 1e-5
relative), the generator's adapters within 1e-6. D within 1e-4: the demo recipe's Adam (lr_d 3e-4) moves an
element whose gradient sits at rounding level by up to ~lr_d whatever its size, and 2 ranks sum the
gradient in another order than one process (measured: 1.0e-5 after the first update, with metrics equal
to 1e-5).
"""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from apt import lora
from apt.checkpoint import list_checkpoints
from tests.multiprocess import HELPERS, launch, ok

pytestmark = pytest.mark.multiprocess
pytest.importorskip("peft")  # the `lora` extra (setup.cfg)
KEYS = ("loss_d", "d_real", "d_fake", "r1", "grad_norm_d", "loss_g", "grad_norm_g", "g_updates")


def lora_fit(init, run, strategy: str, *extra: str, nproc: int = 0):
    return ok(launch([str(HELPERS / "lora_fit.py"), "--init", str(init), "--out", str(run), "--strategy", strategy, *extra], nproc=nproc, timeout=240))


def metrics(run) -> dict[int, dict[str, str]]:
    rows = {}
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                rows[int(row["step"])] = row
    return rows


def assert_same_run(a, b) -> None:
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb) and len(ma) >= 3
    for step in ma:
        for key in KEYS:
            if ma[step][key] == "":  # no G update in the warm-up step
                assert mb[step][key] == "", (step, key)
                continue
            x, y = float(ma[step][key]), float(mb[step][key])
            assert abs(x - y) <= (1e-5 * abs(x) if key.startswith("grad_norm") else 1e-5), (step, key, x, y)
    ca, cb = list_checkpoints(a), list_checkpoints(b)
    assert [p.name for p in ca] == [p.name for p in cb] == ["step-000001", "step-000002"]
    for pa, pb in zip(ca, cb):
        for name, tol in (("generator", 1e-6), ("discriminator", 1e-4)):
            wa, wb = load_file(str(pa / f"{name}.safetensors")), load_file(str(pb / f"{name}.safetensors"))
            assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol, (pa.name, name)
        assert all(lora.is_adapter_key(k) for k in load_file(str(pb / "generator.safetensors")))  # the base is not saved
    ra, rb = torch.load(a / "result.pt", weights_only=False), torch.load(b / "result.pt", weights_only=False)
    assert (ra["samples"] - rb["samples"]).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def single_lora(tiny_init, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_single") / "run"
    lora_fit(tiny_init, run, "auto")
    return run


def test_lora_apt_under_ddp_on_two_ranks_matches_one_process(tiny_init, single_lora, tmp_path):
    lora_fit(tiny_init, tmp_path / "ddp", "ddp", nproc=2)
    assert_same_run(single_lora, tmp_path / "ddp")


def test_lora_apt_under_fsdp2_matches_one_process_and_resumes_exactly(tiny_init, single_lora, tmp_path):
    out = lora_fit(tiny_init, tmp_path / "fsdp2", "fsdp2", nproc=2).stdout
    assert_same_run(single_lora, tmp_path / "fsdp2")
    counts = torch.load(tmp_path / "fsdp2" / "result.pt", weights_only=False)["ema_numel"]
    (whole,) = {n for _, n in counts}
    assert whole == sum(p.numel() for p in [*load_file(str(list_checkpoints(single_lora)[-1] / "generator.safetensors")).values()]) // 2
    assert all(abs(n / whole - 0.5) < 0.05 for n, _ in counts), counts  # the EMA adapters are sharded like G
    assert f"EMA generator sharded like G: {whole} elements" in out
    step1 = list_checkpoints(tmp_path / "fsdp2")[0]
    lora_fit(tiny_init, tmp_path / "resumed", "fsdp2", "--resume", str(step1), nproc=2)
    last, again = list_checkpoints(tmp_path / "fsdp2")[-1], list_checkpoints(tmp_path / "resumed")[-1]
    assert last.name == again.name == "step-000002"
    for name in ("generator", "discriminator"):
        wa, wb = load_file(str(last / f"{name}.safetensors")), load_file(str(again / f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_lora_distillation_runs_under_ddp(tiny_init, tmp_path):
    lora_fit(tiny_init, tmp_path / "distill", "ddp", "--stage", "distill", nproc=2)
    last = list_checkpoints(tmp_path / "distill")[-1]
    assert last.name == "step-000002" and sorted(p.name for p in last.glob("*.safetensors")) == ["net.safetensors"]
    sd = load_file(str(last / "net.safetensors"))
    assert sd and all(lora.is_adapter_key(k) for k in sd)
    trained = lora.adapter_state(sd, lora.TRAINED)
    assert max(v.abs().max().item() for k, v in trained.items() if ".lora_B." in k) > 0  # the adapters learned (B starts at 0)

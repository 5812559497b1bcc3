"""apt.inference: the Generator samples under inference mode and hands back ordinary tensors; eval/batch1_timing.py."""

import pytest
import torch
from eval_helpers import load_eval_script

from apt.inference import load_generator, sample


@pytest.mark.integration
def test_generate_tensor_matches_no_grad_sampling_and_returns_an_ordinary_tensor(tiny_teacher):
    gen = load_generator(tiny_teacher)
    prompts, seeds = ["a red circle moving left on a black background"], [3]
    x = gen.generate_tensor(prompts, seeds, steps=2, cfg_scale=3.0)
    with torch.no_grad():  # the training modules' path (apt.lit.base.generate): autograd off, not inference mode
        ref = sample(gen.net, gen.text_encoder, gen.config, prompts, seeds, steps=2, cfg_scale=3.0)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    assert not x.is_inference()
    x.mul_(2)  # an inference tensor would refuse an in-place update outside inference mode
    y = x.clone().requires_grad_(True)
    (y * x).sum().backward()  # and could not be saved for backward
    torch.testing.assert_close(y.grad, x)


@pytest.mark.integration
def test_batch1_timing_script_reports_both_modes_and_both_estimators(tiny_teacher):
    out = load_eval_script("batch1_timing").main([str(tiny_teacher), str(tiny_teacher), "--repeats", "1", "--rounds", "1"])
    assert set(out["forward"]) == {"batch1_ms", "batch2_ms"} and all(v > 0 for m in out["forward"].values() for v in m.values())
    (speedup,) = out["measurements"][0]["speedups"].values()
    assert speedup["median_call"] > 1 and speedup["median_turn_mean"] > 1  # the teacher's 25 CFG steps vs one step

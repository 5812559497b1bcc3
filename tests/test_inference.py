"""apt.inference: the Generator samples under inference mode and hands back ordinary tensors."""

import pytest
import torch

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

